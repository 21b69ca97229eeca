"""The toolkit's checkpoint format, in one place: what a checkpoint holds, how it is written and how it is read.

A checkpoint (best.pth, last.pth) holds the model's weights and everything needed to rebuild and use it without
other files: model name and timm kwargs, method and its settings, class names, the input description (size,
interpolation, mean, std, crop), and for resuming the epoch, optimizer, AMP scaler, EMA, best metric and RNG
states. Only tensors and plain Python values are stored, so it loads with ``torch.load(weights_only=True)``;
it is written atomically (``save_atomic``) and never with NaN / infinite weights (the trainer checks
``finite_state`` first, and the readers refuse them). ``read_checkpoint`` reads any weights file a user may pass
(.pth, .safetensors) and says in our own words why one does not load. Rebuilding a model from a checkpoint is
the factory's (``models.factory.load_for_inference``).
"""
import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch

from utils.atomic_write import replaced_atomically, write_failure
from utils.errors import UserError

TOOLKIT_FORMAT = 'vit-token-reduction/1'
META_KEYS = ('model_name', 'model_kwargs', 'method', 'method_cfg', 'num_classes', 'class_names', 'data_config')


ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since PyTorch 1.6 is a zip archive
LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'  # its older format: pickle protocol 2, torch's magic number


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file safely (tensors and plain values only) or fail with a clear message."""
    if os.path.isdir(path):
        inside = sorted(p.name for p in Path(path).glob('*') if p.suffix in ('.pth', '.safetensors'))
        raise UserError(f"'{path}' is a folder; give a weights file in it"
                        + (f": {', '.join(inside[:4])}" if inside else ' (it holds no .pth or .safetensors file)'))
    if not os.path.isfile(path):
        raise UserError(f"weights file '{path}' does not exist; give the path of a .pth or .safetensors file")
    try:
        with open(path, 'rb') as f:
            head = f.read(512)
    except OSError as err:
        raise UserError(f"weights file '{path}' cannot be read ({err.strerror}); check its permissions") from None
    if not head:
        raise UserError(f"'{path}' is empty (0 bytes): the download or save did not happen; download or save it again")
    try:
        if str(path).endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch / pickle / safetensors raise many types for a bad file: the file tells which
        raise UserError(_unreadable(path, head, err)) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"'{path}' holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    return ckpt


def _zip_members(path: str) -> Optional[list]:
    """The names in the zip archive ``path``, or None when its central directory is missing or damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _unreadable(path: str, head: bytes, err: Exception) -> str:
    """Why the weights file ``path`` (which starts with ``head``) failed to load with ``err``, in our words."""
    size = os.path.getsize(path)
    damaged = (f"'{path}' is truncated or damaged ({size} bytes): the download or save did not finish; "
               f"download or save it again")
    safetensors_name, torch_file = str(path).endswith('.safetensors'), head.startswith((ZIP_MAGIC, LEGACY_MAGIC))
    if safetensors_name and head[8:9] == b'{':  # a safetensors file: a little-endian header length, then JSON
        return damaged
    if safetensors_name and torch_file:
        return f"'{path}' is a PyTorch checkpoint, not a safetensors file; rename it to .pth"
    if head.startswith(ZIP_MAGIC):
        members = _zip_members(path)
        if members is None:
            return damaged
        if not any(name.endswith('data.pkl') for name in members):
            return f"'{path}' is a zip archive without a PyTorch checkpoint in it; pass the weights file itself"
    if torch_file:
        if isinstance(err, pickle.UnpicklingError):  # the safe load met a Python object other than plain values
            return (f"'{path}' holds Python objects besides tensors, and loading those could run code, which "
                    f"this toolkit never does; if you trust its source, re-save only the weights there with "
                    f"torch.save(model.state_dict(), FILE)")
        return damaged
    if not any(byte < 9 or 13 < byte < 32 for byte in head):
        return (f"'{path}' is a text file, not a checkpoint (an error page saved in place of a download?); "
                f"pass a .pth or .safetensors weights file")
    return (f"'{path}' is not a checkpoint: its {size} bytes are neither a PyTorch .pth nor a .safetensors file; "
            f"pass a weights file saved by torch.save or safetensors")


def weights_state(ckpt: dict) -> dict:
    """The state dict that a weights file holds: DeiT's ``{'model': ...}``, timm's training ``{'state_dict': ...}``,
    or the file's dict itself."""
    return ckpt.get('model', ckpt.get('state_dict', ckpt))


def is_toolkit_checkpoint(ckpt: dict) -> bool:
    return ckpt.get('format') == TOOLKIT_FORMAT


def save_atomic(obj: dict, path) -> None:
    """``torch.save`` through ``replaced_atomically``: a crash, a signal or a full disk leaves the previous file
    whole and no temporary file behind. A failed write is one line naming the file and the cause."""
    try:
        with replaced_atomically(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch's writer raises RuntimeError over the OSError of a full disk
        raise UserError(f"cannot write '{path}' ({write_failure(err)}); '{Path(path).name}' is as it was before; "
                        f"free disk space or choose another --output-dir") from None


def make_checkpoint(meta: dict, model_state: dict, **training_state) -> dict:
    """The checkpoint dict: format tag, metadata (``META_KEYS``), weights and any training state."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f'checkpoint metadata lacks {missing}')
    return dict(format=TOOLKIT_FORMAT, **{k: meta[k] for k in META_KEYS}, model=model_state, **training_state)


def finite_state(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite, with one host sync: a NaN or inf makes its
    tensor's sum NaN or inf, and summed in float64 no finite weights can overflow (no full-size temporary, unlike
    ``isfinite``: about 30 ms for deit_small on 2 CPU cores)."""
    sums = [t.sum(dtype=torch.float64) for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.isfinite(torch.stack(sums).sum())) if sums else True


def load_toolkit_checkpoint(path) -> dict:
    """Read ``path`` and check that train_gpu.py wrote it and that its weights are finite."""
    ckpt = read_checkpoint(str(path))
    if not is_toolkit_checkpoint(ckpt):
        keys = ', '.join(list(ckpt)[:5])
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (it has keys {keys} ...): it lacks the "
                        f"model name, classes and image size. Use a best.pth/last.pth written by train_gpu.py, "
                        f"pass this file to train_gpu.py --pretrained to fine-tune from it, or classify images with "
                        f"it as predict.py --model NAME --pretrained {path} --images ...")
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
