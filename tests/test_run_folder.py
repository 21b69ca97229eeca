"""Run folders, config.yaml, resume rules and crash safety: nothing of a user's run is lost or overwritten."""
import csv
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from utils import run_files
from models.checkpoint import save_atomic
from utils.errors import UserError


def read_log(run_dir):
    return list(csv.DictReader((Path(run_dir) / 'log.csv').open()))


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


def expect_error(argv, capsys, *fragments):
    code = train_gpu.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith('error:')]
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), per_class=12)  # 28 train / 8 val images


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """A 3-epoch run at batch 8 (3 updates per epoch), no warm-up."""
    run = tmp_path_factory.mktemp('run')
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '3', *TINY_FLAGS,
                           '--batch-size', '8', '--warmup-epochs', '0']) == 0
    return run


@pytest.fixture
def copy(run, tmp_path):
    shutil.copytree(run, tmp_path / 'copy')
    return tmp_path / 'copy'


def test_a_folder_holding_a_run_is_refused(copy, data, capsys):
    before = snapshot(copy)
    expect_error(['--data-root', str(data), '--output-dir', str(copy), *TINY_FLAGS], capsys,
                 'already holds a run', f"--resume {copy / 'last.pth'}")
    assert snapshot(copy) == before


def test_run_folder_inside_the_data_is_refused(data, capsys):
    expect_error(['--data-root', str(data), '--output-dir', str(data / 'runs' / 'a'), *TINY_FLAGS], capsys,
                 'inside the data folder')
    assert not (data / 'runs').exists()


def test_run_folder_inside_the_train_dir_is_refused(data, capsys):
    expect_error(['--data-root', str(data.parent), '--train-dir', data.name, '--output-dir',
                  str(data / 'run'), *TINY_FLAGS], capsys, 'inside the data folder')
    assert not (data / 'run').exists()


def test_a_run_folder_that_cannot_be_made_is_one_line(data, tmp_path, capsys):
    mine = tmp_path / 'notes.txt'
    mine.write_text('mine')
    expect_error(['--data-root', str(data), '--output-dir', str(mine), *TINY_FLAGS], capsys, 'is a file')
    expect_error(['--data-root', str(data), '--output-dir', str(mine / 'run'), *TINY_FLAGS], capsys,
                 'cannot make the run folder')  # below a file: as unwritable as a read-only place
    assert mine.read_text() == 'mine'


def test_default_run_folders_of_the_same_second_differ(tmp_path):
    default = tmp_path / 'runs' / 'vit-none-20250101-120000'
    first = run_files.claim_run_dir(None, None, [tmp_path / 'data'], default)
    second = run_files.claim_run_dir(None, None, [tmp_path / 'data'], default)
    assert first == default and second.name == default.name + '-2' and second.is_dir()
    run_files.release_run_dir(first)
    assert first.is_dir() and not (first / '.lock').exists()
    run_files.release_run_dir(second, started=False)  # a failed start leaves no folder behind
    assert not second.exists()


def test_a_failed_start_leaves_no_run_folder(data, tmp_path, capsys):
    made, given = tmp_path / 'new' / 'run', tmp_path / 'mine'
    given.mkdir()
    for folder in (made, given):
        expect_error(['--data-root', str(data), '--output-dir', str(folder), '--nb-classes', '5', *TINY_FLAGS],
                     capsys, '--nb-classes 5')
    assert not made.exists() and given.is_dir()  # a folder the user made stays


def test_config_yaml_loads_back_as_config(run, tmp_path):
    other = tmp_path / 'other'
    assert train_gpu.main(['--config', str(run / 'config.yaml'), '--output-dir', str(other), '--epochs', '1']) == 0
    first, second = (yaml.safe_load((d / 'config.yaml').read_text()) for d in (run, other))
    info = first.pop('run_info')
    assert set(info) >= {'python', 'torch', 'timm', 'method_cfg'}
    assert second.pop('run_info')['torch'] == info['torch']
    assert second.pop('epochs') == 1 and first.pop('epochs') == 3
    assert second == first
    assert first['model_kwargs'] == ['patch_size=8', 'depth=4', 'embed_dim=64', 'num_heads=2']


def test_resume_from_best_is_refused_before_anything_is_written(copy, capsys):
    before = snapshot(copy)
    expect_error(['--resume', str(copy / 'best.pth'), '--epochs', '4'], capsys,
                 f"--resume {copy / 'last.pth'}", f"--pretrained {copy / 'best.pth'}")
    assert snapshot(copy) == before


def test_early_stop_counter_survives_resume(copy):
    last = torch.load(copy / 'last.pth', weights_only=True)
    assert last['epoch'] == 2
    last.update(best_metric=101.0, best_epoch=1)  # unbeatable, one epoch ago
    torch.save(last, copy / 'last.pth')
    assert train_gpu.main(['--resume', str(copy / 'last.pth'), '--epochs', '9', '--early-stop', '2']) == 0
    assert [int(r['epoch']) for r in read_log(copy)] == [0, 1, 2, 3]  # 2 epochs without a better top-1 at epoch 3


def test_resume_auto_takes_the_newest_last_pth(tmp_path):
    for i, folder in enumerate(['b', '.', 'a']):  # the folder's own last.pth is the newest
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / 'last.pth').write_bytes(b'')
        os.utime(tmp_path / folder / 'last.pth', (1000 + 100 * (i == 1) + i, 1000 + 100 * (i == 1) + i))
    assert train_gpu.find_latest_checkpoint(tmp_path) == str(tmp_path / 'last.pth')


def test_resume_with_another_batch_size_keeps_the_schedule_in_epochs(copy):
    import math
    # 3 of 5 epochs done at 3 updates per epoch; batch 16 gives 1 update per epoch from here on
    assert train_gpu.main(['--resume', str(copy / 'last.pth'), '--epochs', '5', '--batch-size', '16']) == 0
    rows = read_log(copy)
    assert int(rows[-1]['epoch']) == 4 and torch.load(copy / 'last.pth', weights_only=True)['num_updates'] == 5
    for row in rows[3:]:  # the lr after epoch e is the cosine's at e + 1 of 5 epochs
        e = int(row['epoch'])
        expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * (e + 1) / 5))
        assert float(row['lr']) == pytest.approx(expected, rel=1e-4)


def test_a_run_from_before_sched_resumes_on_the_cosine_it_began_with(copy):
    last = torch.load(copy / 'last.pth', weights_only=True)
    assert last['args']['sched'] == 'onecycle'
    del last['args']['sched']
    torch.save(last, copy / 'last.pth')
    assert train_gpu.parse_args(['--resume', str(copy / 'last.pth')]).sched == 'cosine'
    assert train_gpu.parse_args(['--resume', str(copy / 'last.pth'), '--sched', 'onecycle']).sched == 'onecycle'


def test_epoch_end_writes_best_then_last_then_the_log(data, tmp_path, monkeypatch):
    import utils.trainer
    order = []
    real_save, real_append = utils.trainer.save_atomic, run_files.append_log_row
    monkeypatch.setattr(utils.trainer, 'save_atomic', lambda obj, path: (order.append(Path(path).name),
                                                                         real_save(obj, path)))
    monkeypatch.setattr(run_files, 'append_log_row', lambda path, row: (order.append(Path(path).name),
                                                                        real_append(path, row)))
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'r'), '--epochs', '1',
                           *TINY_FLAGS]) == 0
    assert order == ['best.pth', 'last.pth', 'log.csv']


def test_log_rows_are_appended(tmp_path):
    path = tmp_path / 'log.csv'
    run_files.append_log_row(path, dict(epoch=0, lr=0.5))
    first = path.read_text()
    run_files.append_log_row(path, dict(epoch=1, lr=0.25))
    assert path.read_text().startswith(first)
    run_files.append_log_row(path, dict(epoch=2, lr=0.125, ema_top1=50.0))  # a new column: rewritten whole
    assert [r['ema_top1'] for r in csv.DictReader(path.open())] == ['', '', '50']


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    save_atomic({'epoch': 1}, path)
    old = path.read_bytes()

    def disk_full(obj, f):
        f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UserError, match='No space left on device'):
        save_atomic({'epoch': 2}, path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']


def test_mixup_on_odd_batches_and_a_split_smaller_than_a_batch(tmp_path):
    from timm.data import Mixup
    from utils.engine import mix
    images, targets = mix(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=3),
                          torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert images.shape[0] == targets.shape[0] == 6
    assert torch.allclose(targets.sum(1), torch.ones(6))
    small = make_image_folder(tmp_path / 'small', per_class=4)  # 9 train images: one odd batch of 16
    assert train_gpu.main(['--data-root', str(small), '--output-dir', str(tmp_path / 'r'), '--epochs', '1',
                           '--val-split', '0.25', *TINY_FLAGS, '--mixup', '0.8', '--cutmix', '1.0']) == 0
    assert len(read_log(tmp_path / 'r')) == 1


def test_device_choice_under_several_processes(caplog):
    from utils.distributed import pick_device
    cuda = torch.device
    assert pick_device('cuda:1', local_rank=0, world_size=1, cuda_available=True) == cuda('cuda', 1)
    assert pick_device('cuda', local_rank=2, world_size=4, cuda_available=True) == cuda('cuda', 2)
    assert pick_device('auto', local_rank=3, world_size=4, cuda_available=True) == cuda('cuda', 3)
    assert pick_device('auto', local_rank=3, world_size=4, cuda_available=False) == cuda('cpu')
    assert not caplog.records
    assert pick_device('cuda:1', local_rank=0, world_size=2, cuda_available=True) == cuda('cuda', 0)
    assert 'CUDA_VISIBLE_DEVICES' in caplog.text
    assert pick_device('cuda:1', local_rank=1, world_size=2, cuda_available=True) == cuda('cuda', 1)
    with pytest.raises(UserError, match='--device cpu'):
        pick_device('cuda:0', cuda_available=False)


# What an operator meets: two runs on one folder, divergence, grown data, a full disk, signals


def test_a_folder_in_use_by_a_live_run_is_refused_and_free_after_it(data, tmp_path, capsys):
    from utils.run_lock import RunLock
    folder = tmp_path / 'busy'
    folder.mkdir()
    other = RunLock(folder).acquire()  # a second open of the file: flock refuses it even in this process
    expect_error(['--data-root', str(data), '--output-dir', str(folder), '--epochs', '1', *TINY_FLAGS], capsys,
                 'is in use by process', str(os.getpid()), 'another --output-dir')
    assert sorted(p.name for p in folder.iterdir()) == ['.lock']  # nothing written by the refused run
    other.release()
    (folder / '.lock').write_text('process 1 on a machine that crashed\n')  # left by a killed run: no flock held
    (folder / '.last.pth.4242.tmp').write_bytes(b'half a checkpoint')  # a save the kill interrupted
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(folder), '--epochs', '1', *TINY_FLAGS]) == 0
    assert not [p.name for p in folder.iterdir() if p.name.startswith('.')]


def test_weights_spoiled_by_the_last_update_are_never_saved(copy, tmp_path, capsys, monkeypatch):
    """The loss is finite at every step, but the epoch's last update makes the weights NaN."""
    before = snapshot(copy)
    real_step = torch.optim.AdamW.step
    calls = {'n': 0}

    def spoiling_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls['n'] += 1
        if calls['n'] == 3:  # epoch 3's last of 3 updates
            with torch.no_grad():
                self.param_groups[0]['params'][0].fill_(float('nan'))
        return out

    monkeypatch.setattr(torch.optim.AdamW, 'step', spoiling_step)
    expect_error(['--resume', str(copy / 'last.pth'), '--epochs', '5'], capsys, 'the weights and the validation loss '
                 'became NaN or infinite in epoch 3', f"{copy / 'last.pth'} holds epoch 2", '--lr')
    kept = ('best.pth', 'last.pth', 'log.csv', 'train_files.csv', 'val_files.csv')
    assert {k: snapshot(copy)[k] for k in kept} == {k: before[k] for k in kept}


def test_predict_and_export_refuse_a_checkpoint_of_nan_weights(copy, data, tmp_path, capsys):
    import export
    import predict
    ckpt = torch.load(copy / 'best.pth', weights_only=True)
    next(iter(ckpt['model'].values()))[0] = float('inf')
    torch.save(ckpt, tmp_path / 'nan.pth')
    assert predict.main(['--weights', str(tmp_path / 'nan.pth'), '--data-root', str(data),
                         '--output-dir', str(tmp_path / 'p')]) == 2
    assert export.main(['--weights', str(tmp_path / 'nan.pth'), '--output', str(tmp_path / 'm.pt'),
                        '--format', 'torchscript']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith('error:') and 'NaN or infinite weights' in line for line in err)
    assert not (tmp_path / 'p').exists() and not (tmp_path / 'm.pt').exists()


def test_a_resumed_run_keeps_its_split_when_the_data_changes(run, data, tmp_path, capsys):
    """Images added since are ignored and counted; an image removed since is left out and counted."""
    grown = tmp_path / 'data'
    shutil.copytree(data, grown)
    resumed = tmp_path / 'resumed'
    shutil.copytree(run, resumed)
    for name in ('train_files.csv', 'val_files.csv'):  # the recorded split, pointed at the copy of the data
        (resumed / name).write_text((run / name).read_text().replace(str(data), str(grown)))
    recorded = {name: (resumed / name).read_bytes() for name in ('train_files.csv', 'val_files.csv')}
    for i in range(5):
        shutil.copy(grown / 'checker' / '000.png', grown / 'checker' / f'new{i}.png')
    first_val = next(csv.DictReader((resumed / 'val_files.csv').open()))['file']
    Path(first_val).unlink()
    assert train_gpu.main(['--resume', str(resumed / 'last.pth'), '--data-root', str(grown), '--epochs', '4']) == 0
    err = capsys.readouterr().err
    assert '5 image(s) added to the data since this run began are ignored' in err
    assert f"1 image(s) of this run's split are gone or unreadable now (e.g. {first_val})" in err
    assert {name: (resumed / name).read_bytes() for name in recorded} == recorded
    assert torch.load(resumed / 'last.pth', weights_only=True)['val']['val_images'] == 7  # 8 recorded, 1 gone


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_checkpoint(copy, capsys):
    """A real write failure: the file-size limit stops torch's writer in the middle of last.pth (2.6 MB) while
    best.pth (0.9 MB), log.csv and the rest still fit."""
    import resource
    import signal
    last = (copy / 'last.pth').read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(last) // 2, limits[1]))
    try:
        expect_error(['--resume', str(copy / 'last.pth'), '--epochs', '4'], capsys,
                     f"cannot write '{copy / 'last.pth'}' (File too large)", "is as it was before")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (copy / 'last.pth').read_bytes() == last
    assert not [p.name for p in copy.iterdir() if p.name.endswith('.tmp') or p.name == '.lock']


@pytest.mark.parametrize('sig, code', [('SIGTERM', 143), ('SIGINT', 130)])
def test_a_signal_during_a_save_finishes_the_epoch_then_stops(sig, code, copy, capsys, monkeypatch):
    """The signal arrives while last.pth is being written: the epoch's files are finished, the run stops with
    the shell's code and one line, no temporary file is left, and --resume goes on."""
    import signal
    import models.checkpoint
    real_save = torch.save

    def save_with_a_signal(obj, f):
        if 'optimizer' in obj:
            f.write(b'')
            os.kill(os.getpid(), getattr(signal, sig))
        real_save(obj, f)

    monkeypatch.setattr(models.checkpoint.torch, 'save', save_with_a_signal)
    assert train_gpu.main(['--resume', str(copy / 'last.pth'), '--epochs', '6']) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"stopped by {sig}: {copy / 'last.pth'} holds epoch 3; continue with --resume " \
                      f"{copy / 'last.pth'}" or err[-1].startswith(f"stopped by {sig}: {copy / 'last.pth'} holds epoch 3, ")
    assert signal.getsignal(getattr(signal, sig)) is not None  # the handlers are put back
    assert not [p.name for p in copy.iterdir() if p.name.startswith('.')]
    assert torch.load(copy / 'last.pth', weights_only=True)['epoch'] == 3
    assert [int(r['epoch']) for r in read_log(copy)] == [0, 1, 2, 3]
    monkeypatch.undo()
    assert train_gpu.main(['--resume', str(copy / 'last.pth'), '--epochs', '5']) == 0
    assert [int(r['epoch']) for r in read_log(copy)] == [0, 1, 2, 3, 4]


def test_sigterm_to_the_whole_job_stops_it_with_its_workers(data, tmp_path):
    """As a scheduler does it: SIGTERM to every process of the job, the data loader's workers included."""
    import signal
    import subprocess
    import sys
    import time
    run = tmp_path / 'run'
    job = subprocess.Popen([sys.executable, 'train_gpu.py', '--data-root', str(data), '--output-dir', str(run),
                            '--epochs', '50', *TINY_FLAGS, '--workers', '2'], cwd=Path(train_gpu.__file__).parent, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 120
    while not (run / 'log.csv').exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate(timeout=60)[1]
    assert job.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGTERM: {run / 'last.pth'} holds epoch "), err[-2000:]
    assert 'Traceback' not in err
    assert not [p.name for p in run.iterdir() if p.name.startswith('.')]
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == len(read_log(run)) - 1
