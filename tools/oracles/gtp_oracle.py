"""GTP against Ackesnal/GTP-ViT: its ``models_v3.GraphPropagationTransformer`` with the same timm ViT's state dict.

Its file is loaded with the hard-coded ``.to("cuda")`` dropped (in memory), and run in a scratch folder because
it appends a debug line to a file named ``missing`` in the current folder on every propagation. Its
``sparsity`` is the share of attention weights kept (1: off), ours the share zeroed (0: off).
"""
from functools import partial
from pathlib import Path

from torch import nn

from models.gtp import preset
from tools.oracles.common import load_official_file, scratch_cwd

SETTINGS = {'num_prop=4': dict(num_prop=4), 'num_prop=8': dict(num_prop=8), 'num_prop=12': dict(num_prop=12),
            'preset 8 (alpha 0.1, sparsity 0.4)': preset(8)}
FIXTURE_SETTINGS = [dict(num_prop=4), preset(8), dict(num_prop=6, graph='spatial', alpha=0.3),
                    dict(num_prop=3, graph='semantic', num_neighbours=4, selection='MixedAttnMean', sparsity=0.2),
                    dict(num_prop=5, selection='CLSAttnMean', propagation='none')]
TRAINING = False
OFFICIAL_FILE = 'models_v3.py'
DEFAULTS = dict(selection='MixedAttnMax', propagation='GraphProp', graph='mixed', num_neighbours=8, alpha=0.1,
                sparsity=0.0)


class InScratchFolder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        with scratch_cwd():
            return self.model(images)


def official(official_dir: Path, dense: nn.Module, cfg: dict) -> nn.Module:
    module = load_official_file(official_dir / OFFICIAL_FILE, 'gtp_official_models_v3',
                                edit=lambda text: text.replace('.to("cuda")', ''))
    cfg = {**DEFAULTS, **cfg}
    block = dense.blocks[0]
    model = module.GraphPropagationTransformer(
        img_size=dense.patch_embed.img_size[0], patch_size=dense.patch_embed.patch_size[0],
        num_classes=dense.num_classes, global_pool=dense.global_pool, embed_dim=dense.embed_dim,
        depth=len(dense.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / dense.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        norm_layer=partial(nn.LayerNorm, eps=dense.norm.eps), selection=cfg['selection'],
        propagation='GraphProp' if cfg['propagation'] == 'GraphProp' else 'None', num_prop=cfg['num_prop'],
        num_neighbours=cfg['num_neighbours'], sparsity=1 - cfg['sparsity'], alpha=cfg['alpha'],
        token_scale=cfg['propagation'] == 'GraphProp',  # its 'None' propagation keeps scales of removed tokens
        graph_type=cfg['graph'].capitalize())
    model.load_state_dict(dense.state_dict())
    return InScratchFolder(model.eval())
