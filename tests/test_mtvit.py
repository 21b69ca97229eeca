"""MTViT / EViT: kept tokens per block, multi-scale at any grid, official checkpoints, keep-rate schedule, MACs."""
import pytest
import torch

from conftest import TINY, tokens_per_block
from models import build_model
from models.mtvit import OFFICIAL_KEYS, keep_and_merge
from utils.errors import UserError
from utils.profiling import count_macs


def test_tokens_follow_the_keep_rate_at_224():
    model = build_model('deit_small_patch16_224', 'mtvit', dict(keep_rate=0.7, multi_scale=False), num_classes=3,
                        embed_dim=48, num_heads=2).eval()
    counts = tokens_per_block(model, torch.randn(1, 3, 224, 224))
    assert [c - 1 for c in counts] == [196] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    model.configure(fusion='fuse')
    assert [c - 1 for c in tokens_per_block(model, torch.randn(1, 3, 224, 224))][-1] == 68 + 3


@pytest.mark.parametrize('img_size, patch_size', [(64, 8), (80, 16)])  # 8 x 8 and an odd 5 x 5 grid
def test_multi_scale_runs_at_any_grid_with_one_image(img_size, patch_size):
    kw = {**TINY, 'img_size': img_size, 'patch_size': patch_size}
    dense = build_model('vit_tiny_patch16_224', num_classes=3, **kw)
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.5), num_classes=3, **kw).eval()
    grid = img_size // patch_size
    assert model.mtvit_fusion.pos_embed.shape == (1, 1 + (grid // 2) ** 2, 64)
    assert all(n.startswith('mtvit_fusion.') for n in set(model.state_dict()) - set(dense.state_dict()))
    counts = tokens_per_block(model, torch.randn(1, 3, img_size, img_size))
    assert counts[0] == 1 + (grid // 2) ** 2 and counts[1] == 1 + grid ** 2  # block 0: coarse branch, then fine


@pytest.mark.parametrize('depth', [2, 3])
def test_default_prune_blocks_fit_a_shallow_model(depth):
    model = build_model('vit_tiny_patch16_224', 'mtvit', num_classes=3, **{**TINY, 'depth': depth})
    assert model.mtvit_cfg['prune_blocks'] == list(range(1, depth))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def official_keys(state):
    """Our multi-scale state dict under the official MTViT's key names."""
    inverse = {ours: theirs for theirs, ours in OFFICIAL_KEYS.items()}
    return {next((inverse[o] + k[len(o):] for o in inverse if k.startswith(o)), k): v for k, v in state.items()}


def test_official_mtvit_checkpoint_loads_with_its_logits(tmp_path):
    kw = {**TINY, 'img_size': 64, 'depth': 5}  # 1000 classes: timm keeps the head of a 1000-class file
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.7), num_classes=1000, **kw).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path / 'mtvit_official.pth'
    torch.save({'model': official_keys(model.state_dict()), 'epoch': 3}, path)
    assert {'pos_embed_list.0', 'pos_embed_list.1', 'up.peg.weight', 'up.lka.conv0.weight'} <= set(
        torch.load(path)['model'])
    loaded = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.7), num_classes=1000, pretrained=str(path),
                         **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    bigger = build_model('vit_tiny_patch16_224', 'mtvit', {}, num_classes=1000, pretrained=str(path), **{**kw, 'img_size': 96})
    assert bigger.mtvit_fusion.pos_embed.shape == (1, 1 + 6 * 6, 64)  # the coarse grid's embedding resampled
    with pytest.raises(UserError, match='mtvit-multi-scale'):
        build_model('vit_tiny_patch16_224', 'mtvit', dict(multi_scale=False), num_classes=1000, pretrained=str(path),
                    **kw)


def test_merge_folds_dropped_tokens_into_their_nearest_kept_token():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1]]])  # prefix, then three image tokens
    size = torch.ones(1, 4, 1)
    attention = torch.tensor([[0.5, 0.3, 0.2]])
    out, out_size, remap = keep_and_merge(x, size, attention, keep=2, prefix=1, fusion="merge")
    assert remap.tolist() == [[0, 1, 0]]
    expected = (0.5 * torch.tensor([1.0, 0.0]) + 0.2 * torch.tensor([2.0, 0.1])) / 0.7
    assert torch.allclose(out[0, 1], expected) and torch.allclose(out[0, 2], torch.tensor([0.0, 1.0]))
    assert out_size.flatten().tolist() == [1, 2, 1]


@pytest.mark.parametrize('epoch, expected', [(0, 1.0), (2, 1.0), (7, 0.85), (12, 0.7), (30, 0.7)])
def test_cosine_keep_rate_schedule(epoch, expected):
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.7, shrink_start_epoch=2, shrink_epochs=10),
                        num_classes=3, **TINY)
    model.update_schedule(epoch, 30)
    model.train()
    assert model.method_stats()['keep_rate'] == pytest.approx(expected)
    model.eval()
    assert model.method_stats()['keep_rate'] == 0.7


def test_evits_fine_tuning_schedule_keeps_the_final_rate_from_the_first_step():
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.7, shrink_start_epoch=0, shrink_epochs=0),
                        num_classes=3, **TINY).train()
    model.update_schedule(0.0, 30)
    assert model.method_stats()['keep_rate'] == 0.7


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match='keep_rate'):
        build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0), num_classes=3, **TINY)
    with pytest.raises(ValueError, match='prune_blocks'):
        build_model('vit_tiny_patch16_224', 'mtvit', dict(prune_blocks=[2, 9]), num_classes=3, **TINY)


def test_deit_small_macs_match_evit():
    model = build_model('deit_small_patch16_224', 'mtvit', dict(keep_rate=0.7, multi_scale=False), num_classes=10)
    macs, _ = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs / 1e9 - 3.0) / 3.0 < 0.05


def test_fuse_adds_evits_unnormalised_weighted_sum_and_flags_take_the_mtvit_prefix():
    x, size = torch.randn(2, 1 + 6, 4), torch.ones(2, 7, 1)
    attention = torch.rand(2, 6)
    out, out_size, _ = keep_and_merge(x, size, attention, keep=4, prefix=1, fusion='fuse')
    gone = attention.argsort(dim=-1, descending=True)[:, 4:]
    expected = torch.stack([(attention[b, gone[b], None] * x[b, 1 + gone[b]]).sum(0) for b in range(2)])
    assert torch.allclose(out[:, -1], expected, atol=1e-6)  # EViT's evit.py: no division by the weights' sum
    assert out_size[:, -1, 0].tolist() == [2.0, 2.0]
    import train_gpu
    parse = train_gpu.get_args_parser().parse_args
    new = parse(['--mtvit-keep-rate', '0.5', '--no-mtvit-multi-scale', '--mtvit-prune-blocks', '1', '2',
                 '--mtvit-shrink-start-epoch', '0', '--mtvit-shrink-epochs', '0'])
    old = parse(['--keep-rate', '0.5', '--no-multi-scale', '--prune-blocks', '1', '2', '--shrink-start-epoch', '0',
                 '--shrink-epochs', '0'])
    assert vars(new) == vars(old) and new.keep_rate == 0.5 and new.multi_scale is False
