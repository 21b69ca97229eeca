"""Pieces every token-reduction method shares, written once against timm's own modules.

A method turns a built timm ``VisionTransformer`` into its variant by swapping the classes of the model
and of its blocks for subclasses (``swap_class``): parameters, state-dict keys and the rest of timm's API
(``forward_head``, ``reset_classifier``, ``set_grad_checkpointing``, ``pretrained_cfg``) stay as they are.
The subclass blocks call timm's own sub-modules (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ...), so
LayerScale, q/k norm, qkv bias and drop-path are kept; attention goes through ``attend``, which is timm's
``Attention.forward`` with an additive float bias (e.g. log token size), queries that may differ from the keys'
tokens (e.g. pooled queries against all tokens), and the keys returned.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention

from utils.errors import MethodConfigError


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
        raise MethodConfigError(
            f'token-reduction methods need timm VisionTransformer blocks with timm.layers.Attention, '
            f'got {type(attn).__name__}; pick a plain ViT/DeiT model (e.g. deit_small_patch16_224)')


def attend(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor] = None, explicit: bool = False,
           reweight: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
           context: Optional[torch.Tensor] = None, layout: Optional[tuple] = None):
    """timm ``Attention.forward`` with an additive float ``bias`` on the logits, and queries apart from keys.

    x: [B, N, C] tokens, each a query and, without ``context``, a key and value. With ``context`` [B, T, C] the
    keys and values come from ``context`` and x holds only queries: [B, N, C], or, with ``layout = (image, slot,
    N)``, the queries of the whole batch packed as [Q, C], query i in attention slot ``slot[i]`` of image
    ``image[i]`` (the projections, gate and output run on the Q rows; only attention pads each image to N).
    bias: broadcastable to [B, heads, N, T] (e.g. [B, 1, 1, T] for log sizes) or None.
    Returns (output shaped as x, q [B, heads, N, head_dim] and k [B, heads, T, head_dim] after q/k norm,
    probabilities or None). Uses fused ``scaled_dot_product_attention`` whenever timm's module does, unless
    ``explicit``: then the attention probabilities [B, heads, N, T] are computed once and, after attention
    dropout and ``reweight``, used and returned.
    """
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if context is None:
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = _project_apart(attn, x, context, layout)
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
    out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], attn.attn_dim)
    if layout is not None:
        out = out[layout[0], layout[1]]
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k, probs


def _project_apart(attn: Attention, x: torch.Tensor, context: torch.Tensor, layout: Optional[tuple]):
    """q from the queries x, k and v from ``context`` [B, T, C], with the rows of timm's ``qkv`` weights; packed
    queries (``layout``) are spread to their attention slots, zero elsewhere."""
    (B, T, _), c = context.shape, attn.attn_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x, w[:c], None if b is None else b[:c])
    kv = F.linear(context, w[c:], None if b is None else b[c:])
    if layout is not None:
        image, slot, n = layout
        q = q.new_zeros(B, n, c).index_put_((image, slot), q)
    q = q.reshape(B, q.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


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
