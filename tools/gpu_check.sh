#!/usr/bin/env bash
# Every GPU check in one go, then a table (a line per check, a column per method: pass / FAIL / skipped, seconds):
#   - the tests marked cuda (tests/test_cuda.py): every method's forward and backward under AMP bf16 and fp16,
#     channels_last, torch.compile (inductor); train_gpu.py --compile --channels-last; a 2-GPU torchrun run over
#     NCCL (skipped below 2 GPUs); benchmark.py --device cuda, eager and compiled;
#   - every method compiled by inductor on the CPU, logits within 1e-6 of eager (tests/test_compile.py with
#     TOOLKIT_TEST_INDUCTOR=1; CI runs it with aot_eager, as inductor's C++ build is slow on 2 cores).
#
#     bash tools/gpu_check.sh            # exit status 0 when nothing failed
set -uo pipefail
cd "$(dirname "$0")/.."
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
python -m pytest -p no:cacheprovider -q -m cuda tests/test_cuda.py --junitxml="$reports/gpu.xml"
gpu=$?
TOOLKIT_TEST_INDUCTOR=1 python -m pytest -p no:cacheprovider -q tests/test_compile.py -k compiled_logits \
    --junitxml="$reports/cpu-inductor.xml"
cpu=$?
python - "$reports"/*.xml <<'PYTHON'
"""A line per check, a column per method (and one for the whole-run checks), from pytest's JUnit reports."""
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, '.')
from models.registry import METHODS

cells, checks = {}, []
for report in sys.argv[1:]:
    prefix = 'cpu inductor: ' if report.endswith('cpu-inductor.xml') else ''
    for case in ET.parse(report).iter('testcase'):
        name, _, params = re.match(r'test_([^\[]*)(\[(.*)\])?', case.get('name')).groups()
        parts = params.split('-') if params else []
        method = next((p for p in parts if p in METHODS), '(run)')
        check = prefix + ' '.join([name.replace('_', ' ')] + [p for p in parts if p != method])
        outcome = next((tag for tag in ('failure', 'error', 'skipped') if case.find(tag) is not None), 'pass')
        cells[method, check] = f"{ {'failure': 'FAIL', 'error': 'ERROR'}.get(outcome, outcome)} {float(case.get('time')):.1f}s"
        checks += [check] if check not in checks else []
rows = [m for m in METHODS if any((m, c) in cells for c in checks)] + ['(run)']
width = max(len(c) for c in checks)
print(f"{'check':{width}s} | " + ' | '.join(f'{m:13s}' for m in rows))
print('-' * (width + 16 * len(rows)))
for check in checks:
    print(f'{check:{width}s} | ' + ' | '.join(f"{cells.get((m, check), ''):13s}" for m in rows))
PYTHON
exit $(( gpu != 0 || cpu != 0 ))
