"""The training path end to end: learning, resume, distributed runs, and bad input."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpu
from conftest import TINY_FLAGS, make_image_folder

REPO = Path(__file__).resolve().parent.parent


def read_log(run_dir):
    return list(csv.DictReader((Path(run_dir) / 'log.csv').open()))


def train(argv, capsys=None):
    code = train_gpu.main(argv)
    err = capsys.readouterr().err if capsys else ''
    return code, err


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('textures'), per_class=40)


@pytest.fixture(scope='module')
def trained(shapes, tmp_path_factory):
    """An 8-epoch dense run on generated textures (shared by several tests)."""
    run = tmp_path_factory.mktemp('run')
    assert train_gpu.main(['--data-root', str(shapes), '--output-dir', str(run), '--epochs', '8', *TINY_FLAGS, '--batch-size', '8']) == 0
    return run


def test_dense_training_learns(trained):
    rows = read_log(trained)
    assert [int(r['epoch']) for r in rows] == list(range(8))
    assert max(float(r['top1']) for r in rows) > 70  # chance is 33 %
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    for name in ('best.pth', 'last.pth', 'config.yaml', 'class_indices.json', 'train_files.csv', 'val_files.csv'):
        assert (trained / name).is_file(), name


def test_checkpoint_is_self_describing_and_weights_only(trained):
    ckpt = torch.load(trained / 'best.pth', map_location='cpu', weights_only=True)
    assert ckpt['model_name'] == 'vit_tiny_patch16_224'
    assert ckpt['class_names'] == ['checker', 'stripes_h', 'stripes_v']
    assert ckpt['data_config']['input_size'] == (3, 32, 32)
    assert ckpt['method'] == 'none'
    last = torch.load(trained / 'last.pth', map_location='cpu', weights_only=True)
    assert last['epoch'] == 7 and last['val']['val_images'] == 24  # 20 % of 120 images, each counted once


def test_resume_continues_with_the_same_optimizer_state(trained, tmp_path):
    import shutil
    run = tmp_path / 'resumed'
    shutil.copytree(trained, run)
    before = torch.load(run / 'last.pth', weights_only=True)
    assert train_gpu.main(['--resume', str(run / 'last.pth'), '--epochs', '9']) == 0
    rows = read_log(run)
    assert [int(r['epoch']) for r in rows] == list(range(9))
    after = torch.load(run / 'last.pth', weights_only=True)
    assert after['epoch'] == 8
    assert after['num_updates'] > before['num_updates']
    step_before = before['optimizer']['state'][0]['step']
    step_after = after['optimizer']['state'][0]['step']
    assert step_after == step_before + (after['num_updates'] - before['num_updates'])


def test_resume_auto_picks_newest_last(trained, tmp_path, capsys):
    import shutil
    run = tmp_path / 'auto'
    shutil.copytree(trained, run)
    assert train_gpu.main(['--resume', 'auto', '--output-dir', str(run), '--epochs', '9']) == 0
    assert int(read_log(run)[-1]['epoch']) == 8
    assert 'last.pth' in capsys.readouterr().out


@pytest.mark.parametrize('method', ['none', 'tome'])
def test_distillation_from_the_dense_best(method, trained, tmp_path):
    """--teacher best.pth of the dense run: log.csv has the teacher's time, best.pth the student alone (the keys
    of a run without teacher); a resume builds the teacher again from its saved flags."""
    data = make_image_folder(tmp_path / 'data', per_class=5)
    run = tmp_path / 'run'
    flags = ['--method', method, '--tome-r', '2'] if method == 'tome' else []
    argv = ['--data-root', str(data), '--output-dir', str(run), *TINY_FLAGS, *flags,
            '--teacher', str(trained / 'best.pth'), '--distill-type', 'hard', '--mixup', '0.8']
    assert train_gpu.main([*argv, '--epochs', '1']) == 0
    best, dense = (torch.load(r / 'best.pth', weights_only=True) for r in (run, trained))
    if method == 'none':
        assert best['model'].keys() == dense['model'].keys() and best.keys() == dense.keys()
    assert not any('teacher' in key for key in best['model'])
    assert train_gpu.main(['--resume', str(run / 'last.pth'), '--epochs', '2']) == 0
    rows = read_log(run)
    assert len(rows) == 2 and all(float(row['train_teacher_seconds']) > 0 for row in rows)
    assert torch.load(run / 'last.pth', weights_only=True)['args']['teacher'] == str(trained / 'best.pth')


def test_config_file_sets_flags_and_command_line_wins(shapes, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 3\nlr: 0.002\nval-split: 0.3\n')
    args = train_gpu.parse_args(['--config', str(cfg), '--epochs', '1', '--data-root', str(shapes)])
    assert (args.epochs, args.lr, args.val_split) == (1, 0.002, 0.3)


def test_image_modes_become_rgb(tmp_path):
    import numpy as np
    from PIL import Image
    from datasets.images import load_rgb
    arr16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    images = {
        'grey.png': Image.new('L', (8, 8), 100),
        'palette.png': Image.new('P', (8, 8), 3),
        'rgba.png': Image.new('RGBA', (8, 8), (255, 0, 0, 0)),
        'deep.png': Image.fromarray(arr16),
    }
    for name, img in images.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == 'RGB', name
    assert load_rgb(tmp_path / 'rgba.png').getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    deep = np.asarray(load_rgb(tmp_path / 'deep.png'))[..., 0]
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 200  # rescaled, not clipped


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=12)
    (data / 'checker' / 'empty.png').write_bytes(b'')
    (data / 'checker' / 'notes.txt').write_text('not an image')
    (data / 'stripes_h' / 'fake.jpg').write_text('not a jpeg')
    good = (data / 'stripes_h' / '000.png').read_bytes()
    (data / 'stripes_v' / 'truncated.png').write_bytes(good[: len(good) // 2])
    run = tmp_path / 'run'
    code = train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS])
    assert code == 0
    skipped = list(csv.DictReader((run / 'skipped_files.csv').open()))
    names = sorted(Path(r['file']).name for r in skipped)
    assert names == ['empty.png', 'fake.jpg', 'notes.txt', 'truncated.png']
    assert '4 files skipped' in (run / 'train.log').read_text()


def _expect_error(argv, capsys, *fragments):
    code = train_gpu.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_missing_data_root(tmp_path, capsys):
    _expect_error(['--data-root', str(tmp_path / 'nope'), *TINY_FLAGS], capsys, 'does not exist')


def test_too_few_classes(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'one', classes=('checker',), per_class=4)
    (data / 'empty_class').mkdir()
    _expect_error(['--data-root', str(data), '--output-dir', str(tmp_path / 'r'), *TINY_FLAGS], capsys,
                  'at least 2 class')


def test_nb_classes_disagrees(shapes, tmp_path, capsys):
    _expect_error(['--data-root', str(shapes), '--nb-classes', '5', '--output-dir', str(tmp_path / 'r'),
                   *TINY_FLAGS], capsys, '--nb-classes 5', '3 class')


def test_val_classes_differ(tmp_path, capsys):
    make_image_folder(tmp_path / 'd' / 'train', per_class=4)
    make_image_folder(tmp_path / 'd' / 'val', classes=('checker', 'stripes_h', 'dots'), per_class=2)
    _expect_error(['--data-root', str(tmp_path / 'd'), '--output-dir', str(tmp_path / 'r'), *TINY_FLAGS],
                  capsys, 'other classes', 'dots')


@pytest.mark.parametrize('kind', ['missing', 'not_a_checkpoint', 'other_architecture'])
def test_bad_pretrained(kind, shapes, tmp_path, capsys):
    path = tmp_path / 'w.pth'
    if kind == 'not_a_checkpoint':
        path.write_text('hello')
    elif kind == 'other_architecture':
        import timm
        other = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=32,
                                  num_heads=2)
        torch.save({'model': other.state_dict()}, path)
    expected = {'missing': 'does not exist', 'not_a_checkpoint': 'is a text file, not a checkpoint',
                'other_architecture': 'do not fit'}[kind]
    line = _expect_error(['--data-root', str(shapes), '--output-dir', str(tmp_path / 'r'), *TINY_FLAGS,
                          '--pretrained', str(path)], capsys, expected)
    if kind == 'other_architecture':
        assert 'the file holds embed width 32' in line  # names the cause


def test_resume_from_another_class_list(trained, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'other', classes=('checker', 'dots', 'stripes_h', 'stripes_v'), per_class=5)
    last = trained / 'last.pth'
    before = last.read_bytes()
    _expect_error(['--resume', str(last), '--data-root', str(data), '--output-dir', str(tmp_path / 'r')],
                  capsys, 'cannot resume', 'classes')
    _expect_error(['--resume', str(last), '--model', 'deit_tiny_patch16_224', '--output-dir', str(tmp_path / 'r')],
                  capsys, 'cannot resume', 'model')
    assert last.read_bytes() == before



def test_resume_with_fewer_epochs_than_trained_is_refused_and_keeps_the_run(trained, capsys):
    kept = {name: (trained / name).read_bytes() for name in ('config.yaml', 'last.pth', 'log.csv')}
    _expect_error(['--resume', str(trained / 'last.pth'), '--epochs', '3'], capsys,
                  'with --epochs 3', 'trained 8 epochs already', '--epochs 9 or more')
    assert all((trained / name).read_bytes() == data for name, data in kept.items())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path, capsys, monkeypatch):
    import shutil
    run = tmp_path / 'nan'
    shutil.copytree(trained, run)
    good = (run / 'last.pth').read_bytes()
    calls = {'n': 0}
    real_forward = torch.nn.CrossEntropyLoss.forward

    def diverging(self, logits, target):  # the loss blows up after a few steps of the resumed run
        calls['n'] += 1
        loss = real_forward(self, logits, target)
        return loss * float('nan') if calls['n'] > 2 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, 'forward', diverging)
    _expect_error(['--resume', str(run / 'last.pth'), '--epochs', '10'], capsys, 'nan', f"{run / 'last.pth'} holds epoch 7")
    assert (run / 'last.pth').read_bytes() == good
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 7


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _launch(launcher, data, run, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [sys.executable, '-m', *launcher, '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(REPO / 'train_gpu.py'), '--data-root', str(data), '--output-dir', str(run), '--epochs', '1',
           *TINY_FLAGS, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('launcher', [['torch.distributed.run'], ['torch.distributed.launch'],
                                      ['torch.distributed.launch', '--use_env']],
                         ids=['torchrun', 'legacy-launch', 'legacy-launch-use-env'])
def test_two_process_cpu_run(launcher, tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=15)  # 9 val images: odd, so padding would show
    (data / 'checker' / 'notes.txt').write_text('not an image')
    run = tmp_path / 'run'
    # 36 train images, 18 per process: batches of 5 (odd) under Mixup
    result = _launch(launcher, data, run, ['--mixup', '0.8', '--batch-size', '5'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count('skipping') == 1  # process 0 scans the data, the other gets its split
    files = sorted(p.name for p in run.iterdir())
    assert files == ['best.pth', 'class_indices.json', 'config.yaml', 'curves.png', 'last.pth', 'log.csv',
                     'skipped_files.csv', 'train.log', 'train_files.csv', 'val_files.csv']
    ckpt = torch.load(run / 'last.pth', weights_only=True)
    assert ckpt['val']['val_images'] == 9
    assert ckpt['num_updates'] == 3
    assert len(ckpt['rng']) == 2
    assert len(read_log(run)) == 1


def test_a_scan_longer_than_the_process_group_timeout_does_not_stop_the_run(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=10)
    run = tmp_path / 'run'
    slow = tmp_path / 'slow_scan.py'  # train_gpu.py with process 0's scan slowed past --dist-timeout
    slow.write_text(f"""import sys, time
sys.path.insert(0, {str(REPO)!r})
import datasets.folder, train_gpu
listing = datasets.folder.list_images
datasets.folder.list_images = lambda *args: (time.sleep(1.5), listing(*args))[1]  # 3 class folders: 4.5 s
sys.exit(train_gpu.main(sys.argv[1:]))
""")
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           str(slow), '--data-root', str(data), '--output-dir', str(run), '--epochs', '1', '--dist-timeout', '3',
           *TINY_FLAGS]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run / 'last.pth', weights_only=True)['val']['val_images'] == 6


@pytest.mark.parametrize('method', ['tome', 'gtp', 'mtvit', 'toe', 'dge'])
def test_every_method_trains_under_ddp(method, trained, tmp_path):
    """Each with the dense run's best.pth as --teacher: an unwrapped teacher per process, on its own batch."""
    data = make_image_folder(tmp_path / 'data', per_class=10)
    run = tmp_path / 'run'
    flags = {'tome': ['--tome-r', '2'], 'gtp': ['--gtp-num-prop', '2'], 'mtvit': ['--mtvit-keep-rate', '0.5'],
             'toe': [], 'dge': []}[method]
    result = _launch(['torch.distributed.run'], data, run, ['--method', method, *flags, '--epochs', '2',
                                                            '--teacher', str(trained / 'best.pth')])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / 'last.pth', weights_only=True)
    assert ckpt['method'] == method and ckpt['epoch'] == 1
    assert all(float(row['train_teacher_seconds']) > 0 for row in read_log(run))
