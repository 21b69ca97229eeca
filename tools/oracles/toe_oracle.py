"""ToE against Osilly/TokenExpansion: its ``TokenSelect.token_select`` before block 1 of the same timm ViT in
training mode with ``sparse_inference`` on, as its DeiT example's ``forward_features`` calls it.

Our stage s (0-based) is its ``expansion_stage`` s + 1.
"""
import copy
from pathlib import Path

import torch
from torch import nn

from tools.oracles.common import load_official_file

SETTINGS = {'stage 0 (keep 0.5)': dict(stage=0), 'stage 1 (keep 0.75)': dict(stage=1)}
FIXTURE_SETTINGS = [dict(stage=0), dict(stage=1), dict(stage=0, substeps=3),
                    dict(keep_rate=[0.6, 0.8, 0.9], init_keep_rate=0.3, stage=2)]
TRAINING = True
OFFICIAL_FILE = 'token_select.py'  # the same as ToE/deit/model/token_select.py
DEFAULTS = dict(keep_rate=[0.5, 0.75, 1.0], init_keep_rate=0.25, substeps=2)


class OfficialToE(nn.Module):
    """The DeiT example's forward: token selection between blocks 0 and 1."""

    def __init__(self, vit: nn.Module, selector: nn.Module):
        super().__init__()
        self.vit, self.selector = vit, selector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for i, block in enumerate(vit.blocks):
            if i == 1:
                x, _ = self.selector.token_select(x)
            x = block(x)
        return vit.forward_head(vit.norm(x))


def official(official_dir: Path, dense: nn.Module, cfg: dict) -> nn.Module:
    module = load_official_file(official_dir / OFFICIAL_FILE, 'toe_official_select')
    cfg = {**DEFAULTS, **cfg}
    selector = module.TokenSelect(expansion_step=list(range(len(cfg['keep_rate']))), keep_rate=cfg['keep_rate'],
                                  initialization_keep_rate=cfg['init_keep_rate'],
                                  expansion_multiple_stage=cfg['substeps'])
    selector.expansion_stage = cfg['stage'] + 1
    selector.sparse_inference = True
    return OfficialToE(copy.deepcopy(dense), selector)
