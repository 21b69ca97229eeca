"""benchmark.py: a row per method and setting, ratios that move the right way, files that agree."""
import json

import pandas as pd
import pytest

import benchmark
import predict
import train_gpu
from conftest import TINY_FLAGS, make_image_folder

TINY_BENCH = ['--model', 'vit_tiny_patch16_224', '--img-size', '64', '--model-kwargs', 'patch_size=8', 'depth=4',
              'embed_dim=64', 'num_heads=2', '--batch-size', '4', '--runs', '1', '--warmup', '0', '--mac-images', '1']


def test_every_method_and_sweep_setting_gets_a_row(tmp_path):
    out = tmp_path / 'bench'
    assert benchmark.main([*TINY_BENCH, '--methods', 'none', 'tome', 'gtp', 'mtvit', 'toe', 'dge', '--sweep',
                           'tome.r=2,4,6', 'gtp.num_prop=2,4,6', 'mtvit.keep_rate=0.9,0.7,0.5',
                           'dge.force_split=4,2,1', '--output-dir', str(out)]) == 0
    table = pd.read_csv(out / 'benchmark.csv')
    assert list(table['method']) == ['none'] + ['tome'] * 3 + ['gtp'] * 3 + ['mtvit'] * 3 + ['dge'] * 3 + ['toe']
    dense = table.iloc[0]
    assert dense['mac_ratio'] == 1 and dense['speedup'] == 1
    for method in ('tome', 'gtp', 'mtvit', 'dge'):
        ratios = table[table['method'] == method]['mac_ratio'].tolist()
        assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.9, (method, ratios)
    toe = table[table['method'] == 'toe'].iloc[0]
    assert toe['mac_ratio'] == pytest.approx(1.0)  # ToE changes training only
    markdown = (out / 'benchmark.md').read_text()
    assert markdown.count('\n| ') == len(table) + 1  # header + one line per row
    for _, row in table.iterrows():
        assert f"| {row['method']} | {row['settings']} |" in markdown
    assert (out / 'pareto.png').stat().st_size > 1000


def test_training_cost_mode(tmp_path):
    out = tmp_path / 'train'
    assert benchmark.main([*TINY_BENCH, '--train', '--sweep', 'toe.stage=0,2', '--output-dir', str(out)]) == 0
    table = pd.read_csv(out / 'benchmark.csv')
    assert list(table['method']) == ['none', 'toe', 'toe'] and 'training' in (out / 'benchmark.md').read_text()


def test_accuracy_columns_match_predict(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=10)
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS]) == 0
    out = tmp_path / 'bench'
    assert benchmark.main(['--weights', str(run / 'best.pth'), '--data-root', str(data), '--methods', 'none',
                           '--sweep', 'tome.r=1', '--batch-size', '4', '--runs', '1', '--warmup', '0',
                           '--mac-images', '1', '--output-dir', str(out)]) == 0
    table = pd.read_csv(out / 'benchmark.csv')
    for method, extra in (('none', []), ('tome', ['--method', 'tome', '--tome-r', '1'])):
        report = tmp_path / f'report-{method}'
        assert predict.main(['--weights', str(run / 'best.pth'), '--data-root', str(data), '--output-dir',
                             str(report), '--workers', '0', *extra]) == 0
        summary = json.loads((report / 'summary.json').read_text())
        row = table[table['method'] == method].iloc[0]
        assert row['top1'] == pytest.approx(100 * summary['accuracy'])
        assert row['macro_f1'] == pytest.approx(100 * summary['macro_f1'])


@pytest.mark.parametrize('sweep, message', [('tome.r', 'METHOD.KEY=V1,V2'),
                                            ('tome.r=x', "error: tome r='x' is not a value of r (default 13)"),
                                            ('gtp.num_prop=4,x', "error: gtp num_prop='x' is not a value of num_prop")])
def test_bad_sweep_is_clear(sweep, message, tmp_path, capsys):
    assert benchmark.main([*TINY_BENCH, '--sweep', sweep, '--output-dir', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err and not (tmp_path / 'b').exists()


@pytest.mark.parametrize('flag', [['--runs', '0'], ['--warmup', '-1'], ['--batch-size', '0'], ['--mac-images', '0'],
                                  ['--threads', '0'], ['--img-size', '0']])
def test_counts_below_their_least_are_refused_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main([*TINY_BENCH, *flag])
    assert stop.value.code == 2
    assert f'argument {flag[0]}' in capsys.readouterr().err


def test_with_data_rows_are_measured_on_the_data_images(tmp_path):
    from datasets.images import load_rgb
    from datasets.transforms import eval_transform
    from utils.benchmark import BenchConfig, input_images
    data = make_image_folder(tmp_path / 'data', per_class=3)
    cfg = BenchConfig('vit_tiny_patch16_224', 32, batch_size=8, mac_images=2)
    data_config = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3,
                       crop_pct=1.0, crop_mode='center')
    files = sorted(str(p) for p in data.rglob('*.png'))
    images = input_images(cfg, files, data_config)
    first = files[0]
    assert images.shape == (8, 3, 32, 32)
    assert (images[0] - eval_transform(data_config)(load_rgb(first))).abs().max() == 0
    assert input_images(cfg).shape == (8, 3, 32, 32)  # random images without data


def test_images_that_fail_to_decode_are_skipped_or_refused(tmp_path, caplog):
    from PIL import Image
    from utils.benchmark import BenchConfig, input_images
    from utils.errors import UserError
    data = make_image_folder(tmp_path / 'data', classes=('checker',), per_class=2)
    Image.open(data / 'checker' / '000.png').save(tmp_path / 'whole.jpg')
    (data / 'checker' / 'cut.jpg').write_bytes((tmp_path / 'whole.jpg').read_bytes()[:-100])  # decodes, then fails
    cfg = BenchConfig('vit_tiny_patch16_224', 32, batch_size=3, mac_images=1)
    data_config = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3,
                       crop_pct=1.0)
    files = sorted(str(p) for p in (data / 'checker').iterdir())
    assert input_images(cfg, files, data_config).shape == (2, 3, 32, 32)
    assert 'cut.jpg' in caplog.text
    with pytest.raises(UserError, match='none of the 1 images'):
        input_images(cfg, [str(data / 'checker' / 'cut.jpg')], data_config)


def test_output_dir_is_replaced_whole_and_other_files_are_refused_up_front(tmp_path, capsys):
    out = tmp_path / 'bench'
    (out / 'token_maps' / '01-tome').mkdir(parents=True)               # an earlier run's, with --token-maps
    (out / 'token_maps.png').write_bytes(b'old')
    assert benchmark.main([*TINY_BENCH, '--methods', 'none', '--output-dir', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['benchmark.csv', 'benchmark.md', 'pareto.png']
    (out / 'notes.txt').write_text('mine')
    assert benchmark.main([*TINY_BENCH, '--methods', 'none', '--output-dir', str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: --output-dir '{out}' holds files other than an earlier output (notes.txt)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bench'] and (out / 'notes.txt').read_text() == 'mine'


def test_model_flags_beside_weights_are_refused_not_ignored(tmp_path, capsys):
    from test_predict_anywhere import tiny_checkpoint
    weights = tiny_checkpoint(tmp_path / 'best.pth')
    assert benchmark.main(['--weights', str(weights), '--img-size', '64', '--output-dir', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --img-size: the --weights checkpoint gives the model and its input size')
    assert not (tmp_path / 'b').exists()


def test_data_root_without_class_folders_is_the_message_predict_gives(tmp_path, capsys):
    from test_predict_anywhere import tiny_checkpoint
    weights, flat = tiny_checkpoint(tmp_path / 'best.pth'), make_image_folder(tmp_path / 'd', per_class=1) / 'checker'
    assert benchmark.main(['--weights', str(weights), '--data-root', str(flat), '--runs', '1', '--warmup', '0']) == 2
    assert capsys.readouterr().err.startswith(f"error: no readable images in class folders under '{flat}'")


def test_a_checkpoint_whose_weights_are_not_its_model_is_named(tmp_path, capsys):
    import torch
    from test_predict_anywhere import tiny_checkpoint
    weights = tiny_checkpoint(tmp_path / 'best.pth')
    ckpt = torch.load(weights, weights_only=True)
    torch.save({**ckpt, 'model_kwargs': {**ckpt['model_kwargs'], 'embed_dim': 32}}, weights)  # edited by hand
    assert benchmark.main(['--weights', str(weights), '--runs', '1', '--warmup', '0', '--batch-size', '2',
                           '--output-dir', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: weights in '{weights}' do not fit this model") and 'edited or mixed up' in err
