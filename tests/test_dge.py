"""DGE: dense at the finest grain on any grid, packed = masked, MACs from the routing, the budget is learned, and
vtpack's outputs and complexity ratio for the same weights (tests/fixtures/dge_vtpack.pt, tools/oracles/dge.py)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import TINY
from timm.layers import Attention

from models import build_model
from models.common import embed
from models.dge import pool, routing_macs, sparse_query_block
from utils.profiling import count_macs


def tiny(img_size, method='dge', cfg=None, **kw):
    return build_model('vit_tiny_patch16_224', method, cfg, num_classes=3, **{**TINY, 'img_size': img_size, **kw})


@pytest.mark.parametrize('img_size', [64, 56], ids=['grid-8x8', 'grid-7x7-uneven'])
def test_finest_grain_is_the_dense_model(img_size):
    dense = tiny(img_size, 'none').eval()
    model = tiny(img_size).eval()
    missing, _ = model.load_state_dict(dense.state_dict(), strict=False)
    assert missing and all('.router.' in k for k in missing)  # pretrained weights load, routers are new
    model.configure(force_split='finest')
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('img_size, splits, kw', [(64, (4, 2, 1), dict(reg_tokens=1)),
                                                  (56, (4, 2, 1), dict(reg_tokens=1)),
                                                  (64, (4, 2, 1), dict(class_token=False, global_pool='avg')),
                                                  (56, (1, 2, 4), {}), (64, (2, 4), {})],
                         ids=['grid-8x8', 'grid-7x7-uneven', 'no-prefix-tokens', 'splits-1-2-4', 'splits-2-4'])
def test_packed_and_masked_paths_agree_on_a_random_routing(img_size, splits, kw):
    model = tiny(img_size, cfg=dict(splits=splits), **kw).eval()
    regions = model.geometry(img_size // 8, img_size // 8, 'cpu').num_regions
    routing = torch.randint(0, len(splits), (len(model.blocks), 3, regions))
    routing[1] = splits.index(4)       # one block all finest: one query per token
    routing[2] = routing[2] % 2 * (len(splits) - 1)  # one block with only the first and last splits in use
    model.configure(routing=routing)
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        model.configure(path='masked')
        masked = model(x)
        model.configure(path='packed')
        packed = model(x)
    assert (masked - packed).abs().max() <= 1e-5


class GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate on (timm's ViT has no flag for it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'explicit'])
def test_gated_attention_reaches_the_sparse_queries(fused):
    """timm's gate, q/k norm and scale norm act on DGE's queries: dense at the finest grain, and at a coarse grain a
    block's pooled queries get what timm's own Attention.forward gives them over [queries, tokens] with the
    queries masked out as keys."""
    kw = dict(attn_layer=GatedAttention, qk_norm=True, scale_attn_norm=True)
    dense = tiny(64, 'none', **kw).eval()
    model = tiny(64, **kw).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    for module in (dense, model):
        for blk in module.blocks:
            blk.attn.fused_attn = fused
    images = torch.randn(2, 3, 64, 64)
    model.configure(force_split='finest')
    with torch.no_grad():
        for path in ('masked', 'packed'):
            model.configure(path=path)
            assert (model(images) - dense(images)).abs().max() <= 1e-5

    blk, geo = model.blocks[1], model.geometry(8, 8, 'cpu')
    with torch.no_grad():
        x = embed(model, images)                                    # [2, 1 + 64, C]
        coarse = model.dge_cfg['splits'].index(2)                   # 2 x 2 queries per 4 x 4 region
        queries = torch.cat([x[:, :1], pool(x[:, 1:], geo.cell_of_token[coarse], geo.cell_size[coarse])], dim=1)
        m = queries.shape[1]                                        # 1 + 16
        mask = torch.zeros(1, 1, 1, m + x.shape[1])
        mask[..., :m] = float('-inf')                               # keys and values: the tokens only
        out = blk.attn(torch.cat([blk.norm1(queries), blk.norm1(x)], dim=1), attn_mask=mask)[:, :m]
        update = blk.ls1(out)
        expected = update + blk.ls2(blk.mlp(blk.norm2(queries + update)))
        assert torch.allclose(sparse_query_block(blk, queries, blk.norm1(x)), expected, atol=1e-5)
        # packed: image 0 with all its queries, image 1 with its first 5, in one [Q, C] tensor
        image, slot = torch.tensor([0] * m + [1] * 5), torch.cat([torch.arange(m), torch.arange(5)])
        packed = sparse_query_block(blk, queries[image, slot], blk.norm1(x), (image, slot, m))
        assert torch.allclose(packed, expected[image, slot], atol=1e-5)


def test_packed_path_refuses_to_train():
    model = tiny(64).train()
    model.configure(path='packed')
    with pytest.raises(ValueError, match='packed path is for inference'):
        model(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize('force, share', [('finest', 1.0), (2, 0.25), ('coarsest', 1 / 16)])
def test_forced_grain_uses_the_expected_queries_and_macs(force, share):
    model = tiny(64).eval()
    model.configure(force_split=force)
    image = torch.randn(1, 3, 64, 64)
    measured, _ = count_macs(model, image)
    stats = model.method_stats()
    assert stats['query_share'] == pytest.approx(share)
    predicted = routing_macs(model, 8, 8, [share * 64] * len(model.blocks))
    assert abs(measured - predicted) / predicted < 0.05
    dense = routing_macs(model, 8, 8, [64] * len(model.blocks))
    # the budget's ratio counts the blocks as vtpack does (dense keys/values, norms, softmax): near the MAC ratio,
    # which also counts the patch embedding and head
    assert abs(stats['compute_ratio'] - predicted / dense) < 0.05


def test_macs_fall_with_the_grain_on_deit_small_at_256():
    model = build_model('deit_small_patch16_224', 'dge', num_classes=10, img_size=256).eval()
    image = torch.randn(1, 3, 256, 256)
    model.configure(force_split='finest')
    finest, _ = count_macs(model, image)
    model.method_stats()  # reset the running mean
    model.configure(force_split='coarsest')
    coarsest, _ = count_macs(model, image)
    dense, _ = count_macs(build_model('deit_small_patch16_224', num_classes=10, img_size=256), image)
    assert abs(finest / dense - 1) < 0.03
    assert coarsest / dense < 0.45  # keys/values stay dense; every other part falls 16x
    assert abs(routing_macs(model, 16, 16, [16] * 12) - coarsest) / coarsest < 0.05
    assert model.method_stats()['compute_ratio'] == pytest.approx(coarsest / dense, abs=0.02)  # the budget's floor


def test_budget_loss_pulls_the_computation_to_the_budget():
    torch.manual_seed(0)
    model = tiny(64, cfg=dict(budget=0.5, loss_weight=5.0)).train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if 'router' in n], lr=0.05)
    x = torch.randn(8, 3, 64, 64)
    for _ in range(40):
        model(x)
        loss = model.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.method_stats()  # reset the running mean
    model.eval()
    with torch.no_grad():
        model(x)
    assert abs(model.method_stats()['compute_ratio'] - 0.5) < 0.1


def test_state_dict_round_trip_keeps_the_routers():
    model = tiny(64)
    with torch.no_grad():
        model.blocks[0].router.bias.add_(1.0)
    copy = tiny(64)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.blocks[0].router.bias, model.blocks[0].router.bias)


@pytest.mark.parametrize('splits', [(4, 2, 1), (1, 2, 4), (2, 4, 1), (4,)])
def test_routers_start_as_vtpack_near_the_dense_model(splits):
    model = tiny(64, cfg=dict(splits=splits))
    router = model.blocks[0].router
    assert float(torch.softmax(router.bias.detach(), 0)[splits.index(4)]) == pytest.approx(0.95 if len(splits) > 1 else 1.0)
    assert 0.005 < router.weight.std() < 0.015 and router.weight.abs().max() < 0.1   # trunc-normal, std 0.01


def test_router_reads_the_raw_block_input():
    model = tiny(64).eval()
    seen = []
    model.blocks[0].router.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    tokens = model.patch_embed(x) + model.pos_embed[:, 1:]  # block 0's image tokens, 8 x 8
    expected = tokens.view(1, 2, 4, 2, 4, -1).mean(dim=(2, 4)).flatten(1, 2)
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_more_than_64_blocks_have_routers_as_new_parameters():
    from models.factory import model_new_params
    model = build_model('vit_tiny_patch16_224', 'dge', num_classes=3, img_size=32, patch_size=16, depth=66,
                        embed_dim=8, num_heads=1)
    new = model_new_params(model)
    assert len(new) == 2 * 66 and 'blocks.65.router.weight' in new


def _oracle():
    spec = importlib.util.spec_from_file_location('dge_oracle', Path(__file__).parents[1] / 'tools/oracles/dge.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('path', ['packed', 'masked'])
def test_vtpack_gives_the_same_routing_logits_and_complexity_ratio(path):
    """vtpack's deit_dge (its plain-PyTorch training path, argmax routing) on seeded weights and input, saved by
    ``python tools/oracles/dge.py --official-dir VTPACK --save-fixture tests/fixtures/dge_vtpack.pt``."""
    oracle = _oracle()
    official = torch.load(Path(__file__).parent / 'fixtures/dge_vtpack.pt', weights_only=True)
    model, checksum = oracle.tiny_model(official['splits'])
    assert checksum == pytest.approx(official['checksum'], rel=1e-9)  # the same seeded weights
    x = oracle.seeded_input()
    ours = oracle.run_ours(model, x, path=path)
    assert torch.equal(ours['routing'], official['routing'].long())
    assert torch.allclose(ours['logits'], official['logits'], rtol=1e-4, atol=1e-5)
    assert ours['ratio'] == pytest.approx(official['ratio'], rel=1e-5)
    assert abs(ours['ratio'] - official['loop_ratio']) < 2e-3  # vtpack's loop adds ~constant patch-embed/head term
    given = oracle.run_ours(model, x, official['given_routing'].long(), path)
    assert torch.allclose(given['logits'], official['given_logits'], rtol=1e-4, atol=1e-5)
    assert given['ratio'] == pytest.approx(official['given_ratio'], rel=1e-5)


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match='divide the region'):
        tiny(64, cfg=dict(splits=(4, 3, 1)))
    with pytest.raises(ValueError, match='divide the region'):
        tiny(64, cfg=dict(splits=(4, 0)))
    with pytest.raises(ValueError, match='force_split'):
        tiny(64).configure(force_split=3)


def test_training_reaches_the_budget_and_resume_keeps_the_routers(tmp_path):
    import csv
    import train_gpu
    from conftest import TINY_FLAGS, make_image_folder
    data = make_image_folder(tmp_path / 'data', per_class=40)
    run = tmp_path / 'run'
    flags = [*TINY_FLAGS, '--img-size', '64', '--batch-size', '8', '--method', 'dge', '--dge-budget', '0.5']
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '4', *flags]) == 0
    rows = list(csv.DictReader((run / 'log.csv').open()))
    assert abs(float(rows[-1]['val_compute_ratio']) - 0.5) < 0.1  # starts near 1.0 (finest almost everywhere)
    assert float(rows[-1]['val_query_share']) < float(rows[-1]['val_compute_ratio'])  # keys/values stay dense
    saved = torch.load(run / 'last.pth', weights_only=True)['model']
    assert train_gpu.main(['--resume', str(run / 'last.pth'), '--epochs', '5', '--lr', '0']) == 0
    resumed = torch.load(run / 'last.pth', weights_only=True)
    assert resumed['epoch'] == 4
    router = 'blocks.0.router.bias'
    assert router in resumed['model'] and torch.allclose(resumed['model'][router], saved[router], atol=1e-3)
