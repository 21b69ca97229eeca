"""MTViT: multi-scale token mergence (arXiv 2306.04897, changingbz/mtvit), built on EViT (Liang et al.,
"Not All Patches are What You Need", ICLR 2022, youweiliang/evit).

In the prune blocks (by default depth/4, depth/2, 3 depth/4: blocks 3, 6, 9 of 12), after the attention
residual, the image tokens are ranked by the attention the class token pays them (softmax(q_cls k^T), mean over
heads, computed on its own so the block keeps fused attention) and the top ceil(keep_rate * N) are kept, in
their order (196 -> 138 -> 97 -> 68 at 0.7). ``fusion='merge'`` (MTViT) folds each dropped token into its most
cosine-similar kept token, weighted by that attention, adding no token; ``fusion='fuse'`` (EViT) adds one extra
token, the sum of the dropped tokens weighted by that attention (not renormalised, as EViT's code does). The MLP
then runs on what is left. A model without a class token ranks by the mean attention each token receives. Token
sizes are tracked so average pooling weighs merged tokens.

Multi-scale (MTViT-T/S; ``multi_scale``), as the official model computes it: before the first prune block two
branches share the blocks' weights. The coarse branch embeds the half-size image (bilinear, corners aligned) with
its own learned position embedding (``mtvit_fusion.pos_embed``) and runs those blocks in full; the fine branch runs
the first in full and the others with attention on 2x2-pooled image tokens, its output nearest-upsampled before
the residual (MLPs on every token). ``ScaleFusion`` then nearest-upsamples the coarse map and adds its large-kernel
attention (3x3, 7x7 dilated 2, 1x1) and the fine map, adds a 3x3 positional convolution, and the two branches'
prefix tokens are summed. Unlike the official code (224 px, 16 px patches, class token only), any grid and prefix
tokens work; an odd grid pools with the last row/column alone. Official MTViT checkpoints load
(``convert_pretrained``). The coarse embedding starts from the model's, resampled, and the fusion as a plain sum
(the official starts both at random).

Keep-rate schedule (EViT): 1.0 until ``shrink_start_epoch``, then a cosine decay to ``keep_rate`` over
``shrink_epochs`` epochs, per step (``update_schedule``); evaluation uses ``keep_rate``. Defaults: keep 0.7
(EViT / MTViT DeiT-S), multi-scale on (MTViT-S), merge; shrinking starts at epoch 0 when fine-tuning from
weights (the CLI's default with --pretrained) and lasts a third of training (EViT: 100 of 300 epochs);
``shrink_epochs=0`` is EViT's fine-tuning recipe (finetune.sh: the final keep rate from the first step).
"""
import argparse
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from utils.errors import MethodConfigError
from .provenance import follow, initial_owner, keep_remap, record
from .common import attn_residual, check_attention, embed, head, maybe_checkpoint, mlp_residual, swap_class

FUSIONS = ('merge', 'fuse')


def default_prune_blocks(depth: int):
    """Blocks at 1/4, 1/2 and 3/4 of the depth (3 6 9 of 12), each in 1..depth-1."""
    return tuple(sorted({min(depth - 1, max(1, round(depth * f))) for f in (0.25, 0.5, 0.75)}))


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, prefix: int, has_cls: bool) -> torch.Tensor:
    """[B, image tokens] head-mean attention from the class token (or mean over all queries without one)."""
    queries = q[:, :, :1] if has_cls else q
    probs = ((queries * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return probs[..., prefix:].mean(dim=(1, 2))


def keep_and_merge(x, size, attention, keep: int, prefix: int, fusion: str):
    """Keep the ``keep`` most attended image tokens; merge or fuse the rest (attention-weighted).

    Returns (x, size, remap): remap [B, old image tokens] is each old token's new index (provenance).
    """
    image, image_size = x[:, prefix:], size[:, prefix:]
    order = attention.argsort(dim=-1, descending=True)
    kept_idx = order[:, :keep].sort(dim=-1).values
    gone_idx = order[:, keep:]

    def take(t, idx):
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    kept, kept_size = take(image, kept_idx), take(image_size, kept_idx)
    gone, gone_size = take(image, gone_idx), take(image_size, gone_idx)
    w_kept = attention.gather(1, kept_idx)[..., None]
    w_gone = attention.gather(1, gone_idx)[..., None]
    if fusion == 'fuse':
        fused = (w_gone * gone).sum(1, keepdim=True)  # EViT's extra token: the unnormalised weighted sum
        kept = torch.cat([kept, fused], dim=1)
        kept_size = torch.cat([kept_size, gone_size.sum(1, keepdim=True)], dim=1)
        target = torch.full_like(gone_idx, keep)[..., None]  # every dropped token went into the fused one
    else:
        unit_kept = kept / kept.norm(dim=-1, keepdim=True)
        unit_gone = gone / gone.norm(dim=-1, keepdim=True)
        target = (unit_gone @ unit_kept.transpose(-1, -2)).argmax(dim=-1)[..., None]  # [B, dropped, 1]
        weight_sum = w_kept.scatter_add(1, target, w_gone)
        merged = (w_kept * kept).scatter_add(1, target.expand(-1, -1, kept.shape[-1]), w_gone * gone)
        kept = merged / weight_sum
        kept_size = kept_size.scatter_add(1, target, gone_size)
    remap = keep_remap(image.shape[1], kept_idx, gone_idx, target[..., 0])
    return torch.cat([x[:, :prefix], kept], dim=1), torch.cat([size[:, :prefix], kept_size], dim=1), remap


class PruneBlock:
    """A timm ViT block that keeps the most attended image tokens after attention."""

    def forward(self, x, size, keep_rate: float, fusion: str, prefix: int, has_cls: bool, owner=None):
        x, q, k = attn_residual(self, x)
        n_image = x.shape[1] - prefix
        keep = min(n_image, math.ceil(keep_rate * n_image))
        removed = None
        if keep < n_image:
            attention = class_attention(q, k, self.attn.scale, prefix, has_cls)
            x, size, remap = keep_and_merge(x, size, attention, keep, prefix, fusion)
            if owner is not None:
                kept_as_itself = torch.zeros_like(remap, dtype=torch.bool).scatter_(
                    1, attention.argsort(dim=-1, descending=True)[:, :keep], True)
                removed = ~kept_as_itself.gather(1, owner.clamp(min=0))
                owner = follow(owner, remap)
        return mlp_residual(self, x), size, owner, removed


class ScaleFusion(nn.Module):
    """MTViT's multi-scale fusion, and the coarse branch's own position embedding ``pos_embed``.

    The coarse map, nearest-upsampled to the fine grid, plus its large-kernel attention (depthwise 3x3, then
    depthwise 7x7 dilated 2, then 1x1; added, not multiplied), plus the fine map; then a depthwise 3x3
    positional convolution added. The last convolution of each added branch (1x1, positional) starts at zero, so
    the module starts as the plain sum of upsampled coarse and fine maps, the same on every build (the official
    leaves them at PyTorch's random initialisation).
    """

    def __init__(self, dim: int, pos_embed: torch.Tensor, grid, num_prefix: int):
        super().__init__()
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())
        self.grid, self.num_prefix = tuple(grid), num_prefix  # the coarse grid and pos_embed's prefix positions
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.wide = nn.Conv2d(dim, dim, 7, padding=6, dilation=2, groups=dim)
        self.mix = nn.Conv2d(dim, dim, 1)
        self.position = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        for conv in (self.mix, self.position):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self._register_load_state_dict_pre_hook(self._resample_pos_embed)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """fine [B, C, H, W], coarse [B, C, h, w] -> the fused map [B, C, H, W]."""
        up = F.interpolate(coarse, size=fine.shape[-2:], mode='nearest')
        fused = up + self.mix(self.wide(self.local(up))) + fine
        return fused + self.position(fused)

    def _resample_pos_embed(self, state_dict, prefix, *args):
        """A position embedding saved for another (square) coarse grid is resampled to this one."""
        key = prefix + 'pos_embed'
        saved = state_dict.get(key)
        if saved is not None and saved.shape != self.pos_embed.shape:
            side = math.isqrt(saved.shape[1] - self.num_prefix)
            state_dict[key] = resample_abs_pos_embed(saved, list(self.grid), [side, side],
                                                     num_prefix_tokens=self.num_prefix)


def coarse_grid(model: nn.Module, height: int, width: int):
    p = model.patch_embed.patch_size
    return (height // 2) // p[0], (width // 2) // p[1]


def embed_coarse(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ViT stem on the half-size image (bilinear, corners aligned, as the official), with the coarse branch's
    own position embedding and the model's prefix tokens."""
    small = F.interpolate(images, size=(images.shape[-2] // 2, images.shape[-1] // 2), mode='bilinear',
                          align_corners=True)
    pe = model.patch_embed
    x = pe.norm(pe.proj(small).flatten(2).transpose(1, 2))
    pos = model.mtvit_fusion.pos_embed
    tokens = [t for t in (model.cls_token, getattr(model, 'dist_token', None), model.reg_token) if t is not None]
    prefix = [t.expand(x.shape[0], -1, -1) for t in tokens]
    x = torch.cat(prefix + [x + pos], 1) if model.no_embed_class else torch.cat(prefix + [x], 1) + pos
    return model.norm_pre(model.patch_drop(model.pos_drop(x)))


def pooled_attention_block(block: nn.Module, x: torch.Tensor, grid, prefix: int) -> torch.Tensor:
    """A timm block whose attention runs on 2x2 average-pooled image tokens (prefix tokens as they are); its
    output is nearest-upsampled back to ``grid`` before the residual; the MLP runs on every token."""
    image = x[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
    pooled = F.avg_pool2d(image, 2, ceil_mode=True).flatten(2).transpose(1, 2)
    out = block.attn(block.norm1(torch.cat([x[:, :prefix], pooled], dim=1)))
    small = tuple(math.ceil(g / 2) for g in grid)
    up = F.interpolate(out[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, *small), size=grid, mode='nearest')
    out = torch.cat([out[:, :prefix], up.flatten(2).transpose(1, 2)], dim=1)
    return mlp_residual(block, x + block.drop_path1(block.ls1(out)))


class MTViTVisionTransformer:
    """A timm VisionTransformer with EViT/MTViT token keeping in its prune blocks."""

    method_name = 'mtvit'
    new_param_prefixes = ('mtvit_fusion.',)

    @property
    def method_cfg(self) -> dict:
        return dict(self.mtvit_cfg)

    def configure(self, **changes) -> None:
        unknown = sorted(set(changes) - set(self.mtvit_cfg))
        if unknown:
            raise MethodConfigError(f"unknown mtvit setting(s) {', '.join(unknown)}; mtvit takes {', '.join(self.mtvit_cfg)}")
        if 'multi_scale' in changes and changes['multi_scale'] != self.mtvit_cfg['multi_scale']:
            raise MethodConfigError('mtvit: multi_scale is fixed when the model is built; build it again to change it')
        cfg = {**self.mtvit_cfg, **changes}
        blocks = tuple(int(b) for b in cfg['prune_blocks'])
        if not 0 < cfg['keep_rate'] <= 1:
            raise MethodConfigError(f"mtvit: keep_rate must be in (0, 1], got {cfg['keep_rate']}")
        if cfg['fusion'] not in FUSIONS:
            raise MethodConfigError(f"mtvit: fusion must be one of {FUSIONS}, got {cfg['fusion']}")
        if not blocks or blocks != tuple(sorted(set(blocks))) or blocks[0] < 1 or blocks[-1] >= len(self.blocks):
            raise MethodConfigError(f'mtvit: prune_blocks must be increasing block indices in 1..{len(self.blocks) - 1}, '
                             f'got {cfg["prune_blocks"]}')
        if cfg['shrink_start_epoch'] < 0 or cfg['shrink_epochs'] < 0:
            raise MethodConfigError('mtvit: shrink_start_epoch and shrink_epochs must be >= 0')
        cfg['prune_blocks'] = list(blocks)
        self.mtvit_cfg = cfg
        for i, blk in enumerate(self.blocks):
            if i in blocks:
                swap_class(blk, PruneBlock)

    def update_schedule(self, epoch: float, total_epochs: int) -> None:
        """EViT's cosine keep-rate schedule, per step; with ``shrink_epochs=0`` the final rate from
        ``shrink_start_epoch`` on, its first step included (as EViT's adjust_keep_rate)."""
        cfg = self.mtvit_cfg
        start, span = cfg['shrink_start_epoch'], cfg['shrink_epochs']
        progress = float(epoch >= start) if span == 0 else min(max((epoch - start) / span, 0.0), 1.0)
        rate = cfg['keep_rate']
        self.mtvit_train_keep_rate = rate + (1 - rate) * 0.5 * (1 + math.cos(math.pi * progress))

    def keep_rate_in_force(self) -> float:
        if self.training and self.mtvit_train_keep_rate is not None:
            return self.mtvit_train_keep_rate
        return self.mtvit_cfg['keep_rate']

    def method_stats(self) -> dict:
        return dict(keep_rate=self.keep_rate_in_force())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.mtvit_cfg
        prefix, has_cls = self.num_prefix_tokens, self.cls_token is not None
        first = cfg['prune_blocks'][0]
        if cfg['multi_scale']:
            x = self._multi_scale_stem(images, first)
        else:
            x = embed(self, images)
            for blk in self.blocks[:first]:
                x = maybe_checkpoint(self, blk, x)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        keep_rate = self.keep_rate_in_force()
        self.token_record = []
        recording = getattr(self, 'record_tokens', False)
        owner = initial_owner(x.shape[0], x.shape[1] - prefix, x.device) if recording else None
        gone = torch.zeros_like(owner, dtype=torch.bool) if recording else None
        for i, blk in enumerate(self.blocks):
            if i < first:
                continue
            if i in cfg['prune_blocks']:
                x, size, owner, removed = maybe_checkpoint(self, blk, x, size, keep_rate, cfg['fusion'], prefix,
                                                           has_cls, owner)
                if recording:  # patches dropped here or earlier; owner says which kept token holds them
                    gone = gone | removed if removed is not None else gone
                    record(self, i, owner=owner, removed=gone)
            else:
                x = maybe_checkpoint(self, blk, x)
        return head(self, x, size)

    def _multi_scale_stem(self, images: torch.Tensor, first: int) -> torch.Tensor:
        """MTViT's two branches through the blocks before the first prune block, fused (the official forward):
        the coarse branch (half-size image) runs them in full; the fine branch runs the first in full and the
        others with attention on 2x2-pooled tokens; prefix tokens of both are summed, image tokens fused."""
        prefix = self.num_prefix_tokens
        p = self.patch_embed.patch_size
        grid = (images.shape[-2] // p[0], images.shape[-1] // p[1])
        fine, coarse = embed(self, images), embed_coarse(self, images)
        for i, blk in enumerate(self.blocks[:first]):
            coarse = maybe_checkpoint(self, blk, coarse)
            fine = (maybe_checkpoint(self, blk, fine) if i == 0 else
                    maybe_checkpoint(self, pooled_attention_block, blk, fine, grid, prefix))
        to_map = lambda t, g: t[:, prefix:].transpose(1, 2).reshape(t.shape[0], -1, *g)  # noqa: E731
        fused = self.mtvit_fusion(to_map(fine, grid), to_map(coarse, coarse_grid(self, *images.shape[-2:])))
        return torch.cat([fine[:, :prefix] + coarse[:, :prefix], fused.flatten(2).transpose(1, 2)], dim=1)


def new_scale_fusion(model: nn.Module) -> ScaleFusion:
    """The fusion module, its coarse position embedding started from the model's, resampled to the coarse grid
    (the official starts it at random: trunc-normal, std 0.02)."""
    if model.pos_embed is None:
        raise MethodConfigError('mtvit: multi_scale needs a model with a learned position embedding; pass multi_scale=False')
    grid = coarse_grid(model, *model.patch_embed.img_size)
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos = resample_abs_pos_embed(model.pos_embed, list(grid), list(model.patch_embed.grid_size),
                                 num_prefix_tokens=num_prefix)
    fusion = ScaleFusion(model.embed_dim, pos, grid, num_prefix)
    return fusion.to(device=model.pos_embed.device, dtype=model.pos_embed.dtype)


def apply(model: nn.Module, keep_rate: float = 0.7, prune_blocks: Optional[Sequence[int]] = None,
          multi_scale: bool = True, fusion: str = 'merge', shrink_start_epoch: float = 0,
          shrink_epochs: float = 10) -> nn.Module:
    """Turn a timm ViT into MTViT in place; multi-scale adds the fusion module (``mtvit_fusion.*``, new)."""
    for blk in model.blocks:
        check_attention(blk.attn)
    swap_class(model, MTViTVisionTransformer)
    if multi_scale:
        model.mtvit_fusion = new_scale_fusion(model)
    model.mtvit_train_keep_rate = None
    model.mtvit_cfg = dict(keep_rate=keep_rate, prune_blocks=list(default_prune_blocks(len(model.blocks))),
                           multi_scale=bool(multi_scale), fusion=fusion, shrink_start_epoch=shrink_start_epoch,
                           shrink_epochs=shrink_epochs)
    model.configure(keep_rate=keep_rate, fusion=fusion, shrink_start_epoch=shrink_start_epoch,
                    shrink_epochs=shrink_epochs,
                    prune_blocks=list(prune_blocks) if prune_blocks else model.mtvit_cfg['prune_blocks'])
    return model


OFFICIAL_KEYS = {'pos_embed_list.1': 'pos_embed', 'pos_embed_list.0': 'mtvit_fusion.pos_embed',
                 'up.lka.conv0.': 'mtvit_fusion.local.', 'up.lka.conv_spatial.': 'mtvit_fusion.wide.',
                 'up.lka.conv1.': 'mtvit_fusion.mix.', 'up.peg.': 'mtvit_fusion.position.'}


def official_to_ours(key: str) -> str:
    """An official MTViT state-dict key (changingbz/mtvit, multi-scale) as ours; other keys are timm's already."""
    for theirs, ours in OFFICIAL_KEYS.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def convert_pretrained(checkpoint: dict):
    """(timm backbone state dict, ``mtvit_fusion.*`` state dict) of an official multi-scale MTViT checkpoint
    (``{'model': ...}`` or its state dict), or None for any other file (EViT's and MTViT-B's are timm's keys)."""
    state = checkpoint.get('model', checkpoint)
    if not isinstance(state, dict) or 'pos_embed_list.1' not in state:
        return None
    ours = {official_to_ours(k): v for k, v in state.items()}
    extras = {k: v for k, v in ours.items() if k.startswith('mtvit_fusion.')}
    return {k: v for k, v in ours.items() if k not in extras}, extras


def add_args(group: argparse._ArgumentGroup) -> None:
    """MTViT's flags, prefixed like every method's; the unprefixed names of earlier versions still work."""
    group.add_argument('--mtvit-keep-rate', '--keep-rate', dest='keep_rate', type=float, default=0.7,
                       help='MTViT: image tokens kept per prune block')
    group.add_argument('--mtvit-multi-scale', '--multi-scale', dest='multi_scale',
                       action=argparse.BooleanOptionalAction, default=True,
                       help='MTViT: the official half-size branch, fused before the first prune block '
                            '(MTViT-T/S; off for MTViT-B)')
    group.add_argument('--mtvit-fusion', choices=FUSIONS, default='merge',
                       help="MTViT: 'merge' dropped tokens into kept ones, or 'fuse' them into one (EViT)")
    group.add_argument('--mtvit-prune-blocks', '--prune-blocks', dest='prune_blocks', type=int, nargs='+',
                       help='MTViT: blocks that prune (default: depth/4, /2, 3/4)')
    group.add_argument('--mtvit-shrink-start-epoch', '--shrink-start-epoch', dest='shrink_start_epoch', type=float,
                       help='MTViT: epoch the keep rate starts falling (default: 0 with --pretrained, else epochs/30)')
    group.add_argument('--mtvit-shrink-epochs', '--shrink-epochs', dest='shrink_epochs', type=float,
                       help='MTViT: epochs of the cosine decay (default: epochs/3)')


def cfg_from_args(args: argparse.Namespace) -> dict:
    epochs = getattr(args, 'epochs', 30)
    start = args.shrink_start_epoch
    if start is None:
        start = 0 if getattr(args, 'pretrained', None) else epochs / 30
    cfg = dict(keep_rate=args.keep_rate, multi_scale=args.multi_scale, fusion=args.mtvit_fusion,
               shrink_start_epoch=start, shrink_epochs=epochs / 3 if args.shrink_epochs is None else args.shrink_epochs)
    if args.prune_blocks:
        cfg['prune_blocks'] = args.prune_blocks
    return cfg
