"""Token maps: provenance is right on constructed cases and the pictures are written for every method."""
import torch

import predict
from conftest import TINY
from models import build_model
from models.registry import available_methods
from utils.token_maps import record_tokens

SIXTY_FOUR = {**TINY, 'img_size': 64}


def test_tome_groups_partition_the_patches_and_match_token_sizes():
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=6, track_source=True), num_classes=3, **SIXTY_FOUR).eval()
    records = record_tokens(model, torch.randn(2, 3, 64, 64))
    owner = records[-1]['owner']
    sizes = model.tome_source[:, 1:, 1:].sum(-1)  # patches per final image token
    for b in range(2):
        assert (owner[b] >= 0).all()  # a partition: every patch in exactly one group
        assert torch.equal(torch.bincount(owner[b], minlength=sizes.shape[1]).float(), sizes[b])


def test_mtvit_keep_half_at_one_block_masks_half_the_patches():
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.5, prune_blocks=[2], multi_scale=False),
                        num_classes=3, **SIXTY_FOUR).eval()
    records = record_tokens(model, torch.randn(2, 3, 64, 64))
    assert [r['block'] for r in records] == [2]
    assert records[0]['removed'].sum(dim=1).tolist() == [32, 32]
    assert len(records[0]['owner'][0].unique()) == 32  # merged patches belong to kept tokens


def test_toe_map_tells_seeds_from_expansions():
    model = build_model('vit_tiny_patch16_224', 'toe', dict(keep_rate=[0.5], steps=[0], init_keep_rate=0.25),
                        num_classes=3, **SIXTY_FOUR)
    model.update_schedule(0, 10)
    entry = record_tokens(model, torch.randn(2, 3, 64, 64))[0]
    kept = ~entry['removed']
    assert kept.sum(dim=1).tolist() == [32, 32] and entry['seed'].sum(dim=1).tolist() == [16, 16]
    assert (kept | ~entry['seed']).all()  # every seed is kept; the other kept tokens are expansions
    assert model.training  # recording in training mode leaves the mode as it was


def test_dge_forced_coarse_grain_is_one_block_per_region():
    model = build_model('vit_tiny_patch16_224', 'dge', num_classes=3, **SIXTY_FOUR).eval()
    model.configure(force_split='coarsest')
    records = record_tokens(model, torch.randn(1, 3, 64, 64))
    assert len(records) == 4 and all((r['grain'] == 1).all() for r in records)


def test_nothing_is_recorded_unless_asked():
    model = build_model('vit_tiny_patch16_224', 'gtp', dict(num_prop=2), num_classes=3, **TINY).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert model.token_record == []
    assert len(record_tokens(model, torch.randn(1, 3, 32, 32))) == 4


def test_predict_writes_token_maps_for_every_method(tmp_path):
    import train_gpu
    from conftest import TINY_FLAGS, make_image_folder
    data = make_image_folder(tmp_path / 'data', per_class=4)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'run'), '--epochs', '1',
                           *TINY_FLAGS]) == 0
    for method in available_methods():
        out = tmp_path / f'maps-{method}'
        args = ['--weights', str(tmp_path / 'run' / 'best.pth'), '--data-root', str(data), '--token-maps',
                '--n-visualization', '3', '--output-dir', str(out), '--workers', '0', '--method', method]
        assert predict.main(args) == 0, method
        assert (out / 'token_maps.png').stat().st_size > 1000
        assert len(list((out / 'token_maps').glob('*.png'))) == 3
        assert 'Token maps' in (out / 'report.html').read_text()


def test_benchmark_draws_one_token_map_row_per_method(tmp_path):
    import benchmark
    from PIL import Image
    from test_benchmark import TINY_BENCH
    image = tmp_path / 'x.png'
    Image.new('RGB', (64, 64), (200, 30, 30)).save(image)
    out = tmp_path / 'bench'
    assert benchmark.main([*TINY_BENCH, '--methods', 'none', 'tome', 'dge', '--token-maps', str(image),
                           '--output-dir', str(out)]) == 0
    assert len(list((out / 'token_maps').glob('*/token_maps.png'))) == 3
    assert Image.open(out / 'token_maps.png').height > 3 * 100


def test_overview_title_of_several_lines_stays_above_the_first_row():
    """MTViT's settings wrap the title to 2-3 lines; with many rows tight_layout alone put it over the
    first row's titles."""
    import numpy as np
    from models.registry import method_cfg
    from utils.token_maps import draw_overview
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.5, prune_blocks=[2]), num_classes=3, **TINY)
    rows = [[(np.zeros((4, 4, 3)), f'{i:03d}.png'), (np.ones((4, 4, 3)), 'block 3: 8 tokens, 8 patches removed')]
            for i in range(8)]
    fig = draw_overview(rows, f'Token maps: mtvit {method_cfg(model)}')
    fig.canvas.draw()
    title = fig._suptitle
    assert title.get_text().count('\n') >= 1  # the case of the issue: a title of two lines or more
    box = title.get_window_extent()
    first_row = [ax.title.get_window_extent() for ax in fig.axes[:2]]
    assert box.y0 > max(b.y1 for b in first_row) and box.y1 <= fig.bbox.y1  # between the row and the top edge
