"""DGE: Dynamic Grained Encoder (Song et al., "Dynamic Grained Encoder for Vision Transformers", NeurIPS 2021;
StevenGrove/vtpack), in plain PyTorch.

In every block the queries are sparse and the keys/values dense. The token grid is cut into regions of
``region`` x ``region`` tokens; a per-block router (the region's mean block input x, a linear layer, one logit per
split, as vtpack's DynamicRouter) picks for each region one split s of ``splits`` (any order, any divisors of
``region``): the region's tokens are average-pooled into s x s queries (s = region: every token is a query). The
block runs attention with those queries against the keys/values of all tokens, and the MLP on the queries only;
each query's update (output - pooled input) is added to every token of its cell. Prefix tokens are always
queries. Training samples the split with hard Gumbel-softmax (straight-through), inference takes the argmax.

The budget is vtpack's: the ratio of the blocks' dynamic to static complexity as vtpack counts it
(``DGEBlock.complexity``: dense keys/values, norms, softmax and routers included), and the budget loss
``loss_weight * (ratio - budget)^2`` (``extra_loss``) as in vtpack's engine.py. ``method_stats`` logs that ratio
(``compute_ratio``) and the share of image queries (``query_share``). The router starts as vtpack's: weight
trunc-normal (std 0.01), bias giving probability ``init_finest_prob`` (0.95) to the finest split and the rest
shared equally, so training starts near the dense model. Defaults: budget 0.5, region 4, splits (4, 2, 1),
loss weight 1.0 (vtpack's DeiT configs). best.pth is chosen among the epochs whose validation ratio is within
``BUDGET_TOLERANCE`` (0.02) of the budget or under it (``within_budget``).

Grids that do not divide into regions (224 px at patch 16: 14 x 14) are handled without padding tokens: the last
row/column of regions is smaller, a cell is pooled over the tokens it really holds, and cells holding none do not
exist, so nothing padded enters keys, values or outputs. Two execution paths give the same numbers: ``masked``
(training: every split's queries are computed and the router's one-hot gates pick per region, which is simple to
differentiate) and ``packed`` (inference: only the splits in use are pooled, and the chosen queries of the whole
batch are packed into one [queries, C] tensor for the projections and the MLP, padded per image only inside
attention, so the work falls with the routing actually taken). ``routing_macs`` gives the MACs of a forward
from the routing it took.
"""
import argparse
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import MethodConfigError
from .provenance import record
from .common import attend, check_attention, embed, head, maybe_checkpoint, swap_class

BUDGET_TOLERANCE = 0.02  # an epoch whose validation complexity ratio is at most budget + this keeps the budget

PATHS = ('auto', 'masked', 'packed')


@dataclass
class Geometry:
    """Index maps of one token grid: for each split, the cell of every token and the region of every cell."""
    num_regions: int
    region_of_token: torch.Tensor       # [N] region of each image token
    region_size: torch.Tensor           # [regions] tokens in each region
    cell_of_token: List[torch.Tensor]   # per split: [N] cell index of each image token
    cell_region: List[torch.Tensor]     # per split: [cells] region of each cell
    cell_size: List[torch.Tensor]       # per split: [cells] tokens in each cell
    queries: torch.Tensor               # [splits, regions] number of queries each region gets at each split

    @staticmethod
    def build(height: int, width: int, region: int, splits: Sequence[int], device) -> 'Geometry':
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        regions_w = math.ceil(width / region)
        region_of = (rows // region) * regions_w + cols // region
        num_regions = math.ceil(height / region) * regions_w
        cells, owners, sizes, queries = [], [], [], []
        for s in splits:
            side = region // s
            cells_w = math.ceil(width / side)
            raw = (rows // side) * cells_w + cols // side
            used, cell = raw.unique(return_inverse=True)  # only cells that hold tokens
            owner = torch.zeros(len(used), dtype=torch.long, device=device).scatter_(0, cell, region_of)
            cells.append(cell)
            owners.append(owner)
            sizes.append(torch.bincount(cell, minlength=len(used)))
            queries.append(torch.bincount(owner, minlength=num_regions))
        return Geometry(num_regions, region_of, torch.bincount(region_of, minlength=num_regions), cells, owners, sizes,
                        torch.stack(queries).float())


def pool(x: torch.Tensor, cell: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean of the image tokens x [B, N, C] over each cell -> [B, cells, C]."""
    if len(size) == x.shape[1]:  # one token per cell (the finest split): the cells are the tokens, in order
        return x
    summed = x.new_zeros(x.shape[0], len(size), x.shape[-1]).index_add_(1, cell, x)
    return summed / size[None, :, None].to(x.dtype)


def sparse_query_block(block: nn.Module, queries: torch.Tensor, normed_tokens: Optional[torch.Tensor] = None,
                       layout: Optional[tuple] = None) -> torch.Tensor:
    """The timm block run for ``queries`` attending to all tokens (given after ``norm1``, [B, T, C]; None: the
    queries are the tokens); returns the update (output - queries).

    ``queries`` is [B, M, C], or, with ``layout = (image, slot, M)``, the queries of the whole batch packed as
    [Q, C] (see ``common.attend``): projections and the MLP then run on exactly the Q queries.
    """
    out, _, _, _ = attend(block.attn, block.norm1(queries), context=normed_tokens, layout=layout)
    update = block.drop_path1(block.ls1(out))
    return update + block.drop_path2(block.ls2(block.mlp(block.norm2(queries + update))))


def spread_cells(update: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Each cell's update [B, cells, C] copied to the tokens it holds -> [B, N, C]."""
    return update if update.shape[1] == len(cell) else update[:, cell]


class DGEBlock:
    """A timm ViT block with dynamic-grained queries; ``self.router`` picks a split per region."""

    def route(self, x: torch.Tensor, geo: Geometry, prefix: int, forced: Optional[torch.Tensor]) -> torch.Tensor:
        """One-hot gates [B, regions, splits] from each region's mean block input: Gumbel (training), argmax
        (inference) or ``forced`` indices."""
        if forced is not None:
            return F.one_hot(forced, geo.queries.shape[0]).to(x.dtype)
        logits = self.router(pool(x[:, prefix:], geo.region_of_token, geo.region_size))
        if self.training:
            return F.gumbel_softmax(logits.float(), tau=1.0, hard=True).to(x.dtype)
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(x.dtype)

    def complexity(self, tokens: int, queries: torch.Tensor, region: int) -> torch.Tensor:
        """vtpack's complexity count of this block (deit_dge.py Block/Attention/Mlp.complexity plus
        DynamicRouter.complexity) for ``tokens`` inputs and ``queries`` queries, prefix tokens in both."""
        c, heads, hidden = self.attn.attn_dim, self.attn.num_heads, self.mlp.fc1.out_features
        fixed = 2 * tokens * c + 2 * tokens * c * c               # norm1 and norm2, dense keys/values
        fixed = fixed + tokens / region ** 2 * c * (1 + self.router.out_features)  # router pooling and gate
        per_query = 2 * c * c + 2 * tokens * c + 3 * tokens * heads + 2 * c * hidden + hidden  # q, proj,
        return fixed + queries * per_query                        # attention, softmax, MLP and its activation

    def forward(self, x: torch.Tensor, geo: Geometry, prefix: int, path: str, forced: Optional[torch.Tensor]):
        normed = self.norm1(x)  # the keys/values read norm1(x)
        gates = self.route(x, geo, prefix, forced)                       # [B, regions, splits]
        used = (gates * geo.queries.T[None].to(gates.dtype)).sum(dim=(1, 2))  # image queries per image
        run = self._masked if path == 'masked' else self._packed
        return run(x, normed, gates, geo, prefix), used, gates.argmax(dim=-1)

    def _masked(self, x, normed, gates, geo: Geometry, prefix: int) -> torch.Tensor:
        """Every cell of every split is a query; the gates keep the chosen ones (and carry the routers' gradient)."""
        image = x[:, prefix:]
        pooled = [pool(image, cell, size) for cell, size in zip(geo.cell_of_token, geo.cell_size)]
        update = sparse_query_block(self, torch.cat([x[:, :prefix], *pooled], dim=1), normed)
        spread, start = 0, prefix
        for s, (cell, cells) in enumerate(zip(geo.cell_of_token, pooled)):  # each cell's gated update to its tokens
            gated = update[:, start:start + cells.shape[1]] * gates[:, geo.cell_region[s], s, None]
            spread = spread + spread_cells(gated, cell)
            start += cells.shape[1]
        return torch.cat([x[:, :prefix] + update[:, :prefix], image + spread], dim=1)

    def _packed(self, x, normed, gates, geo: Geometry, prefix: int) -> torch.Tensor:
        """Only the chosen queries of the whole batch, packed into one [queries, C] tensor: prefix tokens first,
        then the chosen cells split by split; each token then takes the update of the query that covers it."""
        bsz, image = x.shape[0], x[:, prefix:]
        splits = gates.amax(dim=(0, 1)).nonzero()[:, 0].tolist()        # the splits some region uses
        if len(splits) == 1 and len(geo.cell_size[splits[0]]) == image.shape[1]:  # one query per token
            return x + sparse_query_block(self, x)
        queries = [x[:, :prefix].reshape(-1, x.shape[-1])]              # the prefix tokens, image by image
        owners = [torch.arange(bsz, device=x.device).repeat_interleave(prefix)]
        slots = [torch.arange(prefix, device=x.device).repeat(bsz)]
        token_row = torch.zeros_like(geo.region_of_token).expand(bsz, -1)
        start, taken = bsz * prefix, torch.full((bsz,), prefix, device=x.device)
        for s in splits:
            chosen = gates[:, geo.cell_region[s], s] > 0.5               # [B, cells] the cells that are queries
            queries.append(pool(image, geo.cell_of_token[s], geo.cell_size[s])[chosen])
            owner, cell = chosen.nonzero(as_tuple=True)
            owners.append(owner)
            slots.append(taken[owner] + chosen.cumsum(dim=1)[owner, cell] - 1)
            row = torch.full(chosen.shape, -1, device=x.device)
            row[owner, cell] = start + torch.arange(len(owner), device=x.device)  # the cell's row among the queries
            token_row = torch.maximum(token_row, row[:, geo.cell_of_token[s]])  # each token: its query's row
            start, taken = start + len(owner), taken + chosen.sum(dim=1)
        layout = (torch.cat(owners), torch.cat(slots), int(taken.max()))
        update = sparse_query_block(self, torch.cat(queries), normed, layout)
        prefix_update = update[:bsz * prefix].view(bsz, prefix, x.shape[-1])
        return torch.cat([x[:, :prefix] + prefix_update, image + update[token_row]], dim=1)


class DGEVisionTransformer:
    """A timm VisionTransformer whose blocks use dynamic-grained queries."""

    method_name = 'dge'
    # the routers start far from the budget (p = 0.95 finest) and Adam moves a bias by about lr per step, so
    # they learn at 100x the backbone's rate (no weight decay) to reach the budget within a short fine-tune
    new_param_lr_scale = 100.0

    @property
    def method_cfg(self) -> dict:
        return dict(self.dge_cfg)

    @property
    def new_param_prefixes(self) -> tuple:
        return tuple(f'blocks.{i}.router.' for i in range(len(self.blocks)))

    def configure(self, **changes) -> None:
        """Settings (budget, loss_weight), plus run-time controls: force_split ('finest', 'coarsest', a split or
        None), routing (a [blocks, B, regions] tensor of split indices, or None) and path (auto/masked/packed)."""
        controls = {'force_split', 'routing', 'path'}
        unknown = sorted(set(changes) - set(self.dge_cfg) - controls)
        if unknown:
            raise MethodConfigError(f"unknown dge setting(s) {', '.join(unknown)}; dge takes "
                             f"{', '.join(list(self.dge_cfg) + sorted(controls))}")
        fixed = [k for k in ('region', 'splits', 'init_finest_prob') if k in changes and changes[k] != self.dge_cfg[k]]
        if fixed:
            raise MethodConfigError(f'dge: {fixed} are fixed when the model is built; build it again to change them')
        splits = self.dge_cfg['splits']
        force = changes.get('force_split', self.dge_force)
        if force not in (None, 'finest', 'coarsest') and force not in splits:
            raise MethodConfigError(f"dge: force_split must be None, 'finest', 'coarsest' or one of {splits}, got {force}")
        if changes.get('path', self.dge_path) not in PATHS:
            raise MethodConfigError(f'dge: path must be one of {PATHS}')
        cfg = {**self.dge_cfg, **{k: v for k, v in changes.items() if k not in controls}}
        if not 0 < cfg['budget'] <= 1 or cfg['loss_weight'] < 0:
            raise MethodConfigError(f"dge: budget must be in (0, 1] and loss_weight >= 0, got {cfg['budget']}, {cfg['loss_weight']}")
        self.dge_cfg, self.dge_force = cfg, force
        self.dge_routing = changes.get('routing', self.dge_routing)
        self.dge_path = changes.get('path', self.dge_path)

    def _forced(self, index: int, batch: int, regions: int, device) -> Optional[torch.Tensor]:
        if self.dge_routing is not None:
            return self.dge_routing[index].to(device)
        if self.dge_force is None:
            return None
        splits = list(self.dge_cfg['splits'])
        choice = {'finest': splits.index(max(splits)), 'coarsest': splits.index(min(splits))}.get(
            self.dge_force, splits.index(self.dge_force) if self.dge_force in splits else 0)
        return torch.full((batch, regions), choice, dtype=torch.long, device=device)

    def geometry(self, height: int, width: int, device) -> Geometry:
        key = (height, width, str(device))
        if key not in self.dge_geometry:
            self.dge_geometry[key] = Geometry.build(height, width, self.dge_cfg['region'], self.dge_cfg['splits'], device)
        return self.dge_geometry[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed(self, images)
        p = self.patch_embed.patch_size
        geo = self.geometry(images.shape[-2] // p[0], images.shape[-1] // p[1], x.device)
        path = self.dge_path if self.dge_path != 'auto' else ('masked' if self.training else 'packed')
        if path == 'packed' and self.training and torch.is_grad_enabled():
            raise MethodConfigError("dge: the packed path is for inference (it gives the routers no gradient and would drop "
                             "paths per query); train with path 'auto' or 'masked'")
        prefix, used = self.num_prefix_tokens, []
        self.token_record = []
        for i, blk in enumerate(self.blocks):
            forced = self._forced(i, x.shape[0], geo.num_regions, x.device)
            x, n, choice = maybe_checkpoint(self, blk, x, geo, prefix, path, forced)
            used.append(n)
            if getattr(self, 'record_tokens', False):  # token maps: the split chosen for each patch's region
                splits = torch.tensor(self.dge_cfg['splits'], device=x.device)
                record(self, i, grain=splits[choice][:, geo.region_of_token])
        tokens, region = x.shape[1], self.dge_cfg['region']
        dynamic = sum(blk.complexity(tokens, prefix + n.float(), region) for blk, n in zip(self.blocks, used))  # [B]
        static = sum(blk.complexity(tokens, tokens, region) for blk in self.blocks)
        ratio = dynamic / static                                         # [B] vtpack's complexity ratio
        share = torch.stack(used, dim=1).mean(dim=1) / (tokens - prefix)  # [B] share of image queries
        self.dge_last_ratio = ratio.mean() if self.training else None
        self.dge_sums += torch.stack([ratio.detach().sum(), share.detach().sum()]).double().cpu()
        self.dge_count += int(ratio.shape[0])
        return head(self, x)

    def extra_loss(self) -> Optional[torch.Tensor]:
        """vtpack's budget loss on the complexity ratio of the last training forward."""
        if self.dge_last_ratio is None or self.dge_force is not None or self.dge_routing is not None:
            return None
        return self.dge_cfg['loss_weight'] * (self.dge_last_ratio - self.dge_cfg['budget']) ** 2

    def within_budget(self, val_stats: dict) -> bool:
        """The validation complexity ratio at most the budget plus BUDGET_TOLERANCE (the budget loss holds the
        ratio near the budget, not under it)."""
        ratio = val_stats.get('val_compute_ratio')
        return ratio is None or ratio <= self.dge_cfg['budget'] + BUDGET_TOLERANCE

    def method_stats(self) -> dict:
        """Means since the last call (then reset): vtpack's complexity ratio, which the budget holds
        (``compute_ratio``), and the share of image queries (``query_share``)."""
        if not self.dge_count:
            return {}
        ratio, share = (self.dge_sums / self.dge_count).tolist()
        self.dge_sums, self.dge_count = torch.zeros(2, dtype=torch.double), 0
        return dict(compute_ratio=ratio, query_share=share)


def routing_macs(model: nn.Module, height: int, width: int, queries: Sequence[float]) -> float:
    """MACs of one image through a DGE model whose block i used ``queries[i]`` image queries.

    Counts what depends on the routing and what does not: patch embedding, per block the router, dense key/value
    projections, query projections, attention, output projection and MLP for prefix + image queries, and the
    head. Norms, pooling and element-wise work are left out.
    """
    c = model.embed_dim
    n, p = height * width, model.num_prefix_tokens
    kernel = model.patch_embed.proj.kernel_size
    total = n * c * 3 * kernel[0] * kernel[1] + c * model.num_classes
    regions = model.geometry(height, width, 'cpu').num_regions
    for blk, m in zip(model.blocks, queries):
        hidden = blk.mlp.fc1.out_features
        qn = p + m
        total += regions * c * len(model.dge_cfg['splits'])                    # router
        total += (p + n) * c * 2 * c                                            # keys and values
        total += qn * c * c + 2 * qn * (p + n) * c + qn * c * c + qn * 2 * c * hidden
    return float(total)


def init_router(router: nn.Linear, splits: Sequence[int], finest_prob: float) -> None:
    """vtpack's DynamicRouter.init_parameters: weight trunc-normal (std 0.01); bias +b for the finest split and
    -b for the others, b chosen so that softmax(bias) gives the finest split ``finest_prob`` (vtpack gives +b to
    the first split, which is the finest in its configs; here it goes to the finest in any order)."""
    nn.init.trunc_normal_(router.weight, std=0.01)
    n = len(splits)
    b = 0.5 * math.log(finest_prob * (n - 1) / (1 - finest_prob)) if n > 1 else 0.0
    with torch.no_grad():
        router.bias.copy_(torch.tensor([b if s == max(splits) else -b for s in splits]))


def apply(model: nn.Module, budget: float = 0.5, region: int = 4, splits: Sequence[int] = (4, 2, 1),
          loss_weight: float = 1.0, init_finest_prob: float = 0.95) -> nn.Module:
    """Turn a timm ViT into DGE in place; the routers are new parameters (``blocks.N.router``)."""
    splits = tuple(int(s) for s in splits)
    if not splits or any(s < 1 or region % s for s in splits) or len(set(splits)) != len(splits):
        raise MethodConfigError(f'dge: every split must divide the region size {region} and appear once, got {splits}')
    if not 0 < init_finest_prob < 1:
        raise MethodConfigError('dge: init_finest_prob must be in (0, 1)')
    ref = model.pos_embed if model.pos_embed is not None else model.cls_token
    for blk in model.blocks:
        check_attention(blk.attn)
        swap_class(blk, DGEBlock)
        blk.router = nn.Linear(model.embed_dim, len(splits)).to(device=ref.device, dtype=ref.dtype)
        init_router(blk.router, splits, init_finest_prob)
    swap_class(model, DGEVisionTransformer)
    model.dge_cfg = dict(budget=budget, region=int(region), splits=list(splits), loss_weight=loss_weight,
                         init_finest_prob=init_finest_prob)
    model.dge_force, model.dge_routing, model.dge_path = None, None, 'auto'
    model.dge_geometry, model.dge_last_ratio = {}, None
    model.dge_sums, model.dge_count = torch.zeros(2, dtype=torch.double), 0
    model.configure(budget=budget, loss_weight=loss_weight)
    return model


def add_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--dge-budget', type=float, default=0.5, help="DGE: target ratio of the blocks' dynamic to dense complexity (vtpack's)")
    group.add_argument('--dge-region', type=int, default=4, help='DGE: region side in tokens')
    group.add_argument('--dge-splits', type=int, nargs='+', default=[4, 2, 1], help='DGE: queries per region side, any order, each a divisor of the region')
    group.add_argument('--dge-loss-weight', type=float, default=1.0, help='DGE: weight of the budget loss')


def cfg_from_args(args: argparse.Namespace) -> dict:
    return dict(budget=args.dge_budget, region=args.dge_region, splits=args.dge_splits,
                loss_weight=args.dge_loss_weight)
