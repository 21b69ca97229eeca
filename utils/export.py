"""Export a toolkit checkpoint, token reduction included, to ONNX or TorchScript, and check the file.

The exported graph takes a float32 batch [B, 3, H, W] already normalised as the checkpoint's eval transform does
(resize, centre crop, mean / std: all in the ``.json`` written beside it) and returns the logits [B, classes].
ToMe, GTP and MTViT keep a fixed number of tokens per block for a given input size and settings, so their
graphs are static; ToE is a plain ViT at inference. DGE is refused: its router picks per image how many queries
each block runs, a data-dependent shape that a traced graph would freeze at the example image's routing.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript); TorchScript through
``torch.jit.trace``. The legacy TorchScript-based ONNX exporter (``dynamo=False``) exports 5-10x faster but has
no opset-18 form of MTViT's antialiased resize (``aten::_upsample_bilinear2d_aa``) and traces DGE's routing
without complaint, frozen; torch.export exports dense, ToMe, GTP, MTViT and ToE, and stops on DGE's
data-dependent shapes (``GuardOnDataDependentSymNode``). After writing, the file is run (onnxruntime, or
``torch.jit.load``) on the same inputs as the PyTorch model and the largest difference of their probabilities
is reported.
"""
import importlib
import json
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import timm
import torch
from torch import nn

from models.registry import method_cfg, method_name
from utils.atomic_write import replaced_atomically, write_failure
from utils.errors import UserError
from utils.profiling import images_per_second

FORMATS = ('onnx', 'torchscript')
SUFFIX = dict(onnx='.onnx', torchscript='.pt')
OPSET = 18
TOLERANCE = 1e-3  # largest allowed difference of any class probability


def require_onnx() -> None:
    """Fail in one line when the optional export requirements are missing."""
    try:
        for name in ('onnx', 'onnxscript', 'onnxruntime'):
            importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"ONNX export needs onnx, onnxscript and onnxruntime ({err.name} is missing): "
                        f"pip install -r requirements-export.txt") from None


def check_exportable(model: nn.Module) -> None:
    if method_name(model) == 'dge':
        raise UserError("a DGE model cannot be exported: its routers choose per image how many queries each block "
                        "runs, a data-dependent shape torch.export cannot put in a graph (a traced one would freeze "
                        "one image's routing); serve it with PyTorch (models.factory.load_for_inference / "
                        "predict.py), or export the dense model (--method none)")


def export_model(model: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool) -> None:
    """Write ``model`` traced on ``example`` to ``path``; the batch size stays free with ``dynamic_batch``."""
    check_exportable(model)
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # the exporters' notes on traced control flow
        if fmt == 'torchscript':
            torch.jit.save(torch.jit.trace(model, example), str(path))
            return
        require_onnx()
        dynamic = ({0: torch.export.Dim('batch', min=1)},) if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=['images'],
                          output_names=['logits'], dynamic_shapes=dynamic, external_data=False, verbose=False)


def load_runner(path: Path, fmt: str) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from a normalised batch to the exported file's logits."""
    if fmt == 'torchscript':
        module = torch.jit.load(str(path)).eval()

        def run(batch):
            with torch.no_grad():
                return module(batch).numpy()
        return run
    require_onnx()
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch (benchmark.py --threads)
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.numpy()})[0]


def onnxruntime_images_per_second(model: nn.Module, batch: torch.Tensor, runs: int, warmup: int) -> float:
    """images/s of ``model`` exported to ONNX at ``batch``'s shape and run by onnxruntime on the CPU
    (NaN for a model that cannot be exported)."""
    import copy
    import tempfile
    try:
        check_exportable(model)
    except UserError:
        return float('nan')
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'model.onnx'
        batch = batch.cpu()
        export_model(copy.deepcopy(model).cpu(), batch, path, 'onnx', dynamic_batch=False)
        run = load_runner(path, 'onnx')
        return images_per_second(lambda: run(batch), len(batch), runs, warmup)


@dataclass
class Agreement:
    images: int
    max_prob_diff: float
    top1_agreement: float

    def __str__(self):
        return (f'{self.images} images: max probability difference {self.max_prob_diff:.2e}, '
                f'top-1 agreement {self.top1_agreement * 100:.1f}%')


def compare(model: nn.Module, run: Callable, images: torch.Tensor, batch_size: int) -> Agreement:
    """The exported ``run`` against ``model`` on ``images``, in batches of ``batch_size`` (the last one filled up
    with the first images when the graph's batch size is fixed)."""
    ours, theirs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        kept = len(batch)
        batch = torch.cat([batch, images[:batch_size - kept]]) if kept < batch_size else batch
        with torch.no_grad():
            ours.append(model(batch).float().softmax(1)[:kept])
        theirs.append(torch.from_numpy(run(batch)).float().softmax(1)[:kept])
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    return Agreement(len(ours), float((ours - theirs).abs().max()),
                     float((ours.argmax(1) == theirs.argmax(1)).float().mean()))


def sidecar(meta: dict, model: nn.Module, fmt: str, input_size: Sequence[int], batch: Optional[int]) -> dict:
    """What a serving stack needs to feed the file: the input description, the classes, and what made it."""
    cfg = meta['data_config']
    return dict(format=fmt, input_name='images', output_name='logits', input_size=list(input_size),
                batch_size=batch if batch else 'dynamic', mean=list(cfg['mean']), std=list(cfg['std']),
                interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'], classes=list(meta['class_names']),
                model=meta['model_name'], model_kwargs=meta['model_kwargs'], method=method_name(model),
                method_cfg=method_cfg(model), opset=OPSET if fmt == 'onnx' else None,
                torch=torch.__version__, timm=timm.__version__, python=platform.python_version())


def write_sidecar(path: Path, info: dict) -> Path:
    target = path.with_name(path.name + '.json')
    with replaced_atomically(target, 'w') as f:
        f.write(json.dumps(info, indent=2, default=str))
    return target


def input_batch(files: Sequence[str], data_config: dict, count: int) -> torch.Tensor:
    """``count`` images to check the file on: ``files`` through the eval transform, else seeded noise."""
    size = data_config['input_size']
    if not files:
        return torch.randn(count, *size, generator=torch.Generator().manual_seed(0))
    from datasets.images import try_load_rgb
    from datasets.transforms import eval_transform
    transform = eval_transform(data_config)
    loaded = [transform(img) for img in map(try_load_rgb, files) if img is not None]
    if not loaded:
        raise UserError('none of the --check-images could be read')
    return torch.stack(loaded)


def export_checkpoint(weights: str, fmt: str, output: Optional[str] = None, method: Optional[str] = None,
                      cfg: Optional[dict] = None, batch_size: int = 1, dynamic_batch: bool = False,
                      img_size: Optional[int] = None, check_files: Sequence[str] = (),
                      check_count: int = 8) -> dict:
    """Export ``weights`` (a toolkit checkpoint, its method optionally overridden) and check the file;
    returns the sidecar written beside it, with the check's figures."""
    from models.factory import load_for_inference
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == 'onnx':
        require_onnx()
    model, meta = load_for_inference(weights, 'cpu', method, cfg)
    check_exportable(model)
    data_config = dict(meta['data_config'])
    if img_size and img_size != data_config['input_size'][-1]:
        model.set_input_size(img_size=(img_size, img_size))  # resamples the position embedding
        data_config['input_size'] = (3, img_size, img_size)
    path = Path(output) if output else Path(weights).with_suffix(SUFFIX[fmt])
    if path.resolve() == Path(weights).resolve():
        raise UserError(f"--output '{path}' is the checkpoint itself; choose another file name")
    if path.is_dir():
        raise UserError(f"--output '{path}' is a folder; give a file name, e.g. {path / ('model' + SUFFIX[fmt])}")
    images = input_batch(check_files, data_config, check_count)
    example = images[:2] if dynamic_batch else images[torch.arange(batch_size) % len(images)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as staged_file:  # the exporter writes its temporary file, renamed once checked
            staged = Path(staged_file.name)
            try:
                export_model(model, example, staged, fmt, dynamic_batch)
            except UserError:
                raise
            except Exception as err:  # the exporter's own failure, named in one line
                first = str(err).strip().splitlines()[0] if str(err).strip() else ''
                raise UserError(f"{fmt} export of {meta['model_name']} + {method_name(model)} failed: "
                                f"{type(err).__name__}: {first[:300]}; '{path}' is as it was") from None
            agreement = compare(model, load_runner(staged, fmt), images, len(example) if not dynamic_batch else 5)
            if agreement.max_prob_diff > TOLERANCE or agreement.top1_agreement < 1:
                raise UserError(f"the {fmt} file does not reproduce the PyTorch model ({agreement}), so it was not "
                                f"written; please report the model, method and settings")
            info = sidecar(meta, model, fmt, data_config['input_size'], None if dynamic_batch else batch_size)
            info['check'] = dict(images=agreement.images, max_prob_diff=agreement.max_prob_diff,
                                 top1_agreement=agreement.top1_agreement)
            info['sidecar'] = str(write_sidecar(path, info))
    except OSError as err:  # a folder it may not write, a full disk
        raise UserError(f"cannot write '{path}' ({write_failure(err)}); nothing there was changed; free disk space "
                        f"or choose another --output") from None
    info['file'] = str(path)
    return info
