"""What every oracle shares: the same weights and inputs for our model and the official one, and the comparison.

An oracle pits one of our methods against the method's official code (a folder the user fetched; nothing is
vendored) on the same weights: seeded random ones or a checkpoint. It reports, per setting, top-1 agreement,
the share of images whose logits agree within 1e-3 relative (max |ours - official| / max |official| per image),
the largest such difference and the paired speed. The tiny fixed case (``tiny_case``) is what the test fixtures
under tests/fixtures/ hold the official logits of, so the tests compare ours offline.
"""
import contextlib
import copy
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from datasets.folder import list_images
from datasets.images import IMAGE_EXTENSIONS, load_rgb
from datasets.transforms import data_config, eval_transform
from models import build_model
from models.registry import apply_method, new_param_prefixes
from utils.errors import UserError

TOLERANCE = 1e-3
TINY_CASE = dict(name='vit_tiny_patch16_224', kwargs=dict(img_size=64, patch_size=8, depth=4, embed_dim=64,
                                                          num_heads=2), num_classes=10, images=3, seed=0)
FIXTURES = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures'


def seeded_weights(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """A state dict for ``model`` drawn from ``seed`` alone (independent of timm's initialisation code).

    Matrices and convolutions: normal with std 1/sqrt(fan-in); norm weights 1 + 0.1 n; biases 0.1 n; class token
    and position embedding 0.5 n; so attention and the logits are far from uniform.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith('.weight') and tensor.ndim >= 2:
            state[name] = noise / math.sqrt(tensor[0].numel())
        elif name.endswith('.weight'):
            state[name] = 1 + 0.1 * noise
        elif name.endswith('.bias'):
            state[name] = 0.1 * noise
        else:
            state[name] = 0.5 * noise
    return state


def dense_model(name: str, num_classes: int, kwargs: dict, weights: Optional[str], seed: int) -> nn.Module:
    """The dense model both sides start from: ``weights`` loaded, or ``seeded_weights``."""
    model = build_model(name, num_classes=num_classes, pretrained=weights, **kwargs)
    if weights is None:
        model.load_state_dict(seeded_weights(model, seed))
    return model.eval()


def tiny_case(case: dict = TINY_CASE):
    """(dense model, input) of the fixtures: by default a 4-block, 64-dim ViT at 64 px, 64 patch tokens, 3 images."""
    model = dense_model(case['name'], case['num_classes'], case['kwargs'], None, case['seed'])
    generator = torch.Generator().manual_seed(case['seed'] + 1)
    size = case['kwargs']['img_size']
    return model, torch.randn(case['images'], 3, size, size, generator=generator)


def seed_new_params(model: nn.Module, seed: int) -> nn.Module:
    """Give the parameters a method added (``new_param_prefixes``) their ``seeded_weights`` values."""
    prefixes = new_param_prefixes(model)
    if prefixes:
        model.load_state_dict({k: v for k, v in seeded_weights(model, seed).items() if k.startswith(prefixes)},
                              strict=False)
    return model


def our_model(dense: nn.Module, method: str, cfg: dict, training: bool) -> nn.Module:
    """Our ``method`` on a copy of ``dense``; the parameters it adds take ``seeded_weights`` values (seed 0), so an
    oracle can give the official model the same ones."""
    return seed_new_params(apply_method(copy.deepcopy(dense), method, cfg), 0).train(training)


def load_images(folder: Optional[str], count: int, model: nn.Module, img_size: int, seed: int) -> torch.Tensor:
    """``count`` images of ``folder`` (sorted; the model's eval transform), or seeded random inputs without one."""
    if folder is None:
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randn(count, 3, img_size, img_size, generator=generator)
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images '{folder}' is not a folder of images")
    files = [f for f in list_images(root) if f.suffix.lower() in IMAGE_EXTENSIONS][:count]
    if not files:
        raise UserError(f"--images '{folder}' holds no image files")
    transform = eval_transform(data_config(model, img_size))
    return torch.stack([transform(load_rgb(f)) for f in files])


def load_official_file(path: Path, module_name: str, edit: Callable[[str], str] = lambda text: text):
    """Import one official source file by path (after ``edit`` of its text, in memory; nothing is written)."""
    if not path.is_file():
        raise UserError(f"'{path}' not found; pass --official-dir, the folder of the fetched official repository")
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    sys.modules[module_name] = module
    exec(compile(edit(path.read_text()), str(path), 'exec'), module.__dict__)
    return module


@contextlib.contextmanager
def scratch_cwd():
    """Run in a temporary working folder (some official code writes debug files into the current one)."""
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        yield


@torch.no_grad()
def compare(ours: Callable, official: Callable, images: torch.Tensor, batch_size: int) -> dict:
    """Logits of both on ``images`` (paired per batch, alternating which runs first) and how far they agree."""
    outs, refs, times = [], [], {'ours': [], 'official': []}
    for i, batch in enumerate(images.split(batch_size)):
        order = [('ours', ours, outs), ('official', official, refs)]
        for name, fn, sink in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            sink.append(fn(batch))
            times[name].append(time.perf_counter() - start)
    out, ref = torch.cat(outs), torch.cat(refs)
    rel = (out - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1)
    return dict(images=len(images), top1=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                within=(rel <= TOLERANCE).float().mean().item(), max_rel=rel.max().item(),
                median_rel=rel.median().item(),
                speed=sum(times['official']) / sum(times['ours']),
                ours_s=statistics.median(times['ours']), official_s=statistics.median(times['official']))


def format_row(label: str, result: dict) -> str:
    return (f"| {label} | {result['images']} | {100 * result['top1']:.1f} % | {100 * result['within']:.1f} % | "
            f"{result['max_rel']:.1e} | {result['speed']:.2f}x |")


HEADER = ('| setting | images | top-1 agreement | within 1e-3 | max rel diff | speed ours/official |\n'
          '|---|---|---|---|---|---|')


def save_fixture(method: str, cases: List[dict], logits: List[torch.Tensor]) -> Path:
    """tests/fixtures/oracle_<method>.pt: each case's settings and the official logits on ``tiny_case``."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f'oracle_{method}.pt'
    torch.save([dict(case, logits=out.clone()) for case, out in zip(cases, logits)], path)
    return path
