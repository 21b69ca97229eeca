"""EViT against youweiliang/evit: its own ``EViT`` model (evit.py) with our dense weights, keeping the same share of
tokens in the same blocks and fusing the rest into one token; ours is MTViT without multi-scale, ``fusion='fuse'``.

evit.py registers timm model names of its own: the decorators are dropped in memory, so timm's registry stays as
it is. Nothing of the file is written anywhere.
"""
import sys
from pathlib import Path

from torch import nn

from tools.oracles.common import load_official_file

FIXED = dict(multi_scale=False, fusion='fuse')
SETTINGS = {'keep 0.7': dict(keep_rate=0.7, **FIXED), 'keep 0.5': dict(keep_rate=0.5, **FIXED)}
FIXTURE_SETTINGS = [dict(keep_rate=0.7, **FIXED), dict(keep_rate=0.5, prune_blocks=[1, 3], **FIXED)]
TRAINING = False
OFFICIAL_FILE = 'evit.py'
METHOD = 'mtvit'


def official(official_dir: Path, dense: nn.Module, cfg: dict) -> nn.Module:
    if str(official_dir) not in sys.path:
        sys.path.append(str(official_dir))  # its `from helpers import complement_idx`
    module = load_official_file(official_dir / OFFICIAL_FILE, 'evit_official',
                                lambda text: text.replace('@register_model', ''))
    depth = len(dense.blocks)
    prune = cfg.get('prune_blocks', [depth // 4, depth // 2, 3 * depth // 4])
    keep = tuple(cfg['keep_rate'] if i in prune else 1 for i in range(depth))
    embed = dense.embed_dim
    model = module.EViT(img_size=dense.patch_embed.img_size[0], patch_size=dense.patch_embed.patch_size[0],
                        num_classes=dense.num_classes, embed_dim=embed, depth=depth,
                        num_heads=dense.blocks[0].attn.num_heads, keep_rate=keep, fuse_token=True)
    model.load_state_dict(dense.state_dict())
    return model
