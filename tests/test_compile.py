"""torch.compile on the CPU: every method's compiled logits equal its eager ones, and --compile reaches the models
train_gpu.py trains and evaluates (checkpoints without the compiled wrapper's prefix), predict.py and benchmark.py.

Inductor builds C++ kernels for 40-60 s per method on a 2-core CPU, too slow for CI, so the methods are compiled with
'aot_eager' by default: dynamo's graph capture and AOTAutograd's tracing, as inductor gets them, run without code
generation. TOOLKIT_TEST_INDUCTOR=1 (tools/gpu_check.sh sets it) compiles them with inductor. The CLI tests use
the 'eager' backend: they check the wiring, not the compiler.
"""
import os

import pandas as pd
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import benchmark
import predict
import train_gpu
import utils.trainer
from conftest import TINY_FLAGS, make_image_folder
from test_benchmark import TINY_BENCH
from test_method_contract import METHODS, ON, tiny

BACKEND = 'inductor' if os.environ.get('TOOLKIT_TEST_INDUCTOR') == '1' else 'aot_eager'


@pytest.mark.parametrize('method', ['none', *METHODS])
def test_compiled_logits_equal_eager(method):
    torch._dynamo.reset()  # a fresh cache: earlier tests' entries would count towards dynamo's recompile limit
    model = tiny('vit_tiny_patch16_224', method, ON.get(method)).eval()
    x = torch.randn(2, 3, 64, 64)
    counter = CompileCounterWithBackend(BACKEND)
    with torch.no_grad():
        eager, compiled = model(x), torch.compile(model, backend=counter)(x)
    assert counter.frame_count >= 1  # it compiled, rather than fell back to eager
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


class CompileSpy:
    """torch.compile with the 'eager' backend, recording what it was given."""

    def __init__(self, monkeypatch):
        self.models, self.real = [], torch.compile
        monkeypatch.setattr(torch, 'compile', self)

    def __call__(self, model, **kwargs):
        self.models.append(model)
        return self.real(model, backend='eager')


@pytest.fixture(scope='module')
def compiled_run(tmp_path_factory):
    """A 1-epoch --compile --model-ema run; the types of the models ``evaluate`` got are recorded."""
    torch._dynamo.reset()
    data = make_image_folder(tmp_path_factory.mktemp('data'), per_class=8)
    run = tmp_path_factory.mktemp('run')
    evaluated = []
    with pytest.MonkeyPatch.context() as mp:
        spy = CompileSpy(mp)
        real_evaluate = utils.trainer.evaluate
        mp.setattr(utils.trainer, 'evaluate',
                   lambda model, *args, **kwargs: evaluated.append(model) or real_evaluate(model, *args, **kwargs))
        assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', '--compile',
                               '--model-ema', *TINY_FLAGS]) == 0
    return data, run, spy.models, evaluated


def test_training_compiles_the_trained_and_evaluated_models(compiled_run):
    data, run, compiled, evaluated = compiled_run
    assert len(compiled) == 2  # the model, and its EMA copy
    assert [type(m).__name__ for m in evaluated] == ['OptimizedModule', 'OptimizedModule']
    assert evaluated[0]._orig_mod is compiled[0] and evaluated[1]._orig_mod is compiled[1]
    for name in ('best.pth', 'last.pth'):
        ckpt = torch.load(run / name, map_location='cpu', weights_only=True)
        assert not [k for k in ckpt['model'] if k.startswith('_orig_mod')]
        assert not [k for k in ckpt.get('model_ema') or {} if k.startswith('_orig_mod')]


def test_predict_compile_gives_the_eager_probabilities(compiled_run, tmp_path, monkeypatch):
    data, run, _, _ = compiled_run
    flags = ['--weights', str(run / 'best.pth'), '--images', *[str(p) for p in sorted(data.rglob('*.png'))[:4]]]
    assert predict.main([*flags, '--output-dir', str(tmp_path / 'eager')]) == 0
    spy = CompileSpy(monkeypatch)
    assert predict.main([*flags, '--output-dir', str(tmp_path / 'compiled'), '--compile']) == 0
    assert len(spy.models) == 1
    eager, compiled = (pd.read_csv(tmp_path / side / 'predictions.csv') for side in ('eager', 'compiled'))
    pd.testing.assert_frame_equal(compiled, eager, atol=1e-6)


def test_benchmark_compile_times_a_compiled_model(tmp_path, monkeypatch, capsys):
    spy = CompileSpy(monkeypatch)
    flags = [*TINY_BENCH, '--methods', 'none', '--compile', '--output-dir', str(tmp_path)]
    assert benchmark.main([*flags, '--warmup', '1']) == 0
    assert len(spy.models) == 1 and 'compiled' in (tmp_path / 'benchmark.md').read_text()
    assert benchmark.main([*flags, '--warmup', '0']) == 2
    assert '--compile needs --warmup 1' in capsys.readouterr().err
