"""ToE: Token Expansion (Huang et al., "A General and Efficient Training for Transformer via Token
Expansion", CVPR 2024; Osilly/TokenExpansion).

A training-time method: training starts with a fraction of the image tokens and expands to all of them, so the
trained model is a plain ViT (evaluation and saved weights are unchanged). In training mode, after the first
block, a token selector keeps a subset, as the official ``TokenSelect``: it seeds every int(1 // r0)-th token,
int(n * r0) of them (r0 = ``init_keep_rate``), then for each stage up to the current one adds that stage's
increment of tokens in ``substeps`` sub-steps, each taking the tokens least similar (cosine) to those already
kept (at keep 0.75 of 196 tokens: 49 seeds, then 24 + 25 + 24 + 25); every token left out is merged (mean) into
its most similar kept token, and the remaining blocks run on the kept tokens. The stage is how many of ``steps``
(fractions of the total epochs) have passed; the keep rate is ``keep_rate[stage]``. Defaults from the paper's
DeiT-S recipe (stages at epochs 0/100/200 of 300, keep 0.5/0.75/1.0, initial 0.25, 2 sub-steps), with the stage
boundaries as fractions so they scale with --epochs (the official counts epochs). With ``global_pool='avg'`` a
kept token weighs the tokens merged into it (the official averages the kept tokens plainly).
"""
import argparse
from typing import List, Optional, Sequence

import torch
from torch import nn

from utils.errors import MethodConfigError
from .provenance import keep_remap, record
from .common import check_attention, embed, head, maybe_checkpoint, swap_class


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, n, m] cosine similarity of token sets a [B, n, C] and b [B, m, C]."""
    return (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).transpose(-1, -2)


def seed_indices(n: int, init_keep_rate: float, device) -> torch.Tensor:
    """The seeds among n image tokens, as the official: every int(1 // rate)-th token, int(n * rate) of them."""
    stride = max(int(1 // init_keep_rate), 1)
    return torch.arange(0, n, stride, device=device)[:max(int(n * init_keep_rate), 1)]


def expansion_counts(n: int, keep_rate: Sequence[float], init_keep_rate: float, stage: int,
                     substeps: int) -> List[int]:
    """Tokens added in each expansion sub-step up to ``stage`` (0-based), as the official ``token_expansion``.

    Each stage up to the current one adds its own increment, int(n * (rate - previous rate)) (the last stage:
    up to int(n * rate)), in ``substeps`` parts: ``increment // substeps``, the last part taking the rest.
    """
    increments = [rate - before for rate, before in zip(keep_rate, [init_keep_rate, *keep_rate[:-1]])]
    counts = []
    for i in range(stage + 1):
        if i == len(keep_rate) - 1:
            total = int(n * keep_rate[i]) - int(n * (init_keep_rate + sum(increments[:i])))
        else:
            total = int(n * increments[i])
        part = total // substeps
        counts += [part] * (substeps - 1) + [total - part * (substeps - 1)]
    return counts


def select_tokens(tokens: torch.Tensor, seed_idx: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Indices [B, kept] (sorted) of the image tokens [B, N, C] that ToE's selector keeps.

    The seeds, then one round per entry of ``counts`` adding that many tokens least similar (cosine) to the kept set.
    """
    b, n, _ = tokens.shape
    chosen = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    chosen[:, seed_idx] = True
    similarity = cosine(tokens, tokens)
    for count in counts:
        count = min(count, n - int(chosen[0].sum()))
        if count <= 0:
            continue
        # a token's closeness to the kept set = its highest similarity to a kept token
        closeness = similarity.masked_fill(~chosen[:, None, :], -2).amax(dim=-1).masked_fill(chosen, 3)
        chosen.scatter_(1, closeness.topk(count, dim=-1, largest=False).indices, True)
    return chosen.nonzero()[:, 1].view(b, -1)


def shrink(x: torch.Tensor, size: torch.Tensor, seed_idx: torch.Tensor, counts: Sequence[int], prefix: int):
    """Keep ToE's selection of image tokens; merge each left-out token (mean) into its most similar kept one.

    Returns (x, size, remap, kept): remap [B, old image tokens] is each old token's new index, kept [B, keep] the
    indices of the tokens kept as themselves (provenance, for token maps).
    """
    image, n = x[:, prefix:], x.shape[1] - prefix
    kept_idx = select_tokens(image.detach(), seed_idx, counts)
    keep = kept_idx.shape[1]
    if keep >= n:
        return x, size, None, None
    left = torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device).scatter(1, kept_idx, False)
    left_idx = left.nonzero()[:, 1].view(x.shape[0], n - keep)

    def take(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    kept, others = take(image, kept_idx), take(image, left_idx)
    target = cosine(others, kept).argmax(dim=-1)[..., None]
    count = torch.ones_like(kept[..., :1]).scatter_add(1, target, torch.ones_like(others[..., :1]))
    kept = kept.scatter_add(1, target.expand(-1, -1, kept.shape[-1]), others) / count
    kept_size = take(size[:, prefix:], kept_idx).scatter_add(1, target, take(size[:, prefix:], left_idx))
    remap = keep_remap(n, kept_idx, left_idx, target[..., 0])
    return torch.cat([x[:, :prefix], kept], 1), torch.cat([size[:, :prefix], kept_size], 1), remap, kept_idx


class ToEVisionTransformer:
    """A timm VisionTransformer that trains on an expanding subset of its tokens (plain ViT in evaluation)."""

    method_name = 'toe'
    token_maps_in_training = True  # its selector only acts in training

    @property
    def method_cfg(self) -> dict:
        return dict(self.toe_cfg)

    def configure(self, **changes) -> None:
        allowed = set(self.toe_cfg) | {'stage'}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise MethodConfigError(f"unknown toe setting(s) {', '.join(unknown)}; toe takes {', '.join(sorted(allowed))}")
        stage = changes.pop('stage', self.toe_stage)
        cfg = {**self.toe_cfg, **changes}
        rates, steps = [float(r) for r in cfg['keep_rate']], [float(s) for s in cfg['steps']]
        if len(rates) != len(steps) or not rates:
            raise MethodConfigError(f'toe: keep_rate ({len(rates)} values) and steps ({len(steps)} values) need one value '
                             f'per stage, e.g. --toe-keep-rate 0.5 0.75 1.0 --toe-steps 0 0.33 0.67')
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] >= 1:
            raise MethodConfigError(f'toe: steps must start at 0 and increase below 1 (fractions of training), got {steps}')
        if not all(0 < r <= 1 for r in rates) or not 0 < cfg['init_keep_rate'] <= min(rates):
            raise MethodConfigError(f"toe: keep rates must be in (0, 1] and init_keep_rate in (0, {min(rates)}], "
                             f"got {rates} and {cfg['init_keep_rate']}")
        if int(cfg['substeps']) < 1:
            raise MethodConfigError('toe: substeps must be >= 1')
        if stage is not None and not 0 <= stage < len(rates):
            raise MethodConfigError(f'toe: stage must be in 0..{len(rates) - 1}, got {stage}')
        self.toe_cfg = dict(cfg, keep_rate=rates, steps=steps, substeps=int(cfg['substeps']))
        self.toe_stage = stage

    def update_schedule(self, epoch: float, total_epochs: int) -> None:
        """The stage is the number of stage boundaries (fractions of training) passed, minus one."""
        progress = epoch / max(total_epochs, 1)
        self.toe_stage = sum(progress >= s for s in self.toe_cfg['steps']) - 1

    def keep_rate_in_force(self) -> float:
        if not self.training:
            return 1.0
        return self.toe_cfg['keep_rate'][self.toe_stage or 0]

    def method_stats(self) -> dict:
        return dict(stage=float(self.toe_stage or 0), keep_rate=self.keep_rate_in_force())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self, images)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        reducing = self.keep_rate_in_force() < 1
        cfg, n = self.toe_cfg, x.shape[1] - self.num_prefix_tokens
        self.token_record = []
        for i, blk in enumerate(self.blocks):
            x = maybe_checkpoint(self, blk, x)
            if i == 0 and reducing:
                seed_idx = seed_indices(n, cfg['init_keep_rate'], x.device)
                counts = expansion_counts(n, cfg['keep_rate'], cfg['init_keep_rate'], self.toe_stage or 0,
                                          cfg['substeps'])
                x, size, remap, kept = shrink(x, size, seed_idx, counts, self.num_prefix_tokens)
                if getattr(self, 'record_tokens', False) and remap is not None:
                    removed = torch.ones_like(remap, dtype=torch.bool).scatter_(1, kept, False)
                    seed = torch.zeros_like(removed)
                    seed[:, seed_idx] = True
                    record(self, i, owner=remap, removed=removed, seed=seed)
        return head(self, x, size if reducing else None)


def apply(model: nn.Module, keep_rate: Sequence[float] = (0.5, 0.75, 1.0), steps: Sequence[float] = (0, 0.33, 0.67),
          init_keep_rate: float = 0.25, substeps: int = 2, stage: Optional[int] = None) -> nn.Module:
    """Turn a timm ViT into ToE in place (no new parameters; evaluation is the plain ViT)."""
    for blk in model.blocks:
        check_attention(blk.attn)
    swap_class(model, ToEVisionTransformer)
    model.toe_stage = None
    model.toe_cfg = dict(keep_rate=list(keep_rate), steps=list(steps), init_keep_rate=init_keep_rate,
                         substeps=substeps)
    model.configure(stage=stage)
    return model


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--toe-keep-rate', type=float, nargs='+', default=[0.5, 0.75, 1.0],
                       help='ToE: keep rate of each stage')
    group.add_argument('--toe-steps', type=float, nargs='+', default=[0, 0.33, 0.67],
                       help='ToE: where each stage starts, as fractions of --epochs')
    group.add_argument('--toe-init-keep-rate', type=float, default=0.25,
                       help='ToE: share of tokens seeded (every int(1 // rate)-th)')
    group.add_argument('--toe-substeps', type=int, default=2, help='ToE: sub-steps in which each stage adds its tokens')


def cfg_from_args(args: argparse.Namespace) -> dict:
    return dict(keep_rate=args.toe_keep_rate, steps=args.toe_steps, init_keep_rate=args.toe_init_keep_rate,
                substeps=args.toe_substeps)
