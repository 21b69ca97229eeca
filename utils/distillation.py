"""Distillation from a teacher's logits, as one loss term of the training step (``--teacher``).

Knowledge distillation (Hinton et al. 2015) trains the student on the teacher's softened class probabilities as well
as on the labels; DeiT (Touvron et al. 2021) adds a hard variant that takes the teacher's top class as a second label.
With the base loss L (cross-entropy, on Mixup/CutMix's soft targets when they are on), student logits s, teacher
logits t, weight alpha and temperature T, the loss of a step is

    soft: (1 - alpha) * L + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch
    hard: (1 - alpha) * L + alpha * CE(s, argmax t)

The soft term is timm's ``LogitDistillationTask`` (``kl_div(..., reduction='batchmean', log_target=True) * T^2``, with
``task_loss_weight = 1 - alpha``); DeiT's own soft loss divides the same sum by batch x classes instead. Defaults are
DeiT's: alpha 0.5, T 1.0. The teacher sees the student's batch as it is (mixed images too), renormalised to its own
mean and std, under the same autocast, on the same device, in eval mode and without gradients; under DDP each process
runs its own unwrapped copy on its own batch. No checkpoint holds it: a resumed run builds it again from its flags.

timm's ``DistillationTeacher`` (in timm since 1.0.28, the floor) holds the teacher: it builds a timm name with its
pretrained weights or a file, keeps it in eval mode and renormalises the input (``normalize_input``); a toolkit
checkpoint is rebuilt by ``models.factory.model_from_checkpoint`` and wrapped in it. ``LogitDistillationTask`` is
not used: it owns the student's forward and the whole loss, which here belong to the one training loop (AMP,
gradient accumulation, Mixup, a method's extra loss), so ``distillation_loss`` repeats its formula on the loop's
logits.
"""
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher

from models.checkpoint import finite_state, is_toolkit_checkpoint, read_checkpoint, weights_state
from models.factory import model_from_checkpoint
from models.pretrained import HF_HUB_PREFIX, names_a_file
from utils.errors import UserError

log = logging.getLogger('train')
DISTILL_TYPES = ('soft', 'hard')


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), the mean over the batch (Hinton et al. 2015; timm's
    ``LogitDistillationTask``)."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction='batchmean', log_target=True) * temperature ** 2


def distillation_loss(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, kind: str, alpha: float,
                      temperature: float) -> torch.Tensor:
    """The base ``loss`` and the distillation term on logits, weighted (1 - alpha) and alpha (DeiT's combination)."""
    if kind == 'soft':
        term = soft_distillation(student, teacher, temperature)
    else:  # DeiT's hard distillation: the teacher's top class is the label
        term = F.cross_entropy(student, teacher.argmax(dim=-1))
    return (1 - alpha) * loss + alpha * term


@dataclass
class Teacher:
    """A loaded teacher: timm's wrapper (eval mode, no gradients, on the device), what the user named, the classes
    it was trained on (a toolkit checkpoint's names; a timm model shows its count only) and its own input size."""
    module: DistillationTeacher
    label: str
    class_names: Optional[list]
    num_classes: int
    img_size: Optional[int]


def load_teacher(args, device: torch.device) -> Optional[Teacher]:
    """The ``--teacher`` of ``args`` (None without one), loaded onto ``device``; a flag out of range, a file that
    does not load or a name timm does not know is one line, before the run folder is made."""
    if args.teacher is None:
        if args.teacher_weights:
            raise UserError('--teacher-weights needs --teacher MODEL (the timm model the weights are for)')
        return None
    if args.curriculum != 'none':
        raise UserError(f'--teacher with --curriculum {args.curriculum} is not supported: the teacher would see the '
                        f"curriculum's smaller, low-passed images; drop one of them")
    if not 0 <= args.distill_alpha <= 1:
        raise UserError(f'--distill-alpha must be between 0 and 1 (got {args.distill_alpha}): the weight of the '
                        f'distillation term, 1 - alpha that of the labels (DeiT: 0.5)')
    if args.distill_temperature <= 0:
        raise UserError(f'--distill-temperature must be above 0 (got {args.distill_temperature}; DeiT: 1.0)')
    value = str(args.teacher)
    teacher = (_from_checkpoint if names_a_file(value) else _from_timm)(value, args.teacher_weights)
    teacher.module.to(device).requires_grad_(False).eval()
    return teacher


def _from_checkpoint(path: str, weights: Optional[str]) -> Teacher:
    """A toolkit checkpoint (e.g. the dense run's best.pth) rebuilt with its own method and settings."""
    if weights:
        raise UserError(f"--teacher-weights is for a timm model name; the checkpoint '{path}' holds its own weights")
    ckpt = read_checkpoint(path)
    if not is_toolkit_checkpoint(ckpt):
        raise UserError(f"--teacher '{path}' is not a checkpoint of train_gpu.py (it has keys "
                        f"{', '.join(list(ckpt)[:4])} ...); for timm/DeiT weights give --teacher MODEL "
                        f"--teacher-weights {path}")
    if not finite_state(ckpt['model']):
        raise UserError(f"--teacher '{path}' holds NaN or infinite weights (saved from a run that diverged)")
    model = model_from_checkpoint(ckpt, path)
    cfg = ckpt['data_config']  # the mean and std the teacher was trained with, for DistillationTeacher to read
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(cfg['mean']), std=tuple(cfg['std']))
    return Teacher(DistillationTeacher(model), path, list(ckpt['class_names']), ckpt['num_classes'],
                   cfg['input_size'][-1])


def _from_timm(name: str, weights: Optional[str]) -> Teacher:
    """A timm model (``MODEL[.TAG]`` or ``hf-hub:ORG/NAME``) with the ``weights`` file, or with its own pretrained
    weights. The class count is that of the weights' classifier, so that timm loads it instead of replacing it (it
    replaces a head whose count differs from the one asked for, silently)."""
    if not name.startswith(HF_HUB_PREFIX) and not timm.is_model(name):
        raise UserError(f"--teacher '{name}' is neither a file nor a model timm knows; give a best.pth of this "
                        f"toolkit, a timm name (timm.list_models()) with --teacher-weights FILE, or hf-hub:ORG/NAME")
    try:
        num_classes = _weights_classes(name, weights) if weights else None
        module = DistillationTeacher(name, num_classes=num_classes,
                                     pretrained_path=os.path.abspath(weights) if weights else None)
    except UserError:  # a weights file that does not read, in read_checkpoint's words
        raise
    except Exception as err:  # timm, torch and huggingface_hub raise many types for weights that do not load
        detail = (str(err).strip().splitlines() or [type(err).__name__])[-1].split('. ')[0][:200]
        raise UserError(f"--teacher {name}{f' with {weights}' if weights else ''} does not load: {detail}") from None
    model = module.model
    return Teacher(module, name, None, model.num_classes, model.pretrained_cfg.get('input_size', (None,))[-1])


def _weights_classes(name: str, weights: str) -> int:
    """The number of classes of the classifier that the weights file holds for timm model ``name``."""
    state = weights_state(read_checkpoint(weights))  # one line for a file that is missing or does not load
    with torch.device('meta'):  # the classifier's name, without memory or time
        head = timm.create_model(name).pretrained_cfg.get('classifier', 'head')
    key = f"{head[0] if isinstance(head, (tuple, list)) else head}.weight"
    if key not in state:
        raise UserError(f"--teacher-weights '{weights}' holds no classifier {key} of {name}; give the weights of "
                        f"{name} fine-tuned on these classes")
    return state[key].shape[0]


class Distillation:
    """The loss term the training loop calls after the student's forward: ``term(images, logits, loss)`` is the
    loss with distillation (see the module). It times the teacher's forwards (CUDA events on a GPU, so no step
    waits for them); ``epoch_stats`` gives this process's seconds of the epoch, as log.csv's train_teacher_seconds."""

    def __init__(self, teacher: DistillationTeacher, kind: str, alpha: float, temperature: float,
                 mean, std, device: torch.device):
        self.teacher, self.kind, self.alpha, self.temperature = teacher, kind, alpha, temperature
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)  # the student's normalisation
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self._seconds, self._events = 0.0, []

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of the student's batch, renormalised to the teacher's mean and std."""
        if not images.is_cuda:
            began = time.perf_counter()
            logits = self.teacher(self.teacher.normalize_input(images, self.mean, self.std))
            self._seconds += time.perf_counter() - began
            return logits
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = self.teacher(self.teacher.normalize_input(images, self.mean, self.std))
        end.record()
        self._events.append((start, end))
        return logits

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return distillation_loss(loss, logits.float(), self.teacher_logits(images).float(), self.kind, self.alpha,
                                 self.temperature)

    def epoch_stats(self) -> dict:
        """The teacher's seconds since the last call (then starts again from 0)."""
        if self._events:
            self._events[-1][1].synchronize()
        seconds = self._seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1000
        self._seconds, self._events = 0.0, []
        return dict(train_teacher_seconds=seconds)


def make_distillation(teacher: Optional[Teacher], args, classes, data_config: dict,
                      device: torch.device) -> Optional[Distillation]:
    """The loss term of ``teacher`` for a run on ``classes`` with inputs ``data_config`` (the student's), or None
    without a teacher. A teacher of other classes, or one that cannot take the run's image size, is one line."""
    if teacher is None:
        return None
    if teacher.class_names is not None and teacher.class_names != list(classes):
        raise UserError(f"--teacher '{teacher.label}' was trained on the classes {teacher.class_names[:6]}, this data "
                        f"has {list(classes)[:6]}; distil from a run on the same class folders")
    if teacher.num_classes != len(classes):
        raise UserError(f"--teacher {teacher.label} predicts {teacher.num_classes} classes, this data has "
                        f"{len(classes)}; give --teacher-weights fine-tuned on these classes, or a best.pth of this "
                        f"toolkit")
    size = data_config['input_size'][-1]
    try:
        with torch.no_grad():
            teacher.module(torch.zeros(1, *data_config['input_size'], device=device))
    except (RuntimeError, AssertionError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"--teacher {teacher.label} cannot take this run's {size}x{size} images ({detail}); train "
                        f"with --img-size {teacher.img_size}, or give a teacher that takes {size}x{size}") from None
    log.info(f"distillation: {args.distill_type}, alpha {args.distill_alpha}, temperature {args.distill_temperature}, "
             f"from --teacher {teacher.label} ({sum(p.numel() for p in teacher.module.parameters()) / 1e6:.1f}M "
             f"parameters, eval mode, no gradients)")
    return Distillation(teacher.module, args.distill_type, args.distill_alpha, args.distill_temperature,
                        data_config['mean'], data_config['std'], device)
