"""GTP: Graph-based Token Propagation (Xu et al., "GTP-ViT: Efficient Vision Transformers via Graph-based
Token Propagation", WACV 2024).

In every block, after the attention residual, the ``num_prop`` least important image tokens are removed and
their features are propagated to the kept tokens over a graph instead of being discarded:
x_kept += alpha * G[kept, removed] @ x_removed. Importance comes from the attention probabilities; the default
``MixedAttnMax`` multiplies each token's self-attention (diagonal) by the attention it receives (column sum),
each reduced over heads with max. The graph is built once per image from the patch embeddings (with position):
``spatial`` 8-neighbours on the patch grid, ``semantic`` k nearest by cosine similarity, or ``mixed`` (their
union, the default), normalised as D^-1/2 A D^-1/2; removed tokens' rows and columns are dropped as the blocks
go. Each kept token carries a scale that grows by what it absorbs (alpha * G @ scale) and attention adds
log(scale) to its logits. Prefix tokens are never selected.

Defaults, from the official README (Ackesnal/GTP-ViT): num_prop 4, MixedAttnMax, GraphProp, mixed graph with
8 neighbours, alpha 0.1, token scales on, no attention sparsity. ``sparsity`` here is the fraction of
attention weights zeroed, so 0 is off; the official ``sparsity=0.6`` keeps 60 % of them, i.e. ``sparsity=0.4``
here. As in the official code, the weights below the k-th smallest of each head (k = int(N^2 * sparsity)) are
zeroed after attention dropout, and both the block's output and the token selection use what is left.
Kept tokens are reordered by importance, as in the official code (this decides ties between equally
unimportant tokens alike, e.g. importance 0 under sparsity). ``PRESETS`` holds the official README's tuned (sparsity, alpha) for each num_prop 1-14 (DeiT-B, MixedAttnMax,
mixed graph, GraphProp, token scales); ``preset(P)`` gives the settings. ``propagation='none'`` drops the tokens
(the paper's ablation).

Cost: selection needs the whole attention-probability matrix (column sums), so a propagating block computes
the attention explicitly once and takes both its output and the selection from those probabilities (computing
them beside a fused call would do the q k^T work twice: 13 % slower on a CPU); blocks that do not propagate keep
fused attention.
"""
import argparse
from typing import Tuple

import torch
from torch import nn

from utils.errors import MethodConfigError
from .provenance import follow, initial_owner, keep_remap, record
from .common import attend, check_attention, embed, head, maybe_checkpoint, mlp_residual, swap_class

SELECTIONS = ('MixedAttnMax', 'MixedAttnMean', 'IMGAttnMax', 'CLSAttnMean')
PROPAGATIONS = ('GraphProp', 'none')
GRAPHS = ('mixed', 'spatial', 'semantic')
# official README, DeiT-B: num_prop -> (official sparsity = share of attention weights kept, alpha)
PRESETS = {1: (0.8, 0.1), 2: (0.7, 0.1), 3: (0.9, 0.4), 4: (1.0, 0.4), 5: (0.6, 0.15), 6: (0.6, 0.15),
           7: (0.6, 0.1), 8: (0.6, 0.1), 9: (0.7, 0.2), 10: (0.5, 0.2), 11: (0.8, 0.3), 12: (0.8, 0.3),
           13: (0.7, 0.3), 14: (0.8, 0.3)}


def preset(num_prop: int) -> dict:
    """The official README's tuned settings for ``num_prop`` tokens per block (our sparsity = 1 - theirs)."""
    if num_prop not in PRESETS:
        raise MethodConfigError(f'gtp: no preset for num_prop {num_prop}; presets exist for {min(PRESETS)}-{max(PRESETS)}')
    kept, alpha = PRESETS[num_prop]
    return dict(num_prop=num_prop, alpha=alpha, sparsity=1 - kept)


def importance(probs: torch.Tensor, rule: str, prefix: int) -> torch.Tensor:
    """[B, image tokens] importance of each image token from attention probabilities [B, H, N, N]."""
    received = probs[..., prefix:].sum(dim=-2)                 # column sums: attention each token receives
    diagonal = probs.diagonal(dim1=-2, dim2=-1)[..., prefix:]  # each token's attention to itself
    if rule == 'MixedAttnMax':
        return diagonal.amax(dim=1) * received.amax(dim=1)
    if rule == 'MixedAttnMean':
        return diagonal.mean(dim=1) * received.mean(dim=1)
    if rule == 'IMGAttnMax':
        return received.amax(dim=1)
    if rule == 'CLSAttnMean':
        return probs[:, :, 0, prefix:].mean(dim=1)
    raise MethodConfigError(f'unknown GTP selection {rule}; choose from {SELECTIONS}')


def spatial_graph(height: int, width: int, device) -> torch.Tensor:
    """[N, N] 8-neighbour adjacency of a height x width patch grid (no self loops)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    near = ((rows[:, None] - rows[None]).abs() <= 1) & ((cols[:, None] - cols[None]).abs() <= 1)
    index = torch.arange(height * width, device=device)
    return (near & (index[:, None] != index[None])).float()


def semantic_graph(tokens: torch.Tensor, neighbours: int) -> torch.Tensor:
    """[B, N, N] adjacency linking each token to its ``neighbours`` most cosine-similar others."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    index = torch.arange(tokens.shape[1], device=tokens.device)
    similarity = (unit @ unit.transpose(-1, -2)).masked_fill(index[:, None] == index[None], -torch.inf)
    nearest = similarity.topk(min(neighbours, tokens.shape[1] - 1), dim=-1).indices
    return torch.zeros_like(similarity).scatter_(-1, nearest, 1.0)


def build_graph(tokens: torch.Tensor, kind: str, grid: Tuple[int, int], neighbours: int) -> torch.Tensor:
    """The normalised propagation graph D^-1/2 A D^-1/2 [B, N, N] of the image tokens [B, N, C]."""
    if kind == 'spatial':
        adjacency = spatial_graph(*grid, tokens.device).expand(tokens.shape[0], -1, -1)
    elif kind == 'semantic':
        adjacency = semantic_graph(tokens, neighbours)
    else:
        adjacency = torch.maximum(semantic_graph(tokens, neighbours), spatial_graph(*grid, tokens.device))
    degree = adjacency.sum(-1).clamp(min=1) ** -0.5
    return (adjacency * degree[:, :, None] * degree[:, None, :]).to(tokens.dtype)


def sparse_attention(probs: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero each head's weights below its k-th smallest, k = int(N^2 * sparsity) (no renormalisation)."""
    flat = probs.flatten(2)
    kept = 1 - sparsity  # the official is given the kept share: the same float arithmetic gives the same k
    k = max(int(flat.shape[-1] * (1 - kept)), 1)
    threshold = flat.kthvalue(k, dim=-1, keepdim=True).values[..., None]
    return probs * (probs >= threshold)


class GTPBlock:
    """A timm ViT block that propagates ``num_prop`` image tokens into the rest after attention."""

    def forward(self, x, scale, graph, num_prop: int, cfg: dict, prefix: int, owner=None):
        sparsity = cfg['sparsity']
        out, _, _, probs = attend(self.attn, self.norm1(x), scale.log()[:, None, None, :, 0],
                                  explicit=num_prop > 0 or sparsity > 0,
                                  reweight=(lambda p: sparse_attention(p, sparsity)) if sparsity > 0 else None)
        x = x + self.drop_path1(self.ls1(out))
        num_prop = min(num_prop, x.shape[1] - prefix - 1)
        if num_prop > 0:
            x, scale, graph, keep = propagate(x, scale, graph, importance(probs, cfg['selection'], prefix),
                                              num_prop, cfg, prefix)
            if owner is not None:
                owner = follow(owner, keep_remap(keep.shape[1] + num_prop, keep))
        return mlp_residual(self, x), scale, graph, owner


def propagate(x, scale, graph, rank, num_prop: int, cfg: dict, prefix: int):
    """Remove the ``num_prop`` lowest-ranked image tokens, passing their features and scales on over ``graph``."""
    order = rank.argsort(dim=-1, descending=True)
    keep = order[:, :-num_prop]  # by importance, as the official: it breaks ties (e.g. zeros under sparsity) alike
    gone = order[:, -num_prop:]
    image, image_scale = x[:, prefix:], scale[:, prefix:]

    def take(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    kept, kept_scale = take(image, keep), take(image_scale, keep)
    rows = take(graph, keep)
    if cfg['propagation'] == 'GraphProp':
        to_kept = rows.gather(2, gone[:, None, :].expand(-1, keep.shape[1], -1))  # [B, kept, removed]
        kept = kept + cfg['alpha'] * to_kept @ take(image, gone)
        kept_scale = kept_scale + cfg['alpha'] * to_kept @ take(image_scale, gone)
    graph = rows.gather(2, keep[:, None, :].expand(-1, keep.shape[1], -1))
    return (torch.cat([x[:, :prefix], kept], dim=1), torch.cat([scale[:, :prefix], kept_scale], dim=1), graph,
            keep)


class GTPVisionTransformer:
    """A timm VisionTransformer whose blocks propagate tokens; scales and graph are passed along."""

    method_name = 'gtp'

    @property
    def method_cfg(self) -> dict:
        return dict(self.gtp_cfg)

    def configure(self, **changes) -> None:
        cfg = {**self.gtp_cfg, **changes}
        unknown = sorted(set(changes) - set(self.gtp_cfg))
        if unknown:
            raise MethodConfigError(f"unknown gtp setting(s) {', '.join(unknown)}; gtp takes {', '.join(self.gtp_cfg)}")
        checks = [(cfg['num_prop'] >= 0, 'num_prop must be >= 0'),
                  (cfg['selection'] in SELECTIONS, f'selection must be one of {SELECTIONS}'),
                  (cfg['propagation'] in PROPAGATIONS, f'propagation must be one of {PROPAGATIONS}'),
                  (cfg['graph'] in GRAPHS, f'graph must be one of {GRAPHS}'),
                  (cfg['num_neighbours'] >= 1, 'num_neighbours must be >= 1'),
                  (0 <= cfg['sparsity'] < 1, 'sparsity (fraction of attention weights zeroed) must be in [0, 1)'),
                  (cfg['selection'] != 'CLSAttnMean' or self.cls_token is not None,
                   'selection CLSAttnMean needs a class token')]
        for ok, message in checks:
            if not ok:
                raise MethodConfigError(f'gtp: {message} (got {cfg})')
        self.gtp_cfg = cfg

    def method_stats(self) -> dict:
        return dict(tokens_out=float(self.gtp_tokens_out)) if self.gtp_tokens_out else {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self, images)
        prefix = self.num_prefix_tokens
        scale = x.new_ones(x.shape[0], x.shape[1], 1)
        cfg = self.gtp_cfg
        graph = None
        if cfg['num_prop'] > 0:
            grid = (images.shape[-2] // self.patch_embed.patch_size[0], images.shape[-1] // self.patch_embed.patch_size[1])
            graph = build_graph(x[:, prefix:], cfg['graph'], grid, cfg['num_neighbours'])
        self.token_record = []
        recording = getattr(self, 'record_tokens', False)
        owner = initial_owner(x.shape[0], x.shape[1] - prefix, x.device) if recording else None
        for i, blk in enumerate(self.blocks):
            x, scale, graph, owner = maybe_checkpoint(self, blk, x, scale, graph, cfg['num_prop'], cfg, prefix, owner)
            if recording:
                record(self, i, owner=owner, removed=owner < 0)
        self.gtp_tokens_out = int(x.shape[1])
        return head(self, x, scale)


def apply(model: nn.Module, num_prop: int = 4, selection: str = 'MixedAttnMax', propagation: str = 'GraphProp',
          graph: str = 'mixed', num_neighbours: int = 8, alpha: float = 0.1, sparsity: float = 0.0) -> nn.Module:
    """Turn a timm ViT into GTP in place (weights and state-dict keys unchanged)."""
    for blk in model.blocks:
        check_attention(blk.attn)
        swap_class(blk, GTPBlock)
    swap_class(model, GTPVisionTransformer)
    model.gtp_cfg = dict(num_prop=0, selection='MixedAttnMax', propagation='GraphProp', graph='mixed',
                         num_neighbours=8, alpha=0.1, sparsity=0.0)
    model.gtp_tokens_out = 0
    model.configure(num_prop=num_prop, selection=selection, propagation=propagation, graph=graph,
                    num_neighbours=num_neighbours, alpha=alpha, sparsity=sparsity)
    return model


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--gtp-num-prop', type=int, default=4, help='GTP: image tokens propagated away per block')
    group.add_argument('--gtp-selection', choices=SELECTIONS, default='MixedAttnMax', help='GTP: importance rule')
    group.add_argument('--gtp-propagation', choices=PROPAGATIONS, default='GraphProp',
                       help="GTP: 'GraphProp', or 'none' to drop the tokens")
    group.add_argument('--gtp-graph', choices=GRAPHS, default='mixed', help='GTP: propagation graph')
    group.add_argument('--gtp-neighbours', type=int, default=8, help='GTP: k of the semantic k-NN graph')
    group.add_argument('--gtp-alpha', type=float, default=0.1, help='GTP: weight of propagated features')
    group.add_argument('--gtp-sparsity', type=float, default=0.0, help='GTP: fraction of attention weights zeroed')
    group.add_argument('--gtp-preset', type=int, metavar='P', choices=sorted(PRESETS),
                       help='GTP: the official README\'s tuned num_prop, alpha and sparsity for P tokens per block '
                            '(1-14); replaces --gtp-num-prop, --gtp-alpha and --gtp-sparsity')


def cfg_from_args(args: argparse.Namespace) -> dict:
    cfg = dict(num_prop=args.gtp_num_prop, selection=args.gtp_selection, propagation=args.gtp_propagation,
               graph=args.gtp_graph, num_neighbours=args.gtp_neighbours, alpha=args.gtp_alpha,
               sparsity=args.gtp_sparsity)
    return {**cfg, **preset(args.gtp_preset)} if args.gtp_preset is not None else cfg
