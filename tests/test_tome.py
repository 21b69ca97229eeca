"""ToMe: token counts per block, merge bookkeeping, MACs on DeiT-S, run-time r."""
import pytest
import torch

from conftest import TINY, tokens_per_block
from models import build_model
from models.tome import bipartite_soft_matching, per_block_r
from utils.profiling import count_macs




def test_r_schedules():
    assert per_block_r(13, 12) == [13] * 12
    assert per_block_r([4, 2], 4) == [4, 2, 0, 0]
    decreasing = per_block_r((8, -0.5), 12)
    assert decreasing[0] > decreasing[-1] and abs(sum(decreasing) - 8 * 12) <= 12


def test_tokens_per_block_follow_r_and_cap():
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=[3, 5, 100, 0]), num_classes=3, **TINY).eval()
    # 1 + 16 tokens: -3 -> 14, -5 -> 9, capped at (9 - 1) // 2 = 4 -> 5, -0 -> 5
    assert tokens_per_block(model, torch.randn(2, 3, 32, 32)) == [14, 9, 5, 5]
    model.configure(r=1)
    assert tokens_per_block(model, torch.randn(2, 3, 32, 32)) == [16, 15, 14, 13]


def test_merge_keeps_prefix_in_front_and_sizes_partition_the_patches():
    torch.manual_seed(0)
    metric = torch.randn(2, 11, 8)
    merge = bipartite_soft_matching(metric, r=4, protected=2)
    ids = torch.arange(11.)[None, :, None].expand(2, -1, -1)
    assert merge(ids, reduce='amax')[:, :2, 0].tolist() == [[0, 1], [0, 1]]
    size = merge(torch.ones(2, 11, 1))
    assert size.shape == (2, 7, 1) and size.sum(1).flatten().tolist() == [11, 11]
    assert size[:, :2].flatten().tolist() == [1, 1, 1, 1]


def test_identical_tokens_merge_first():
    metric = torch.randn(1, 9, 4)
    metric[0, 4] = metric[0, 7] * 3  # even 4 has odd 7 as an exact (cosine) twin
    merge = bipartite_soft_matching(metric, r=1, protected=1)
    x = torch.arange(9.)[None, :, None]
    out = merge(x, reduce='amax')
    assert 4 not in out.flatten().tolist() and out.shape[1] == 8


def test_source_map_tracks_which_patches_each_token_holds():
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=3, track_source=True), num_classes=3, **TINY).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    source = model.tome_source
    assert source.shape == (2, 5, 17)
    assert (source.sum(1) == 1).all()  # every patch belongs to exactly one final token


def test_proportional_attention_changes_output_only_after_merging():
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=3), num_classes=3, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with_prop = model(x)
        model.configure(prop_attn=False)
        without = model(x)
    assert not torch.allclose(with_prop, without)


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match='unknown tome setting'):
        build_model('vit_tiny_patch16_224', 'tome', dict(rr=3), num_classes=3, **TINY)
    with pytest.raises(ValueError, match='>= 0'):
        build_model('vit_tiny_patch16_224', 'tome', dict(r=-1), num_classes=3, **TINY)


def test_deit_small_macs_match_the_paper():
    dense = build_model('deit_small_patch16_224', num_classes=10)
    tome = build_model('deit_small_patch16_224', 'tome', dict(r=13), num_classes=10)
    image = torch.randn(1, 3, 224, 224)
    dense_macs, _ = count_macs(dense, image)
    tome_macs, _ = count_macs(tome, image)
    assert abs(dense_macs / 1e9 - 4.6) < 0.05
    assert abs(tome_macs / 1e9 - 2.7) / 2.7 < 0.05


def test_r_forms_follow_the_official_parse_r_and_the_command_line():
    import argparse
    from models.registry import add_method_args, method_cfg_from_args
    from utils.errors import UserError
    assert per_block_r((13, 0), 12) == [13] * 12  # a 2-tuple is (r, inflection), not two blocks
    assert per_block_r((13, -1), 12)[:3] == [26, 23, 21] and per_block_r((13, -1), 12)[-1] == 0
    parser = argparse.ArgumentParser()
    parser.add_argument('--method', default='tome')
    add_method_args(parser)
    for flags, r in ((['--tome-r', '8'], 8), (['--tome-r', '8', '8', '4', '4'], [8, 8, 4, 4]),
                     (['--tome-r', '13,-1'], (13, -1.0)), ([], 13)):
        assert method_cfg_from_args(parser.parse_args(flags))['r'] == r
    with pytest.raises(UserError, match='r,inflection'):
        method_cfg_from_args(parser.parse_args(['--tome-r', '13,x']))
