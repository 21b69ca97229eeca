"""Run a model over images: class probabilities, the report of a labelled set, top-k of unlabelled files.

The model is a checkpoint of this toolkit, whose every detail (name, method, classes, input size and
normalisation) it holds, or a stock timm model with its timm weights (``load_timm_for_inference``), whose input
description comes from its timm pretrained config and class names from timm's ImageNet info. A labelled
folder's classes are matched to the checkpoint's by name, never by position. On CUDA the forward may run under
autocast (``amp_dtype``); on the CPU it stays in full precision.
"""
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import ImageNetInfo, infer_imagenet_subset
from tqdm import tqdm

from datasets.transforms import data_config, eval_transform
from models.checkpoint import is_toolkit_checkpoint, read_checkpoint, weights_state
from models.factory import build_model, load_for_inference
from models.pretrained import HubWeights, resolve_pretrained
from models.registry import method_cfg, method_name, method_stats
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
            workers: int = 0, progress: bool = True, amp_dtype: Optional[torch.dtype] = None) -> Predictions:
    """Softmax probabilities for ``samples`` [(path, target)]; files that fail to load are listed in ``failed``.
    ``amp_dtype`` (bf16 / fp16, CUDA only) runs the forward under autocast; the softmax is in float32."""
    model.eval()
    device = torch.device(device)
    loader = eval_loader(list(samples), eval_transform(data_config), batch_size, workers,
                         pin_memory=device.type == 'cuda')
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    probs, indices, failed, seconds = [], [], [], 0.0
    for batch in tqdm(loader, desc='predict', disable=not progress, leave=False, dynamic_ncols=True):
        for f in batch.failed:
            log.warning('skipping %s: %s', samples[f.index][0], f.problem)
            failed.append((samples[f.index][0], f.problem))
        if batch.images is None:
            continue
        images, index = batch.images, batch.indices
        start = time.perf_counter()
        with autocast:
            logits = model(images.to(device, non_blocking=True))
        probs.append(logits.float().softmax(dim=1).cpu())
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        indices.append(index)
    index = torch.cat(indices).tolist() if indices else []
    return Predictions(probs=torch.cat(probs).numpy() if probs else np.zeros((0, 0)),
                       paths=[samples[i][0] for i in index], targets=np.array([samples[i][1] for i in index]),
                       failed=failed,
                       images_per_s=len(index) / seconds if seconds else 0.0, stats=method_stats(model))


def timm_class_names(model) -> List[str]:
    """A stock timm model's class names: its pretrained config's ``label_names``, else ImageNet's (timm's
    ``ImageNetInfo``, e.g. 'tench, Tinca tinca') when its head has the class count of an ImageNet subset, else
    class_0, class_1, ..."""
    count = model.num_classes
    labels = model.pretrained_cfg.get('label_names')
    if labels and len(labels) == count:
        return list(labels)
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(count)]
    return [f'class_{i}' for i in range(count)]


def load_timm_for_inference(name: str, pretrained, device='cpu', method: Optional[str] = None,
                            method_settings: Optional[dict] = None, model_kwargs: Optional[dict] = None):
    """(model in eval mode on ``device``, metadata as a checkpoint's) of the timm model ``name`` with the weights
    ``pretrained`` names (True: its default timm weights; a tag, hf-hub:ORG/NAME or a file: ``models.pretrained``),
    their whole classifier included, and ``method`` applied. Its input description is the weights' timm config's."""
    weights = resolve_pretrained(name, pretrained)
    hub = isinstance(weights, HubWeights)
    label = weights.label if hub else weights
    state = weights.state_dict() if hub else read_checkpoint(weights)
    if is_toolkit_checkpoint(state):
        raise UserError(f"'{label}' is a checkpoint of this toolkit; pass it as --weights {label}")
    state = weights_state(state)
    if 'head.weight' not in state:
        raise UserError(f"the weights in '{label}' have no classifier (a feature extractor): nothing to predict "
                        f"with; fine-tune them on your classes with train_gpu.py --pretrained {label}")
    model = build_model(name, method or 'none', method_settings, num_classes=state['head.weight'].shape[0],
                        pretrained=pretrained, **(model_kwargs or {}))  # the weights' head, whatever its classes
    meta = dict(model_name=name, model_kwargs=dict(model_kwargs or {}), method=method_name(model),
                method_cfg=method_cfg(model), num_classes=model.num_classes, class_names=timm_class_names(model),
                data_config=data_config(model, model.patch_embed.img_size[-1]))
    return model.to(device).eval(), meta


def top_classes(probs: np.ndarray, names: Sequence[str], k: int) -> List[List[Tuple[str, float]]]:
    """The ``k`` most probable (class name, probability) of each row of ``probs`` [N, C], most probable first."""
    order = np.argsort(-probs, axis=1, kind='stable')[:, :min(k, len(names))]
    return [[(names[i], float(row[i])) for i in top] for row, top in zip(probs, order)]


def write_image_predictions(probs: np.ndarray, files: Sequence[str], names: Sequence[str], out: Path, fmt: str,
                            k: int, save_probs: bool = False) -> Path:
    """The predictions of unlabelled images, as ``out``/predictions.csv (file, predicted, confidence, then every
    class's probability, or the top-``k`` beyond PROB_COLUMNS_MAX classes) or predictions.json (per image: file,
    predicted, confidence, its top-``k`` classes); with ``save_probs`` also probabilities.npy and classes.json."""
    from utils.report import predictions_table, write_predictions, write_probabilities
    out.mkdir(parents=True, exist_ok=True)
    if save_probs:
        write_probabilities(probs, names, out)
    if fmt == 'csv':
        table = predictions_table(probs, np.full(len(files), -1), list(files), list(names), k).drop(columns=['true'])
        write_predictions(table, out / 'predictions.csv')
        return out / 'predictions.csv'
    rows = [dict(file=f, predicted=top[0][0], confidence=top[0][1],
                 top_k=[dict(name=n, probability=p) for n, p in top])
            for f, top in zip(files, top_classes(probs, names, k))]
    (out / 'predictions.json').write_text(json.dumps(rows, indent=2))
    return out / 'predictions.json'


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
                 amp_dtype: Optional[torch.dtype] = None, compile_model=False, save_probs: bool = False) -> dict:
    """Predict ``samples`` (indices into ``class_names``) with the checkpoint (torch.compile'd with
    ``compile_model``, a --compile value) and write the full report (``topk`` and ``save_probs`` as
    ``write_labelled_report``'s)."""
    from utils.report import write_labelled_report
    model, meta = load_for_inference(weights_path, device, method, method_cfg_override, compile_model)
    samples, unknown = map_to_checkpoint_classes(samples, class_names, meta['class_names'])
    result = predict(model, samples, meta['data_config'], device, batch_size, workers, progress, amp_dtype)
    if len(result.paths) == 0:
        raise UserError('no image could be read; nothing to report')
    known = {path for path, _ in skipped}
    skipped = list(skipped) + [(path, why) for path, why in result.failed if path not in known]
    context = dict(checkpoint=str(weights_path), model=meta['model_name'], method=method_name(model),
                   method_cfg=method_cfg(model), unknown_classes=unknown, skipped=skipped,
                   images_per_s=result.images_per_s, method_stats=result.stats)
    return write_labelled_report(result.probs, result.targets, result.paths, meta['class_names'],
                                 Path(output_dir), context, topk, save_probs)


def scan_labelled(data_root):
    """The ``FolderScan`` of a labelled folder (its validation split in a train/val layout, said on the terminal);
    refused when it holds no image in class folders."""
    from datasets.folder import labelled_root, scan_classes
    root = labelled_root(data_root)
    if root != Path(data_root):
        print(f"scoring '{root}', the validation split of '{data_root}'")
    scan = scan_classes(root)
    if not scan.samples:
        raise UserError(f"no readable images in class folders under '{root}'; expected {root}/<class>/<image>")
    return scan


def labelled_samples(checkpoint: dict, data_root) -> List[Tuple[str, int]]:
    """The readable (path, checkpoint class index) samples of a labelled folder (for benchmark.py)."""
    scan = scan_labelled(data_root)
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
