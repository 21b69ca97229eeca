"""Experiment trackers (--log-to tensorboard mlflow wandb, --log-tensorboard): one tiny run logs to all three, each
is read back with its own reader and compared with log.csv, config.yaml and the report; a resume continues them."""
import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from utils.trackers import Tracker, Trackers, flat, tag

WANDB_HEADER, WANDB_BLOCK = 7, 32768  # the offline run file: W&B's LevelDB-style log of Record protobufs


def read_rows(run_dir):
    return list(csv.DictReader((Path(run_dir) / 'log.csv').open()))


def tensorboard_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}


def wandb_history(run_file) -> list:
    """The rows ``run.log`` wrote into an offline W&B run file (run-ID.wandb)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data = Path(run_file).read_bytes()
    assert data[:4] == b':W&B'
    pos, chunk, rows = WANDB_HEADER, b'', []
    while pos + WANDB_HEADER <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < WANDB_HEADER:  # a block's tail too short for a header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        chunk += data[pos + WANDB_HEADER:pos + WANDB_HEADER + length]
        pos += WANDB_HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record.FromString(chunk)
            chunk = b''
            if record.HasField('history'):
                rows.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def assert_epochs_equal_log(rows, series: dict):
    """``series`` ({name: [(epoch, value)]}) holds every column of log.csv's ``rows`` under its tracker name."""
    for column in rows[0]:
        if column != 'epoch':
            expected = [(int(r['epoch']), float(r[column])) for r in rows]
            got = series[tag(column)]
            assert [e for e, _ in got] == [e for e, _ in expected], column
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5), column


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """W&B offline and silent, its folders in tmp (never the home folder); MLflow's file store allowed, the working
    folder in tmp (where MLflow would put a default store)."""
    home = tmp_path_factory.mktemp('home')
    with pytest.MonkeyPatch.context() as mp:
        for name in ('CONFIG', 'CACHE', 'DATA', 'ARTIFACT'):
            mp.setenv(f'WANDB_{name}_DIR', str(home / name.lower()))
        mp.setenv('WANDB_MODE', 'offline')
        mp.setenv('WANDB_SILENT', 'true')
        mp.delenv('WANDB_DIR', raising=False)
        mp.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
        mp.chdir(home)
        yield home


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), per_class=10)


@pytest.fixture(scope='module')
def run(env, data, tmp_path_factory):
    """A 2-epoch MTViT run (a method statistic) with EMA and the report, logging to all three trackers every step."""
    run = tmp_path_factory.mktemp('run')
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '2', *TINY_FLAGS,
                           '--method', 'mtvit', '--mtvit-keep-rate', '0.5', '--model-ema', '--report',
                           '--log-interval', '1', '--log-to', 'mlflow', 'wandb', '--log-tensorboard',
                           '--mlflow-uri', str(env / 'mlruns')]) == 0
    return run


def mlflow_run(uri, run_dir):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(str(uri))
    found = client.search_runs(['0'])
    assert [r.info.run_id for r in found] == [json.loads((run_dir / 'trackers.json').read_text())['mlflow']['run_id']]
    return client, found[0]


def test_mlflow_store_holds_the_log_the_settings_and_the_report(run, env):
    client, found = mlflow_run(env / 'mlruns', run)
    assert found.info.status == 'FINISHED' and found.info.run_name == run.name
    rows = read_rows(run)
    assert len(rows) == 2
    series = {name: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, name)]
              for name in found.data.metrics}
    assert_epochs_equal_log(rows, series)
    assert [step for step, _ in series['step/loss']] == [1, 2]  # 24 images, batch 16: 1 update per epoch (the last
    # batch, partial, is dropped)
    best = max(rows, key=lambda r: float(r['top1']))  # best.pth: the best top-1 (the first on a tie)
    assert found.data.metrics['best/top1'] == pytest.approx(float(best['top1']))
    assert series['best/epoch'] == [(int(best['epoch']), float(best['epoch']))]
    assert not any(name.startswith('best/') and 'lr' in name for name in found.data.metrics)
    config = yaml.safe_load((run / 'config.yaml').read_text())
    assert found.data.params == flat(config)
    assert found.data.params['model'] == 'vit_tiny_patch16_224' and found.data.params['run_info.global_batch'] == '16'
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)} | \
        {a.path for a in client.list_artifacts(found.info.run_id, 'report')}
    assert {'report/report.html', 'report/curves.png', 'curves.png', 'log.csv', 'config.yaml'} <= artifacts


def test_wandb_offline_run_folder_holds_the_history(run):
    folders = list((run / 'wandb').glob('offline-run-*'))
    run_id = json.loads((run / 'trackers.json').read_text())['wandb']['id']
    assert len(folders) == 1 and folders[0].name.endswith(run_id)
    history = wandb_history(folders[0] / f'run-{run_id}.wandb')
    epochs = [h for h in history if 'epoch' in h]
    assert_epochs_equal_log(read_rows(run), {name: [(h['epoch'], h[name]) for h in epochs if name in h]
                                             for name in epochs[0]})
    assert [h['update'] for h in history if 'step/loss' in h] == [1, 2]


def test_tensorboard_scalars_equal_log_csv(run):
    scalars = tensorboard_scalars(run / 'tb')
    assert {'val/keep_rate', 'train/keep_rate', 'val/ema_top1', 'train/lr', 'best/top1'} <= set(scalars)
    assert_epochs_equal_log(read_rows(run), scalars)
    assert [step for step, _ in tensorboard_scalars(run / 'tb' / 'steps')['step/loss']] == [1, 2]


def test_resume_continues_the_same_tracker_runs(run, env, tmp_path):
    resumed, store = tmp_path / 'resumed', tmp_path / 'mlruns'
    shutil.copytree(run, resumed)
    shutil.copytree(env / 'mlruns', store)
    assert train_gpu.main(['--resume', str(resumed / 'last.pth'), '--epochs', '3', '--no-report',
                           '--mlflow-uri', str(store)]) == 0  # the trackers come back with the run's settings
    rows = read_rows(resumed)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert_epochs_equal_log(rows, tensorboard_scalars(resumed / 'tb'))  # each epoch once, at its own step
    assert [s for s, _ in tensorboard_scalars(resumed / 'tb' / 'steps')['step/loss']] == [1, 2, 3]
    client, found = mlflow_run(store, resumed)  # the same MLflow run, one run in the store
    assert [m.step for m in client.get_metric_history(found.info.run_id, 'val/top1')] == [0, 1, 2]
    assert found.data.params['epochs'] == '2'  # a parameter keeps its first value
    folders = list((resumed / 'wandb').glob('offline-run-*'))
    assert len(folders) == 2 and len({f.name.split('-')[-1] for f in folders}) == 1  # the same W&B run id


@pytest.mark.parametrize('flags, package', [(['--log-tensorboard'], 'tensorboard'),
                                            (['--log-to', 'mlflow'], 'mlflow'), (['--log-to', 'wandb'], 'wandb')])
def test_a_missing_package_is_one_line_before_anything_is_written(flags, package, data, tmp_path, monkeypatch,
                                                                    capsys):
    for name in [m for m in sys.modules if m.startswith('torch.utils.tensorboard')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # its import fails, as when it is not installed
    run = tmp_path / 'run'
    code = train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS, *flags])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err
    lines = [line for line in err.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and f'pip install -r requirements-{package}.txt' in lines[0], err
    assert not run.exists()  # stopped before the run folder, let alone any training


def test_a_tracker_that_cannot_start_stops_the_run_before_training(env, data, tmp_path, capsys):
    run = tmp_path / 'run'
    code = train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS,
                           '--log-to', 'mlflow', '--mlflow-uri', 'nosuchscheme://store'])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith('error:')]
    assert code == 2 and len(lines) == 1 and 'mlflow could not start' in lines[0], err
    assert not run.exists()  # the run folder it made is gone


class Failing(Tracker):
    def __init__(self):
        self.closed = []

    def log_epoch(self, epoch, values):
        raise OSError('store gone\nsecond line')

    def close(self, outcome):
        self.closed.append(outcome)


def test_a_tracker_that_fails_later_is_one_warning_and_logs_no_more(caplog):
    failing, fine = Failing(), Failing()
    fine.log_epoch = lambda epoch, values: fine.closed.append((epoch, values))
    trackers = Trackers(dict(bad=failing, good=fine))
    with caplog.at_level(logging.WARNING):
        trackers.log_epoch(dict(epoch=3, top1=50.0, ema_top1=float('nan'), train_loss=0.5))
        trackers.log_epoch(dict(epoch=4, top1=60.0))
    assert [r.getMessage() for r in caplog.records] == ['bad logs no more: log_epoch failed with OSError: store gone']
    assert failing.closed == ['FAILED'] and list(trackers.trackers) == ['good']
    assert fine.closed == [(3, {'val/top1': 50.0, 'train/loss': 0.5}), (4, {'val/top1': 60.0})]


def test_flags_name_each_tracker_once():
    parse = train_gpu.get_args_parser().parse_args
    assert (parse([]).log_to, parse([]).log_tensorboard) == ([], None)
    assert parse(['--log-to', 'mlflow', 'wandb']).log_to == ['mlflow', 'wandb']
    assert parse(['--log-tensorboard']).log_tensorboard is True
    args = parse(['--log-to', 'tensorboard', 'mlflow', '--log-tensorboard', 'tb_logs'])
    trackers = Trackers.from_args(args, is_main=True).trackers
    assert list(trackers) == ['tensorboard', 'mlflow'] and trackers['tensorboard'].log_dir == 'tb_logs'
    assert not Trackers.from_args(args, is_main=False)  # the other processes log nothing
    with pytest.raises(SystemExit):
        parse(['--log-to', 'comet'])


def test_tags_group_by_split():
    assert [tag(c) for c in ('train_loss', 'val_loss', 'top1', 'ema_top1', 'macro_f1', 'lr', 'val_compute_ratio')] == \
        ['train/loss', 'val/loss', 'val/top1', 'val/ema_top1', 'val/macro_f1', 'train/lr', 'val/compute_ratio']
    assert flat(dict(a=1, b=dict(c=[1, 2], d=None))) == {'a': '1', 'b.c': '[1, 2]', 'b.d': 'None'}

