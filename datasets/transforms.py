"""Train and eval transforms from timm, with mean/std/crop/interpolation from the model's pretrained config.

Everything timm's ``create_transform`` would do implicitly is a named setting here: its ColorJitter(0.4), which
it adds whenever RandAugment is off, is off unless ``color_jitter`` asks for it (and then applies with
RandAugment too).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from timm.data import create_transform, resolve_data_config
from timm.data.transforms_factory import transforms_imagenet_train

from utils.errors import UserError


def data_config(model, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None) -> dict:
    """The model's own input description (size, interpolation, mean, std, crop_pct) at ``img_size``; the
    eval ``crop_pct`` and ``interpolation`` may be set instead of the model's."""
    if crop_pct is not None and not 0 <= crop_pct <= 1:
        raise UserError(f'--crop-pct must be between 0 and 1 (got {crop_pct}): 1 evaluates the whole image, 0 takes '
                        f"the model's own")
    cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg['input_size'] = (3, img_size, img_size)
    return dict(input_size=tuple(cfg['input_size']), interpolation=interpolation or cfg['interpolation'],
                mean=tuple(float(m) for m in cfg['mean']), std=tuple(float(s) for s in cfg['std']),
                crop_pct=float(crop_pct or cfg['crop_pct']))


@dataclass
class Augmentation:
    """The training augmentation, each part named: random resized crop (area ``scale``, aspect ``ratio``),
    flip, RandAugment policy (``auto_augment``, '' for none), colour jitter strength (0: none), random
    erasing probability, and the resize interpolation (None: the model's; 'random' as timm). Its defaults are
    train_gpu.py's flags (``from_args``), which own them."""
    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    hflip: float
    auto_augment: str
    color_jitter: float
    re_prob: float
    interpolation: Optional[str]

    @classmethod
    def from_args(cls, args) -> 'Augmentation':
        return cls(tuple(args.scale), tuple(args.ratio), args.hflip, args.aa, args.color_jitter, args.reprob,
                   args.train_interpolation)


def train_transform(cfg: dict, aug: Augmentation):
    """timm's ImageNet training transform with every part of ``aug`` given, nothing left to its defaults."""
    return transforms_imagenet_train(tuple(cfg['input_size'][-2:]), scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                                     hflip=aug.hflip, auto_augment=aug.auto_augment or None,
                                     color_jitter=aug.color_jitter or None, force_color_jitter=aug.color_jitter > 0,
                                     interpolation=aug.interpolation or cfg['interpolation'], mean=cfg['mean'],
                                     std=cfg['std'], re_prob=aug.re_prob, re_mode='pixel')


def eval_transform(cfg: dict):
    """Resize to size / crop_pct and centre-crop, as the model was evaluated."""
    return create_transform(cfg['input_size'], is_training=False, interpolation=cfg['interpolation'],
                            mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'])
