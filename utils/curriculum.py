"""Training curricula: what a run changes in its training inputs, stage by stage, around an unchanged model.

EfficientTrain (Wang et al., "EfficientTrain: Exploring Generalized Curriculum Learning for Training Visual
Backbones", ICCV 2023; the code ToE's release trains with, Osilly/TokenExpansion ToE/EfficientTrain): the run is
cut into 5 equal stages (stage k ends at epoch int(epochs / 5 * (k + 1)), as the official ``--end_epoch``). In each
stage the normalised training batch is low-pass cropped in the Fourier domain (``freq_crop``: the central
b x b frequencies, back to a b x b image) with b = 160, 160, 160, 192, 224 of 224 (here those fractions of
``--img-size``, rounded to a multiple of the patch size), and RandAugment's magnitude is 2k + 1 (``rand-m1`` ...
``rand-m9``). The model runs at b (timm's ``dynamic_img_size`` resamples the position embedding); evaluation and
checkpoints stay at the full size (the official also evaluates at b in the early stages).

The trainer asks a curriculum for its training transform once, calls ``set_epoch`` before every epoch (the stage
is a function of the epoch alone, so a resume continues it exactly) and hands it to the engine as a per-batch
input transform. RandAugment's magnitude is a shared-memory value read per image, so persistent loader workers
use the stage's magnitude without being restarted.
"""
import re
from dataclasses import dataclass, replace
from typing import Dict

import torch
from torch import nn
from timm.data.auto_augment import RandAugment

from datasets.transforms import Augmentation, train_transform
from utils.errors import UserError

CURRICULA = ('none', 'efficienttrain')
STAGES = 5
BAND_FRACTIONS = (160 / 224, 160 / 224, 160 / 224, 192 / 224, 1.0)  # the official b_list over its 224 px
DEIT_POLICY = 'rand-m9-mstd0.5-inc1'  # the official --aa, whose m the stage sets


def freq_crop(images: torch.Tensor, band: int) -> torch.Tensor:
    """Keep the lowest ``band`` x ``band`` spatial frequencies of [B, C, H, W] images: [B, C, band, band].

    FFT, centre the spectrum, take its central band x band, scale by band^2 / (H W) (the mean stays), inverse FFT,
    real part. Inputs at most ``band`` wide are returned as they are.
    """
    h, w = images.shape[-2:]
    if band >= h and band >= w:
        return images
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    top, left = h // 2 - band // 2, w // 2 - band // 2
    low = torch.fft.ifftshift(spectrum[..., top:top + band, left:left + band], dim=(-2, -1))
    return (torch.fft.ifft2(low).real * (band * band / (h * w))).to(images.dtype)


def stage_of(epoch: int, epochs: int) -> int:
    """The 0-based stage of ``epoch``: the first k with epoch < int(epochs / 5 * (k + 1))."""
    return next((k for k in range(STAGES) if epoch < int(epochs / STAGES * (k + 1))), STAGES - 1)


def band_size(stage: int, img_size: int, patch_size: int) -> int:
    """Stage ``stage``'s band: its fraction of ``img_size`` rounded to a multiple of ``patch_size`` (at least one)."""
    return min(img_size, max(patch_size, round(img_size * BAND_FRACTIONS[stage] / patch_size) * patch_size))


def magnitude(stage: int) -> int:
    """RandAugment's magnitude in stage ``stage``: 1, 3, 5, 7, 9."""
    return 2 * stage + 1


@dataclass(frozen=True)
class Stage:
    index: int
    band: int
    magnitude: int


class ScheduledRandAugment:
    """timm's ``RandAugment`` whose ops take their magnitude, per image, from a shared-memory scalar."""

    def __init__(self, rand_augment: RandAugment, value: torch.Tensor):
        self.rand_augment, self.value = rand_augment, value

    def __call__(self, img):
        for op in self.rand_augment.ops:
            op.magnitude = float(self.value)
        return self.rand_augment(img)

    def __repr__(self):
        return f'Scheduled{self.rand_augment!r}'


class Curriculum:
    """No curriculum: the transform as it is, no stage, the batch unchanged."""

    def train_transform(self, cfg: dict, aug: Augmentation):
        return train_transform(cfg, aug)

    def set_epoch(self, epoch: int) -> Dict[str, float]:
        """Enter ``epoch``'s stage; returns the log.csv columns that describe it."""
        return {}

    def check_model(self, model: nn.Module, method: str) -> None:
        """Refuse a model that cannot train under this curriculum."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


class EfficientTrain(Curriculum):
    """EfficientTrain's 5 stages over ``epochs`` at ``img_size`` (see the module docstring)."""

    def __init__(self, epochs: int, img_size: int, patch_size: int):
        self.epochs, self.img_size, self.patch_size = epochs, img_size, patch_size
        self.magnitude = torch.zeros((), dtype=torch.float64).share_memory_()
        self.stage = self.stage_at(0)

    def stage_at(self, epoch: int) -> Stage:
        k = stage_of(epoch, self.epochs)
        return Stage(k, band_size(k, self.img_size, self.patch_size), magnitude(k))

    def train_transform(self, cfg: dict, aug: Augmentation):
        """The training transform with RandAugment: the user's ``rand-`` policy, or DeiT's when --aa is empty;
        its magnitude is the stage's."""
        policy = aug.auto_augment or DEIT_POLICY
        if not policy.startswith('rand'):
            raise UserError(f"--curriculum efficienttrain schedules RandAugment's magnitude; --aa '{policy}' is not a "
                            f"rand- policy (give e.g. --aa {DEIT_POLICY}, or none)")
        transform = train_transform(cfg, replace(aug, auto_augment=re.sub(r'-m\d+', '', policy)))
        for i, t in enumerate(transform.transforms):
            if isinstance(t, RandAugment):
                transform.transforms[i] = ScheduledRandAugment(t, self.magnitude)
        return transform

    def set_epoch(self, epoch: int) -> Dict[str, float]:
        self.stage = self.stage_at(epoch)
        self.magnitude.fill_(self.stage.magnitude)
        return dict(train_curriculum_stage=float(self.stage.index), train_curriculum_band=float(self.stage.band),
                    train_curriculum_magnitude=float(self.stage.magnitude))

    def check_model(self, model: nn.Module, method: str) -> None:
        """Run one training forward at the smallest band (RNG and mode restored); refuse a method that fails."""
        band = min(band_size(k, self.img_size, self.patch_size) for k in range(STAGES))
        param = next(model.parameters())
        was_training = model.training
        try:
            with torch.random.fork_rng(devices=[param.device] if param.device.type == 'cuda' else []), \
                    torch.no_grad():
                model.train()(torch.zeros(1, 3, band, band, device=param.device, dtype=param.dtype))
        except RuntimeError as err:
            raise UserError(f"--curriculum efficienttrain trains at {band} px in its first stages and method "
                            f"'{method}' cannot run at that size ({str(err).splitlines()[0]}); use --curriculum "
                            f"none") from None
        finally:
            model.train(was_training)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return freq_crop(images, self.stage.band)


def make_curriculum(name: str, epochs: int, img_size: int, patch_size: int) -> Curriculum:
    if name == 'none':
        return Curriculum()
    if name == 'efficienttrain':
        return EfficientTrain(epochs, img_size, patch_size)
    raise UserError(f"unknown --curriculum '{name}'; choose one of: {', '.join(CURRICULA)}")
