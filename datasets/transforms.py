"""Train and eval transforms from timm, with mean/std/crop/interpolation from the model's pretrained config."""
from typing import Optional, Tuple

from timm.data import create_transform, resolve_data_config


def data_config(model, img_size: Optional[int] = None) -> dict:
    """The model's own input description (size, interpolation, mean, std, crop_pct) at ``img_size``."""
    cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg['input_size'] = (3, img_size, img_size)
    return dict(input_size=tuple(cfg['input_size']), interpolation=cfg['interpolation'],
                mean=tuple(float(m) for m in cfg['mean']), std=tuple(float(s) for s in cfg['std']),
                crop_pct=float(cfg['crop_pct']))


def train_transform(cfg: dict, auto_augment: Optional[str] = 'rand-m9-mstd0.5-inc1', re_prob: float = 0.25,
                    scale: Tuple[float, float] = (0.08, 1.0), hflip: float = 0.5):
    """RandomResizedCrop (area ``scale``), flip, RandAugment and random erasing (DeiT's recipe)."""
    return create_transform(cfg['input_size'], is_training=True, auto_augment=auto_augment or None,
                            scale=tuple(scale), hflip=hflip,
                            interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'],
                            re_prob=re_prob, re_mode='pixel')


def eval_transform(cfg: dict):
    """Resize to size / crop_pct and centre-crop, as the model was evaluated."""
    return create_transform(cfg['input_size'], is_training=False, interpolation=cfg['interpolation'],
                            mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'])
