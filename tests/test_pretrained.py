"""Local pretrained weights in the formats people download: DeiT {'model': ...} .pth and timm .safetensors."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import TINY
from models import build_model

KW = {k: v for k, v in TINY.items() if k != 'img_size'}


@pytest.fixture
def source():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', num_classes=1000, img_size=32, **KW)


@pytest.mark.parametrize('fmt', ['deit_pth', 'safetensors', 'plain_pth'])
def test_downloaded_formats_load_with_new_head_and_resized_position_embedding(fmt, source, tmp_path):
    state = source.state_dict()
    path = tmp_path / ('w.safetensors' if fmt == 'safetensors' else 'w.pth')
    if fmt == 'safetensors':
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({'model': state} if fmt == 'deit_pth' else state, path)
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=2), num_classes=3, img_size=48, pretrained=str(path),
                        **KW)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, state['blocks.2.mlp.fc1.weight'])
    assert model.head.weight.shape == (3, 64)                    # a new head for 3 classes
    assert model.pos_embed.shape == (1, 1 + 36, 64)              # 4 x 4 grid resampled to 6 x 6
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_toolkit_checkpoint_as_pretrained_keeps_its_head(tmp_path, source):
    from datasets.transforms import data_config
    from models.checkpoint import make_checkpoint, save_atomic
    trained = build_model('vit_tiny_patch16_224', num_classes=3, **TINY)
    meta = dict(model_name='vit_tiny_patch16_224', model_kwargs=KW, method='none', method_cfg={}, num_classes=3,
                class_names=['a', 'b', 'c'], data_config=data_config(trained, 32))
    save_atomic(make_checkpoint(meta, trained.state_dict()), tmp_path / 'best.pth')
    model = build_model('vit_tiny_patch16_224', num_classes=3, pretrained=str(tmp_path / 'best.pth'), **TINY)
    assert torch.equal(model.head.weight, trained.head.weight)


@pytest.mark.parametrize('change, cause', [(dict(embed_dim=32), 'the file holds embed width 32; vit_tiny_patch16_224 has 64'),
                                           (dict(depth=2), 'the file holds depth 2; vit_tiny_patch16_224 has 4'),
                                           (dict(mlp_ratio=2.0), 'the file holds MLP width 128; vit_tiny_patch16_224 has 256')])
def test_weights_of_another_shape_name_the_cause_in_one_short_line(change, cause, tmp_path):
    from utils.errors import UserError
    other = timm.create_model('vit_tiny_patch16_224', img_size=32, **{**KW, **change})
    torch.save({'model': other.state_dict()}, tmp_path / 'w.pth')
    with pytest.raises(UserError) as err:
        build_model('vit_tiny_patch16_224', num_classes=3, pretrained=str(tmp_path / 'w.pth'), **TINY)
    assert cause in str(err.value) and len(str(err.value)) < 170 + len(str(tmp_path))


def test_deit_small_weights_for_deit_tiny_say_so():
    from models.factory import architecture_difference
    with torch.device('meta'):
        small = timm.create_model('deit_small_patch16_224').state_dict()
        tiny = timm.create_model('deit_tiny_patch16_224').state_dict()
    assert architecture_difference({'model': small}, tiny, 'deit_tiny_patch16_224') == \
        'the file holds embed width 384 (a *_small model); deit_tiny_patch16_224 has 192'
