"""predict.py on 1,000 classes x 10,000 images against a plain loop + scikit-learn: time and peak memory, as ratios.

    python tools/predict_scale.py --work /tmp/predict-scale [--classes 1000 --per-class 10 --workers 2 --repeats 3]

Builds once in ``--work``: a toolkit checkpoint of a tiny ViT (32 px, patch 8, depth 4, dim 64, random weights)
with a ``--classes`` head, and ``--per-class`` generated 32 px PNGs in each of that many class folders. Then runs,
each in a process of its own: ``predict.py --data-root`` on them (the whole report), and the reference, the same
folder scan and loader (``utils.data.eval_loader``) in a plain ``torch.inference_mode()`` loop followed by
scikit-learn's accuracy_score, classification_report, confusion_matrix and roc_auc_score (one-vs-rest, macro).
Prints each one's seconds (timed inside the process, its start-up excluded) and peak resident memory
(``os.wait4``), of the fastest of ``--repeats`` alternating runs (a shared machine's load varies), then
predict.py / reference.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TINY = dict(patch_size=8, depth=4, embed_dim=64, num_heads=2)


def build_case(work: Path, classes: int, per_class: int) -> None:
    """The checkpoint and the image folder, unless ``work`` holds them already."""
    import numpy as np
    import torch
    from PIL import Image
    from datasets.transforms import data_config
    from models.checkpoint import make_checkpoint, save_atomic
    from models.factory import build_model
    work.mkdir(parents=True, exist_ok=True)
    if not (work / 'best.pth').exists():
        torch.manual_seed(0)
        model = build_model('vit_tiny_patch16_224', num_classes=classes, img_size=32, **TINY)
        meta = dict(model_name='vit_tiny_patch16_224', model_kwargs=TINY, method='none', method_cfg={},
                    num_classes=classes, class_names=[f'class_{i:04d}' for i in range(classes)],
                    data_config=data_config(model, 32))
        save_atomic(make_checkpoint(meta, model.state_dict()), work / 'best.pth')
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = work / 'data' / f'class_{c:04d}'
        if folder.is_dir() and len(list(folder.iterdir())) == per_class:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i:02d}.png')


def reference(work: Path, workers: int, batch_size: int) -> None:
    """The plain loop + scikit-learn's metrics on the same images."""
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, roc_auc_score
    from datasets.folder import scan_classes
    from datasets.transforms import eval_transform
    from models.factory import load_for_inference
    from utils.data import eval_loader
    model, meta = load_for_inference(work / 'best.pth')
    scan = scan_classes(work / 'data')
    loader = eval_loader(scan.samples, eval_transform(meta['data_config']), batch_size, workers)
    probs, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            probs.append(model(batch.images).softmax(1))
            targets.append(batch.targets)
    probs, targets = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    predicted = probs.argmax(1)
    accuracy_score(targets, predicted)
    classification_report(targets, predicted, output_dict=True, zero_division=0)
    confusion_matrix(targets, predicted)
    roc_auc_score(targets, probs / probs.sum(1, keepdims=True), multi_class='ovr')
    assert len(np.unique(targets)) == len(scan.classes)


def predict_py(work: Path, workers: int, batch_size: int) -> None:
    """predict.py's labelled report on the images."""
    import predict
    assert predict.main(['--weights', str(work / 'best.pth'), '--data-root', str(work / 'data'), '--output-dir',
                         str(work / 'report'), '--workers', str(workers), '--batch-size', str(batch_size)]) == 0


def timed(job, *args) -> float:
    """Wall seconds of ``job(*args)``, its own imports included."""
    start = time.perf_counter()
    job(*args)
    return time.perf_counter() - start


def measured(job: str, args) -> tuple:
    """(seconds, peak RSS in MiB) of ``job`` run in a process of its own."""
    child = subprocess.Popen([sys.executable, __file__, '--job', job, '--work', str(args.work), '--workers',
                              str(args.workers), '--batch-size', str(args.batch_size)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    output = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        sys.exit(f'{job} failed (status {status})')
    return json.loads(output.strip().splitlines()[-1])['seconds'], usage.ru_maxrss / 1024


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work', type=Path, default=Path('/tmp/predict-scale'), help='folder of the case (kept)')
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--per-class', type=int, default=10)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=3, help='runs of each; the fastest counts')
    p.add_argument('--job', choices=['reference', 'predict'], help=argparse.SUPPRESS)  # a measured process
    args = p.parse_args(argv)
    if args.job:
        job = reference if args.job == 'reference' else predict_py
        print(json.dumps(dict(seconds=timed(job, args.work, args.workers, args.batch_size))))
        return
    build_case(args.work, args.classes, args.per_class)
    runs = {'reference': [], 'predict': []}
    for _ in range(args.repeats):  # alternating, so that both meet the same load of a shared machine
        for job, times in runs.items():
            times.append(measured(job, args))
    (ref_s, ref_mb), (pred_s, pred_mb) = (min(times) for times in runs.values())
    print(f'{args.classes} classes x {args.per_class} images, workers {args.workers}, batch {args.batch_size}; '
          f'the fastest of {args.repeats} runs each (all: ' +
          ', '.join(f"{job} {' '.join(f'{t[0]:.1f}' for t in times)} s" for job, times in runs.items()) + ')')
    print(f'plain loop + scikit-learn: {ref_s:6.1f} s, peak RSS {ref_mb:6.0f} MiB')
    print(f'predict.py (full report):  {pred_s:6.1f} s, peak RSS {pred_mb:6.0f} MiB')
    print(f'predict.py / plain: time {pred_s / ref_s:.2f}x, peak RSS {pred_mb / ref_mb:.2f}x')


if __name__ == '__main__':
    main()
