"""Pieces every token-reduction method shares, written once against timm's own modules.

A method turns a built timm ``VisionTransformer`` into its variant by swapping the classes of the model
and of its blocks for subclasses (``swap_class``): parameters, state-dict keys and the rest of timm's API
(``forward_head``, ``reset_classifier``, ``set_grad_checkpointing``, ``pretrained_cfg``) stay as they are.
The subclass blocks call timm's own sub-modules (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ...), so
LayerScale, q/k norm, qkv bias and drop-path are kept; attention goes through ``attend``, which is timm's
``Attention.forward`` with an additive float bias (e.g. log token size) and the keys returned.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention


def swap_class(module: nn.Module, mixin: type) -> nn.Module:
    """Give ``module`` the behaviour of ``mixin`` on top of its own class (in place, keys unchanged)."""
    base = module.__class__
    if isinstance(module, mixin):
        return module
    module.__class__ = type(f'{mixin.__name__}{base.__name__}', (mixin, base), {})
    return module


def check_attention(attn: nn.Module) -> None:
    """Token methods need timm's plain ``Attention``; say so clearly for other attention layers."""
    if not isinstance(attn, Attention):
        raise ValueError(
            f'token-reduction methods need timm VisionTransformer blocks with timm.layers.Attention, '
            f'got {type(attn).__name__}; pick a plain ViT/DeiT model (e.g. deit_small_patch16_224)')


def attend(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor] = None, explicit: bool = False,
           reweight: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """timm ``Attention.forward`` with an additive float ``bias`` on the logits.

    x: [B, N, C]; bias: broadcastable to [B, heads, N, N] (e.g. [B, 1, 1, N] for log sizes) or None.
    Returns (output [B, N, C], q and k [B, heads, N, head_dim] after q/k norm, probabilities or None).
    Uses fused ``scaled_dot_product_attention`` whenever timm's module does, unless ``explicit``: then the
    attention probabilities [B, heads, N, N] are computed once and, after attention dropout and ``reweight``,
    used and returned.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    probs = None
    if attn.fused_attn and not explicit:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        probs = attn.attn_drop((logits if bias is None else logits + bias).softmax(dim=-1))
        if reweight is not None:
            probs = reweight(probs)
        out = probs @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k, probs


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second half of a timm block: x + drop_path(ls2(mlp(norm2(x))))."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def attn_residual(block: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of a timm block through ``attend``; returns (x, q, k)."""
    out, q, k, _ = attend(block.attn, block.norm1(x), bias)
    return x + block.drop_path1(block.ls1(out)), q, k


def maybe_checkpoint(model: nn.Module, fn: Callable, *args):
    """Run ``fn(*args)`` under activation checkpointing when the model asks for it while training."""
    if getattr(model, 'grad_checkpointing', False) and model.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """timm's ViT stem: patch embedding, prefix tokens and position embedding, patch drop, pre-norm."""
    x = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(model.patch_drop(x))


def head(model: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's ``norm`` + ``forward_head``; with ``global_pool='avg'`` a token of size s weighs s.

    x: [B, N, C] tokens after the last block; size: [B, N, 1] tokens each one stands for, or None.
    """
    x = model.norm(x)
    if size is None or model.global_pool != 'avg' or model.attn_pool is not None:
        return model.forward_head(x)
    p = model.num_prefix_tokens
    w = size[:, p:].to(x.dtype)
    pooled = (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
    return model.head(model.head_drop(model.fc_norm(pooled)))
