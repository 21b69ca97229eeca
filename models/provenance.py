"""Which source patches each token stands for, tracked only when token maps are asked for.

``owner`` [B, patches] holds, for every image patch of the input, the index (among the current image tokens) of
the token that now carries it, or -1 once it is gone. A method that reduces tokens describes each step as a
``remap`` [B, old image tokens] (new index, or -1) and ``follow`` applies it. Methods record what they did per
block into ``model.token_record`` (a list of dicts: block, owner, removed, grain, seed) when ``model.record_tokens``.
"""
from typing import Optional

import torch


def initial_owner(batch: int, patches: int, device) -> torch.Tensor:
    return torch.arange(patches, device=device).expand(batch, -1).clone()


def keep_remap(old: int, kept: torch.Tensor, dropped: Optional[torch.Tensor] = None,
               into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Remap for keeping ``kept`` [B, k] (in that order); ``dropped`` [B, d] go ``into`` [B, d] kept positions or -1."""
    remap = torch.full((kept.shape[0], old), -1, dtype=torch.long, device=kept.device)
    remap.scatter_(1, kept, torch.arange(kept.shape[1], device=kept.device).expand_as(kept))
    if dropped is not None and into is not None:
        remap.scatter_(1, dropped, into)
    return remap


def follow(owner: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Owners after one reduction step."""
    return torch.where(owner >= 0, remap.gather(1, owner.clamp(min=0)), owner)


def record(model, block: int, owner: Optional[torch.Tensor] = None, removed: Optional[torch.Tensor] = None,
           grain: Optional[torch.Tensor] = None, seed: Optional[torch.Tensor] = None) -> None:
    """Append one block's provenance to ``model.token_record`` (detached, on the CPU)."""
    entry = dict(block=block)
    for name, value in (('owner', owner), ('removed', removed), ('grain', grain), ('seed', seed)):
        if value is not None:
            entry[name] = value.detach().cpu()
    model.token_record.append(entry)
