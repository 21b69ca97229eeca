"""MTViT against changingbz/mtvit: its own ``MTViT`` model (mtvit.py, which imports its helpers.py) with our weights
(official keys from ours by ``models.mtvit.official_to_ours``), the same keep rate in the same blocks, merging.

In memory: helpers.py's ``.cuda()`` calls and the ``@register_model`` decorators (they would replace timm's own
``deit_*`` names) are dropped; nothing of either file is written anywhere. The official multi-scale module is
hard-wired to 224 px and a 16 px patch (a 14 x 14 grid fused with a 7 x 7 one, after block 2), so its settings
prune from block 3 on; the fixture's tiny case keeps that geometry with 6 blocks of 64 dims. It needs einops.
"""
from pathlib import Path

from torch import nn

from models.mtvit import official_to_ours
from tools.oracles.common import TINY_CASE, load_official_file, our_model

SETTINGS = {'keep 0.7 multi-scale': dict(keep_rate=0.7), 'keep 0.5 multi-scale': dict(keep_rate=0.5),
            'keep 0.7 (MTViT-B style)': dict(keep_rate=0.7, multi_scale=False)}
CASE = dict(TINY_CASE, kwargs=dict(img_size=224, patch_size=16, depth=6, embed_dim=64, num_heads=2), images=2)
FIXTURE_SETTINGS = [dict(keep_rate=0.7, prune_blocks=[3, 4, 5]), dict(keep_rate=0.5, prune_blocks=[3, 5]),
                    dict(keep_rate=0.5, prune_blocks=[1, 3, 5], multi_scale=False)]
TRAINING = False
OFFICIAL_FILE = 'mtvit.py'


def official(official_dir: Path, dense: nn.Module, cfg: dict) -> nn.Module:
    load_official_file(official_dir / 'helpers.py', 'helpers', lambda text: text.replace('.cuda()', ''))
    module = load_official_file(official_dir / OFFICIAL_FILE, 'mtvit_official',
                                lambda text: text.replace('@register_model', ''))
    depth = len(dense.blocks)
    prune = cfg.get('prune_blocks', [depth // 4, depth // 2, 3 * depth // 4])
    keep = tuple(cfg['keep_rate'] if i in prune else 1 for i in range(depth))
    model = module.MTViT(img_size=dense.patch_embed.img_size[0], patch_size=dense.patch_embed.patch_size[0],
                         num_classes=dense.num_classes, embed_dim=dense.embed_dim, depth=depth,
                         num_heads=dense.blocks[0].attn.num_heads, keep_rate=keep,
                         multi_scale=cfg.get('multi_scale', True))
    ours = our_model(dense, 'mtvit', cfg, False).state_dict()
    model.load_state_dict({k: ours[official_to_ours(k)] for k in model.state_dict()})
    return model
