"""Oracle: our DGE against vtpack's own DeiT-DGE (StevenGrove/vtpack, vtpack/models/dge/deit_dge.py) on the same
weights and images: router logits, routing decisions, logits and the complexity ratio the budget holds.

vtpack's sparse path needs its C++/CUDA extension: vtpack/layers/dge.py, grained_sample.py and sparse_ops.py all
start with ``from vtpack import _C``, which fails (ImportError) unless ``python setup.py build_ext`` was run with
CUDA. Its training path (``sparse_train=False``: every split's queries pooled by grained_sample_compress_dense,
plain attention since every image then has the same number of queries, grained_sample_decompress_dense) is plain
PyTorch and never calls ``_C``; so this script imports vtpack with an empty stand-in module for ``_C`` and runs
that path on the CPU (timm >= 0.9 also lost ``_init_vit_weights``, which vtpack only uses to initialise weights
this script overwrites). vtpack routes with a Gumbel sample in training; here both models route by the
noise-free argmax of their router logits (vtpack's inference rule), or by one given routing.

    python tools/oracles/dge.py --official-dir /path/to/vtpack [--images 64] [--splits 4 2 1]
    python tools/oracles/dge.py --official-dir /path/to/vtpack --save-fixture tests/fixtures/dge_vtpack.pt

The fixture holds vtpack's outputs for seeded weights and a seeded input (tiny model, see ``TINY``); the test
builds the same weights with ``tiny_model`` and checks ours against it offline.
"""
import argparse
import contextlib
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
from models import build_model  # noqa: E402

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)  # 8 x 8 grid, 4 regions


def tiny_model(splits=(4, 2, 1), seed=0):
    """Our tiny DGE ViT (region = the largest split, as in vtpack) with seeded weights: N(0, 0.3) everywhere,
    1 + N(0, 0.1) for norm weights. Returns the model and a checksum of its weights."""
    kw = dict(TINY)
    model = build_model('vit_tiny_patch16_224', 'dge', dict(region=max(splits), splits=list(splits)),
                        num_classes=kw.pop('num_classes'), drop_path_rate=0.0, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if 'norm' in name else 0.3)
                    + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
    return model, float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def seeded_input(batch=4, seed=1):
    return torch.randn((batch, 3, TINY['img_size'], TINY['img_size']), generator=torch.Generator().manual_seed(seed))


def texture_images(count, size, seed=0):
    """Generated texture pictures (the demo data set's), normalised to mean 0.5 / std 0.25."""
    from datasets.demo import CLASSES, draw_texture
    rng = np.random.default_rng(seed)
    pics = [np.asarray(draw_texture(CLASSES[i % len(CLASSES)], rng, size)) for i in range(count)]
    return (torch.tensor(np.stack(pics)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


def load_vtpack(official_dir):
    """vtpack's deit_dge module, imported with an empty stand-in for its C++/CUDA extension."""
    sys.path.insert(0, os.path.abspath(official_dir))
    import vtpack
    vtpack._C = sys.modules['vtpack._C'] = types.ModuleType('vtpack._C')  # only the sparse ops call it
    import timm.models.vision_transformer as tv
    if not hasattr(tv, '_init_vit_weights'):
        tv._init_vit_weights = lambda *args, **kwargs: None
    from vtpack.models.dge import deit_dge
    return deit_dge


def official_model(deit_dge, ours, splits):
    """vtpack's VisionTransformer with our model's weights (qkv split into q and kv, router -> dge.router.gate)."""
    theirs = deit_dge.VisionTransformer(img_size=TINY['img_size'], patch_size=TINY['patch_size'],
                                        embed_dim=TINY['embed_dim'], depth=TINY['depth'], num_heads=TINY['num_heads'],
                                        num_classes=TINY['num_classes'], qkv_bias=True, split_sizes=list(splits))
    state, c = dict(theirs.state_dict()), TINY['embed_dim']
    for name, value in ours.state_dict().items():
        if '.attn.qkv.' in name:
            state[name.replace('qkv', 'q')], state[name.replace('qkv', 'kv')] = value[:c], value[c:]
        else:
            state[name.replace('.router.', '.dge.router.gate.')] = value
    theirs.load_state_dict(state, strict=True)
    return theirs


@contextlib.contextmanager
def routing_rule(routing=None):
    """Replace Gumbel-softmax (both models call F.gumbel_softmax in training) by the argmax of the logits, or by
    ``routing`` ([blocks, B, regions] split indices, one block per call)."""
    original, calls = F.gumbel_softmax, iter(routing) if routing is not None else None

    def hard(logits, *args, **kwargs):
        index = logits.argmax(-1) if calls is None else next(calls).view(logits.shape[:-1])
        return F.one_hot(index, logits.shape[-1]).to(logits.dtype)

    F.gumbel_softmax = hard
    try:
        yield
    finally:
        F.gumbel_softmax = original


def run_official(theirs, images, routing=None):
    """vtpack's logits, routing [blocks, B, regions], router logits and complexity ratios: the training loop's
    (``model.complexity``, which adds a constant for patch embedding and head) and the blocks' only."""
    logits_seen = []
    hooks = [blk.dge.router.register_forward_hook(lambda m, i, o: logits_seen.append(o.flatten(1, 2)))
             for blk in theirs.blocks]
    theirs.train()
    with torch.no_grad(), routing_rule(routing):
        logits = theirs(images)
        comp = theirs.complexity(images)
        blocks = [blk.dge.get_complexity() for blk in theirs.blocks]
    for h in hooks:
        h.remove()
    gates = torch.stack([blk.dge.states['gate'].flatten(1, 2).argmax(-1) for blk in theirs.blocks])
    ratio = float(comp['dynamic'] / comp['static'])
    block_ratio = float(sum(b['dynamic'] for b in blocks).mean() / sum(b['static'] for b in blocks).mean())
    return dict(logits=logits, routing=gates, router_logits=torch.stack(logits_seen), ratio=ratio,
                block_ratio=block_ratio)


def run_ours(model, images, routing=None, path='masked'):
    """Our logits, routing, router logits and compute ratio on the masked (training) or packed (inference) path."""
    logits_seen, taken = [], []
    hooks = [blk.router.register_forward_hook(lambda m, i, o: logits_seen.append(o)) for blk in model.blocks]
    hooks += [blk.register_forward_hook(lambda m, i, o: taken.append(o[2])) for blk in model.blocks]
    model.train(path == 'masked')
    model.configure(path=path, routing=routing)
    model.method_stats()
    with torch.no_grad(), routing_rule():
        logits = model(images)
    for h in hooks:
        h.remove()
    model.configure(path='auto', routing=None)
    return dict(logits=logits, routing=torch.stack(taken),
                router_logits=torch.stack(logits_seen) if logits_seen else None,
                ratio=model.method_stats()['compute_ratio'])


def compare(ours, theirs):
    rel = ((ours['logits'] - theirs['logits']).abs().amax(1) / theirs['logits'].abs().amax(1))
    out = dict(top1=float((ours['logits'].argmax(1) == theirs['logits'].argmax(1)).float().mean()),
               max_rel=float(rel.max()), within_1e3=float((rel <= 1e-3).float().mean()),
               routing=float((ours['routing'] == theirs['routing']).float().mean()),
               ratio_vs_blocks=ours['ratio'] - theirs['block_ratio'], ratio_vs_loop=ours['ratio'] - theirs['ratio'])
    if ours['router_logits'] is not None:
        out['router_logits_max_diff'] = float((ours['router_logits'] - theirs['router_logits']).abs().max())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--official-dir', required=True, help='a checkout of StevenGrove/vtpack')
    parser.add_argument('--splits', type=int, nargs='+', default=[4, 2, 1], help='split sizes (any order)')
    parser.add_argument('--images', type=int, default=64, help='generated texture pictures to compare on')
    parser.add_argument('--save-fixture', help='write vtpack outputs for the seeded tiny input here')
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.official_dir, 'vtpack', 'models', 'dge', 'deit_dge.py')):
        print(f"error: '{args.official_dir}' is not a vtpack checkout (no vtpack/models/dge/deit_dge.py); "
              f"pass the folder of a clone of github.com/StevenGrove/vtpack", file=sys.stderr)
        return 2
    ours, checksum = tiny_model(args.splits)
    theirs = official_model(load_vtpack(args.official_dir), ours, args.splits)
    images = texture_images(args.images, TINY['img_size'])
    official = run_official(theirs, images)
    regions = official['routing'].shape[-1]
    random_routing = torch.randint(0, len(args.splits), (TINY['depth'], args.images, regions),
                                   generator=torch.Generator().manual_seed(2))
    forced = run_official(theirs, images, random_routing)
    print(f'vtpack deit_dge, splits {args.splits}, {args.images} texture images, routing by argmax: splits used '
          f'{torch.bincount(official["routing"].flatten(), minlength=len(args.splits)).tolist()}')
    for label, routing, ref in (('router argmax', None, official), ('random routing', random_routing, forced)):
        for path in ('masked', 'packed'):
            print(f'{label:15s} {path:7s}', {k: float(f"{v:.3g}") for k, v in
                                              compare(run_ours(ours, images, routing, path), ref).items()})
    if args.save_fixture:
        x = seeded_input()
        fixed_routing = torch.randint(0, len(args.splits), (TINY['depth'], len(x), regions),
                                      generator=torch.Generator().manual_seed(3))
        argmax, given = run_official(theirs, x), run_official(theirs, x, fixed_routing)
        torch.save(dict(splits=args.splits, checksum=checksum, routing=argmax['routing'].to(torch.int8),
                        logits=argmax['logits'], ratio=argmax['block_ratio'], loop_ratio=argmax['ratio'],
                        given_routing=fixed_routing.to(torch.int8), given_logits=given['logits'],
                        given_ratio=given['block_ratio']), args.save_fixture)
        print(f'fixture: {args.save_fixture} ({os.path.getsize(args.save_fixture)} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
