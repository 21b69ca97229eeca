"""GTP: token counts, graphs, propagation bookkeeping, MACs on DeiT-S, run-time settings."""
import pytest
import torch

from conftest import TINY, tokens_per_block
from models import build_model
from models.gtp import build_graph, importance, propagate, spatial_graph
from utils.profiling import count_macs




def test_tokens_per_block_follow_num_prop():
    model = build_model('vit_tiny_patch16_224', 'gtp', dict(num_prop=3), num_classes=3, **TINY).eval()
    assert tokens_per_block(model, torch.randn(2, 3, 32, 32)) == [14, 11, 8, 5]
    model.configure(num_prop=1)
    assert tokens_per_block(model, torch.randn(1, 3, 32, 32)) == [16, 15, 14, 13]
    model.configure(num_prop=100)  # never removes the last image token
    assert tokens_per_block(model, torch.randn(1, 3, 32, 32)) == [2, 2, 2, 2]


def test_spatial_graph_is_the_8_neighbourhood():
    g = spatial_graph(3, 4, 'cpu')
    assert g.shape == (12, 12) and torch.equal(g, g.T) and g.diagonal().sum() == 0
    assert g[0].sum() == 3 and g[5].sum() == 8  # a corner and an inner patch


@pytest.mark.parametrize('kind', ['spatial', 'semantic', 'mixed'])
def test_graph_is_symmetric_normalised(kind):
    tokens = torch.randn(2, 12, 16)
    g = build_graph(tokens, kind, (3, 4), neighbours=3)
    adjacency = (g > 0).float()
    degree = adjacency.sum(-1)
    expected = adjacency / (degree[:, :, None] * degree[:, None, :]).sqrt()
    assert torch.allclose(g, expected)


def test_propagation_moves_removed_features_to_graph_neighbours():
    x = torch.zeros(1, 1 + 4, 2)
    x[0, 3] = torch.tensor([1.0, 2.0])  # image token 2 is the one removed
    scale = torch.ones(1, 5, 1)
    graph = torch.tensor([[[0, 1, 0, 0], [1, 0, 1, 0], [0, 0.5, 0, 0.5], [0, 0, 1, 0]]])
    rank = torch.tensor([[4.0, 3.0, 0.0, 2.0]])
    cfg = dict(propagation='GraphProp', alpha=0.1)
    out, out_scale, out_graph, keep = propagate(x, scale, graph, rank, 1, cfg, prefix=1)
    assert keep.tolist() == [[0, 1, 3]]
    assert out.shape == (1, 4, 2) and out_graph.shape == (1, 3, 3)
    # kept image tokens 0, 1, 3 in order; token 1 gets 0.1 * G[1, 2] * x2, token 3 gets 0.1 * G[3, 2] * x2
    assert torch.allclose(out[0, 1:], torch.tensor([[0, 0], [0.1, 0.2], [0.1, 0.2]]))
    assert torch.allclose(out_scale[0, 1:, 0], torch.tensor([1.0, 1.1, 1.1]))
    dropped, _, _, _ = propagate(x, scale, graph, rank, 1, dict(propagation='none', alpha=0.1), prefix=1)
    assert dropped.abs().sum() == 0


def test_mixed_attn_max_prefers_self_and_received_attention():
    probs = torch.full((1, 2, 4, 4), 0.1)
    probs[0, 1, :, 2] = 0.9  # every query attends to token 2 in head 1
    rank = importance(probs, 'MixedAttnMax', prefix=1)
    assert rank.argmax().item() == 1  # image token 1 = overall token 2


def test_sparsity_and_selection_rules_run_and_change_output():
    model = build_model('vit_tiny_patch16_224', 'gtp', dict(num_prop=2), num_classes=3, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        for change in (dict(sparsity=0.5), dict(selection='CLSAttnMean'), dict(graph='spatial'),
                       dict(propagation='none')):
            model.configure(**{**dict(sparsity=0.0, selection='MixedAttnMax', graph='mixed',
                                      propagation='GraphProp'), **change})
            assert not torch.allclose(model(x), base), change


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match='selection must be one of'):
        build_model('vit_tiny_patch16_224', 'gtp', dict(selection='Best'), num_classes=3, **TINY)
    with pytest.raises(ValueError, match='unknown gtp setting'):
        build_model('vit_tiny_patch16_224', 'gtp', dict(num_props=2), num_classes=3, **TINY)


def test_deit_small_macs_match_the_paper():
    model = build_model('deit_small_patch16_224', 'gtp', dict(num_prop=8), num_classes=10)
    macs, _ = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs / 1e9 - 3.45) / 3.45 < 0.05


def test_sparsity_keeps_weights_from_the_kth_smallest_as_the_official():
    from models.gtp import sparse_attention
    probs = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    # k = int(16 * 0.25) = 4: the 4th smallest (4.0) is the threshold, weights >= it stay
    assert (sparse_attention(probs, 0.25) > 0).sum().item() == 13


def test_presets_are_the_official_readme_table():
    import argparse
    from models.gtp import preset
    from models.registry import add_method_args, method_cfg_from_args
    assert preset(8) == dict(num_prop=8, alpha=0.1, sparsity=pytest.approx(0.4))
    assert preset(4) == dict(num_prop=4, alpha=0.4, sparsity=0.0)
    parser = argparse.ArgumentParser()
    parser.add_argument('--method', default='gtp')
    add_method_args(parser)
    cfg = method_cfg_from_args(parser.parse_args(['--gtp-preset', '12', '--gtp-graph', 'spatial']))
    assert (cfg['num_prop'], cfg['alpha'], cfg['graph']) == (12, 0.3, 'spatial')
    with pytest.raises(ValueError, match='no preset'):
        preset(15)
