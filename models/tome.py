"""ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

In every block, between the attention residual and the MLP, ``r`` tokens are merged away. Tokens are split by
position into set A (even) and set B (odd); each A token finds its most similar B token by cosine similarity
of the attention keys (averaged over heads), and the ``r`` A tokens with the most similar partners are merged
into them by a size-weighted average. Sizes (how many patches a token stands for) start at 1 and add up;
proportional attention adds log(size) of each key to the attention logits, so a merged token counts as the
tokens it replaced. Prefix tokens (class, registers, distillation) are never merged and stay in front.

Settings (``method_cfg``): ``r`` tokens merged per block, read as the official ``parse_r``: an int, a list
(one value per block, missing blocks 0), or a tuple ``(r, inflection)`` spreading about the same total linearly
from r(1 - inflection) to r(1 + inflection) across the blocks (-1: the paper's decreasing schedule);
``prop_attn`` proportional attention (default on, as the paper). Default r = 13, the paper's DeiT-S / ViT-S
setting (-41 % MACs). r is capped per block at (tokens - prefix) // 2. ``configure(r=...)``
changes r between forwards; ``track_source=True`` records which patches each token stands for (token maps).
"""
import argparse
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from utils.errors import MethodConfigError
from .provenance import record
from .common import attn_residual, check_attention, embed, head, maybe_checkpoint, mlp_residual, swap_class

RSetting = Union[int, Sequence[int], Tuple[int, float]]
SETTINGS = ('r', 'prop_attn', 'track_source')


def per_block_r(r: RSetting, depth: int) -> List[int]:
    """The number of tokens to merge in each of ``depth`` blocks: a list is per block, a tuple (r, inflection)."""
    if isinstance(r, list):
        return [int(v) for v in r[:depth]] + [0] * max(depth - len(r), 0)
    base, inflection = r if isinstance(r, tuple) else (r, 0)
    low = int(base * (1 - inflection))
    step = (2 * base - 2 * low) / max(depth - 1, 1)
    return [int(low + step * i) for i in range(depth)]


def parse_r_flag(values) -> RSetting:
    """``--tome-r`` values (strings from the command line, or a config file's int / list) as an r setting.

    One value: ``13`` (every block) or ``13,-1`` (r, inflection); several: one r per block (``8 8 4 4``).
    """
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    try:
        if len(values) == 1 and ',' in str(values[0]):
            base, inflection = str(values[0]).split(',')
            return int(base), float(inflection)
        rs = [int(v) for v in values]
    except ValueError:
        raise MethodConfigError(f"--tome-r {' '.join(map(str, values))}: give an int (13), one int per block (8 8 4 4) "
                         f"or r,inflection (13,-1)") from None
    return rs[0] if len(rs) == 1 else rs


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int) -> Callable:
    """Match the ``r`` most similar (even, odd) token pairs; returns ``merge(x, reduce)``.

    metric: [B, N, C] (here: head-mean keys); the first ``protected`` tokens are never merged.
    ``merge(x)`` maps any [B, N, D] tensor of these tokens to [B, N - r, D]: the protected tokens first, then
    the unmerged even tokens in their order, then the odd tokens (into which the merged ones were folded with
    ``reduce``: 'sum' for size-weighted features and sizes, 'amax' for source maps).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, : (protected + 1) // 2, :] = -torch.inf  # protected tokens in A
    scores[:, :, : protected // 2] = -torch.inf        # protected tokens in B
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    kept_a = order[:, r:].sort(dim=1).values   # sorted: protected A tokens come first
    merged_a = order[:, :r]
    into_b = partner[..., None].gather(1, merged_a)
    n_prot_a, n_prot_b = (protected + 1) // 2, protected // 2

    def merge(x: torch.Tensor, reduce: str = 'sum') -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        d = x.shape[-1]
        kept = src.gather(1, kept_a.expand(-1, -1, d))
        moved = src.gather(1, merged_a.expand(-1, -1, d))
        dst = dst.scatter_reduce(1, into_b.expand(-1, -1, d), moved, reduce=reduce)
        # protected tokens: the first of kept (A side) and of dst (B side), interleaved back in front
        prefix = torch.stack([kept[:, :n_prot_b], dst[:, :n_prot_b]], dim=2).flatten(1, 2)
        if n_prot_a > n_prot_b:
            prefix = torch.cat([prefix, kept[:, n_prot_b:n_prot_a]], dim=1)
        return torch.cat([prefix, kept[:, n_prot_a:], dst[:, n_prot_b:]], dim=1)

    return merge


def merge_tokens(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged features; sizes add up."""
    x = merge(x * size)
    size = merge(size)
    return x / size, size


class ToMeBlock:
    """A timm ViT block that merges ``r`` tokens between attention and MLP."""

    def forward(self, x: torch.Tensor, size: torch.Tensor, r: int, prop_attn: bool, protected: int,
                source: Optional[torch.Tensor] = None):
        bias = size.log()[:, None, None, :, 0] if prop_attn else None
        x, _, k = attn_residual(self, x, bias)
        r = min(r, (x.shape[1] - protected) // 2)
        if r > 0:
            merge = bipartite_soft_matching(k.mean(dim=1), r, protected)
            x, size = merge_tokens(merge, x, size)
            if source is not None:
                source = merge(source, reduce='amax')
        return mlp_residual(self, x), size, source


class ToMeVisionTransformer:
    """A timm VisionTransformer whose blocks merge tokens; sizes are passed along, never stored."""

    method_name = 'tome'

    @property
    def method_cfg(self) -> dict:
        return dict(r=self.tome_r, prop_attn=self.tome_prop_attn)

    def configure(self, **changes) -> None:
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise MethodConfigError(f'unknown ToMe setting(s) {unknown}; ToMe takes {", ".join(SETTINGS)}')
        if 'r' in changes:
            r = changes['r']
            if isinstance(r, tuple) and len(r) != 2:
                raise MethodConfigError(f'ToMe r as a tuple is (r, inflection), got {r}; pass a list for one r per block')
            if any(v < 0 for v in per_block_r(r, len(self.blocks))):
                raise MethodConfigError(f'ToMe r must be >= 0, got {r}')
            self.tome_r = r
        if 'prop_attn' in changes:
            self.tome_prop_attn = bool(changes['prop_attn'])
        if 'track_source' in changes:
            self.tome_track_source = bool(changes['track_source'])

    def method_stats(self) -> dict:
        return dict(tokens_out=float(self.tome_tokens_out)) if self.tome_tokens_out else {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self, images)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        source = None
        self.token_record = []
        if self.tome_track_source or getattr(self, 'record_tokens', False):
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        protected = self.num_prefix_tokens
        for i, (blk, r) in enumerate(zip(self.blocks, per_block_r(self.tome_r, len(self.blocks)))):
            x, size, source = maybe_checkpoint(self, blk, x, size, r, self.tome_prop_attn, protected, source)
            if getattr(self, 'record_tokens', False):  # token maps: each patch's final token, per block
                record(self, i, owner=source[:, protected:, protected:].argmax(dim=1))
        self.tome_tokens_out = int(x.shape[1])
        self.tome_source = source  # [B, tokens, prefix + patches] when tracked (token maps), else None
        return head(self, x, size)


def apply(model: nn.Module, r: RSetting = 13, prop_attn: bool = True, track_source: bool = False) -> nn.Module:
    """Turn a timm ViT into ToMe in place (weights and state-dict keys unchanged)."""
    for blk in model.blocks:
        check_attention(blk.attn)
        swap_class(blk, ToMeBlock)
    swap_class(model, ToMeVisionTransformer)
    model.tome_r, model.tome_prop_attn, model.tome_track_source = 0, True, False
    model.tome_tokens_out, model.tome_source = 0, None
    model.configure(r=r, prop_attn=prop_attn, track_source=track_source)
    return model


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--tome-r', nargs='+', default=['13'], metavar='R',
                       help='ToMe: tokens merged per block: 13, one per block (8 8 4 4 ...), or r,inflection (13,-1)')
    group.add_argument('--tome-prop-attn', action=argparse.BooleanOptionalAction, default=True,
                       help='ToMe: proportional attention (log size bias)')


def cfg_from_args(args: argparse.Namespace) -> dict:
    return dict(r=None if args.tome_r is None else parse_r_flag(args.tome_r), prop_attn=args.tome_prop_attn)
