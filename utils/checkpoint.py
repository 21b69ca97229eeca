"""Self-describing checkpoints: written atomically, readable with ``torch.load(weights_only=True)``.

A checkpoint holds the model's weights and everything needed to rebuild and use it without other files:
model name and timm kwargs, method and its settings, class names, the input description (size,
interpolation, mean, std, crop), and for resuming the epoch, optimizer, AMP scaler, EMA, best
metric and RNG states. Only tensors and plain Python values are stored.
"""
import random
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from models.factory import TOOLKIT_FORMAT, build_model, is_toolkit_checkpoint, load_backbone_state, read_checkpoint
from models.registry import apply_method
from utils.atomic_write import replaced_atomically
from utils.errors import UserError

META_KEYS = ('model_name', 'model_kwargs', 'method', 'method_cfg', 'num_classes', 'class_names', 'data_config')


def save_atomic(obj: dict, path) -> None:
    """``torch.save`` through ``replaced_atomically``: a crash, a signal or a full disk leaves the previous file
    whole and no temporary file behind. A failed write is one line naming the file and the cause."""
    try:
        with replaced_atomically(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch's writer raises RuntimeError over the OSError of a full disk
        raise UserError(f"cannot write '{path}' ({write_failure(err)}); '{Path(path).name}' is as it was before; "
                        f"free disk space or choose another --output-dir") from None


def write_failure(err: BaseException) -> str:
    """The cause of a failed write in a few words: the OS's reason where an ``OSError`` is in the chain."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(python=list(random.getstate()[1]), python_version=random.getstate()[0],
                 python_gauss=random.getstate()[2], numpy=torch.from_numpy(np_state[1].astype(np.int64)),
                 numpy_pos=int(np_state[2]), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state['python_version'], tuple(state['python']), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'], 0, 0.0))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def make_checkpoint(meta: dict, model_state: dict, **training_state) -> dict:
    """The checkpoint dict: format tag, metadata (``META_KEYS``), weights and any training state."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f'checkpoint metadata lacks {missing}')
    return dict(format=TOOLKIT_FORMAT, **{k: meta[k] for k in META_KEYS}, model=model_state, **training_state)


def finite_state(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite (one host sync)."""
    checks = [torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def load_toolkit_checkpoint(path) -> dict:
    """Read ``path`` and check that train_gpu.py wrote it and that its weights are finite."""
    ckpt = read_checkpoint(str(path))
    if not is_toolkit_checkpoint(ckpt):
        keys = ', '.join(list(ckpt)[:5])
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (it has keys {keys} ...): it lacks the "
                        f"model name, classes and image size. Use a best.pth/last.pth written by train_gpu.py, "
                        f"or pass this file to train_gpu.py --pretrained to fine-tune from it")
    if not finite_state(ckpt['model']):
        raise UserError(f"'{path}' holds NaN or infinite weights (saved from a run that diverged); use a checkpoint "
                        f"of an earlier epoch, or train again with a lower --lr")
    return ckpt


def load_resume_checkpoint(path) -> dict:
    """A last.pth to continue from: a toolkit checkpoint that holds the training state (best.pth does not)."""
    ckpt = load_toolkit_checkpoint(path)
    if 'optimizer' not in ckpt:
        last = Path(path).with_name('last.pth')
        raise UserError(f"'{path}' holds weights only, no optimizer state (a best.pth), so it cannot be resumed; "
                        f"continue the run with --resume {last}, or fine-tune from these weights with "
                        f"--pretrained {path} and a new --output-dir")
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str = 'checkpoint', method: Optional[str] = None,
                          method_cfg: Optional[dict] = None) -> nn.Module:
    """Rebuild the checkpoint's model with its weights; ``method``/``method_cfg`` may override the method.

    The backbone always loads strictly. Parameters a method added load when the method stays the same;
    another method starts its own new parameters from their initialisation.
    """
    model = build_model(ckpt['model_name'], 'none', None, num_classes=ckpt['num_classes'],
                        img_size=ckpt['data_config']['input_size'][-1], **ckpt['model_kwargs'])
    own = model.state_dict()
    state = ckpt['model']
    load_backbone_state(model, {k: v for k, v in state.items() if k in own}, source)
    same = method is None or method == ckpt['method']
    cfg = {**ckpt['method_cfg'], **(method_cfg or {})} if same else dict(method_cfg or {})
    model = apply_method(model, ckpt['method'] if same else method, cfg)
    if same:
        load_backbone_state(model, state, source)
    return model


def load_for_inference(path, device='cpu', method: Optional[str] = None,
                       method_cfg: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, checkpoint metadata) from a toolkit checkpoint."""
    ckpt = load_toolkit_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path), method, method_cfg).to(device).eval()
    meta = {k: ckpt[k] for k in META_KEYS}
    meta.update(epoch=ckpt.get('epoch'), best_metric=ckpt.get('best_metric'))
    return model, meta
