"""ToMe against facebookresearch/ToMe: ``tome.patch.timm`` on a copy of the same timm ViT, with ``model.r`` set."""
import copy
import sys
from pathlib import Path

from torch import nn

SETTINGS = {'r=8': dict(r=8), 'r=13': dict(r=13), 'r=16': dict(r=16), 'r=(13, -1.0)': dict(r=(13, -1.0))}
FIXTURE_SETTINGS = [dict(r=4), dict(r=[8, 6, 4, 2]), dict(r=(4, -1.0)), dict(r=(4, 0)),
                    dict(r=6, prop_attn=False)]
TRAINING = False
OFFICIAL_FILE = 'tome/patch/timm.py'


def official(official_dir: Path, dense: nn.Module, cfg: dict) -> nn.Module:
    if str(official_dir) not in sys.path:
        sys.path.append(str(official_dir))
    import tome
    model = copy.deepcopy(dense)
    tome.patch.timm(model, prop_attn=cfg.get('prop_attn', True))
    model.r = cfg['r']
    return model
