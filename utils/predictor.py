"""Run a checkpoint over images: class probabilities, the report of a labelled set, top-k of unlabelled files.

Everything about the model (name, method, classes, input size and normalisation) comes from the checkpoint.
A labelled folder's classes are matched to the checkpoint's by name, never by position.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets.transforms import eval_transform
from models.registry import method_cfg, method_name, method_stats
from models.factory import load_for_inference
from utils.data import eval_loader
from utils.errors import UserError

log = logging.getLogger('predict')


@dataclass
class Predictions:
    """Probabilities [N, C] of the images that loaded, their files and targets (-1 when unlabelled), and the
    (file, cause) of those that failed to load."""
    probs: np.ndarray
    paths: List[str]
    targets: np.ndarray
    failed: List[Tuple[str, str]] = field(default_factory=list)
    images_per_s: float = 0.0
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def predict(model, samples: Sequence[Tuple[str, int]], data_config: dict, device, batch_size: int = 64,
            workers: int = 0, progress: bool = True) -> Predictions:
    """Softmax probabilities for ``samples`` [(path, target)]; files that fail to load are listed in ``failed``."""
    model.eval()
    loader = eval_loader(list(samples), eval_transform(data_config), batch_size, workers,
                         pin_memory=torch.device(device).type == 'cuda')
    probs, indices, failed, seconds = [], [], [], 0.0
    for batch in tqdm(loader, desc='predict', disable=not progress, leave=False, dynamic_ncols=True):
        for f in batch.failed:
            log.warning('skipping %s: %s', samples[f.index][0], f.problem)
            failed.append((samples[f.index][0], f.problem))
        if batch.images is None:
            continue
        images, index = batch.images, batch.indices
        start = time.perf_counter()
        logits = model(images.to(device, non_blocking=True))
        probs.append(logits.float().softmax(dim=1).cpu())
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        indices.append(index)
    index = torch.cat(indices).tolist() if indices else []
    return Predictions(probs=torch.cat(probs).numpy() if probs else np.zeros((0, 0)),
                       paths=[samples[i][0] for i in index], targets=np.array([samples[i][1] for i in index]),
                       failed=failed,
                       images_per_s=len(index) / seconds if seconds else 0.0, stats=method_stats(model))


def map_to_checkpoint_classes(samples, data_classes: Sequence[str], ckpt_classes: Sequence[str]):
    """Re-index ``samples`` from the data's class list to the checkpoint's, by name; returns (samples, unknown)."""
    position = {name: i for i, name in enumerate(ckpt_classes)}
    unknown = sorted(set(data_classes) - set(position))
    mapped = [(p, position[data_classes[t]]) for p, t in samples if data_classes[t] in position]
    if unknown:
        log.warning('classes not in the checkpoint, skipped: %s', ', '.join(unknown))
    if not mapped:
        raise UserError(f"none of the folder's classes ({', '.join(list(data_classes)[:6])}) is a class of the "
                        f"checkpoint ({', '.join(list(ckpt_classes)[:6])} ...); is this the right --data-root?")
    return mapped, unknown


def write_report(weights_path, samples, class_names, output_dir, device='cpu', batch_size: int = 64,
                 workers: int = 0, method: Optional[str] = None, method_cfg_override: Optional[dict] = None,
                 skipped: Sequence[Tuple[str, str]] = (), progress: bool = True, topk: int = 5,
                 save_probs: bool = False) -> dict:
    """Predict ``samples`` (indices into ``class_names``) with the checkpoint and write the full report
    (``topk`` and ``save_probs`` as ``write_labelled_report``'s)."""
    from utils.report import write_labelled_report
    model, meta = load_for_inference(weights_path, device, method, method_cfg_override)
    samples, unknown = map_to_checkpoint_classes(samples, class_names, meta['class_names'])
    result = predict(model, samples, meta['data_config'], device, batch_size, workers, progress)
    if len(result.paths) == 0:
        raise UserError('no image could be read; nothing to report')
    known = {path for path, _ in skipped}
    skipped = list(skipped) + [(path, why) for path, why in result.failed if path not in known]
    context = dict(checkpoint=str(weights_path), model=meta['model_name'], method=method_name(model),
                   method_cfg=method_cfg(model), unknown_classes=unknown, skipped=skipped,
                   images_per_s=result.images_per_s, method_stats=result.stats)
    return write_labelled_report(result.probs, result.targets, result.paths, meta['class_names'],
                                 Path(output_dir), context, topk, save_probs)


def labelled_samples(checkpoint: dict, data_root) -> List[Tuple[str, int]]:
    """The readable (path, checkpoint class index) samples of a labelled folder (for benchmark.py)."""
    from datasets.folder import labelled_root, scan_classes
    scan = scan_classes(labelled_root(data_root))
    return map_to_checkpoint_classes(scan.samples, scan.classes, checkpoint['class_names'])[0]


def accuracy_evaluator(checkpoint: dict, samples: Sequence[Tuple[str, int]], device, batch_size: int = 64):
    """A function model -> {top1, macro_f1} on labelled ``samples``, as predict.py computes them (for benchmark.py)."""
    from sklearn.metrics import f1_score

    def evaluate(model) -> dict:
        result = predict(model, samples, checkpoint['data_config'], device, batch_size, progress=False)
        predicted = result.probs.argmax(axis=1)
        return dict(top1=100 * float((predicted == result.targets).mean()),
                    macro_f1=100 * f1_score(result.targets, predicted, average='macro',
                                            labels=np.unique(result.targets)))
    return evaluate
