"""Training curves: curves.png from log.csv, its place in the run's report, and --log-tensorboard."""
import csv
import logging
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

import predict
import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from utils import curves
from utils.curves import TrainingCurves, draw_curves, panels, plot_curves, read_log, read_num_classes
from utils.run_files import write_class_indices
from utils.tensorboard_log import tag

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LOG = """epoch,lr,train_loss,val_loss,top1,top5,macro_f1,epoch_seconds,train_images_per_s,train_keep_rate,val_keep_rate,val_compute_ratio,ema_top1
0,0.001,1.1,1.0,40,100,35,2.0,50,0.7,0.7,0.9,
1,0.0005,0.9,0.8,60,100,55,2.1,52,0.5,0.5,0.8,55
2,1e-06,0.7,0.7,70,100,68,2.0,51,0.5,0.5,0.75,66
"""


def read_rows(run_dir):
    return list(csv.DictReader((Path(run_dir) / 'log.csv').open()))


def tensorboard_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}


def test_panels_of_a_hand_written_log(tmp_path):
    (tmp_path / 'log.csv').write_text(LOG)
    values = read_log(tmp_path / 'log.csv')
    assert values['ema_top1'][1:] == [55, 66] and values['ema_top1'][0] != values['ema_top1'][0]  # empty: NaN
    titles = plot_curves(values, tmp_path / 'curves.png')
    assert titles == ['Loss', 'Accuracy (%)', 'Macro F1 (%)', 'Learning rate', 'keep rate', 'compute ratio']
    lines = dict(panels(values))  # classes unknown: the k of top-k is not guessed
    assert lines['Accuracy (%)'] == [('top1', 'top-1'), ('top5', 'top-k (k = min(5, classes))'),
                                     ('ema_top1', 'EMA top-1')]
    assert lines['keep rate'] == [('train_keep_rate', 'train'), ('val_keep_rate', 'val')]
    assert (tmp_path / 'curves.png').read_bytes().startswith(PNG_MAGIC)
    assert Image.open(tmp_path / 'curves.png').size[0] > 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png', 'log.csv']  # no temporary file left


def axis_texts(fig) -> dict:
    """{panel title: (y label, [legend texts])} of a curves figure."""
    return {ax.get_title(): (ax.get_ylabel(), [t.get_text() for t in ax.get_legend().get_texts()]
                             if ax.get_legend() else []) for ax in fig.axes}


@pytest.mark.parametrize('classes, k', [(4, 4), (2, 2), (5, 5), (7, 5)])
def test_top_k_label_is_the_real_k_and_every_panel_names_its_unit(classes, k, tmp_path, monkeypatch):
    (tmp_path / 'log.csv').write_text(LOG)
    write_class_indices(tmp_path / 'class_indices.json', [f'c{i}' for i in range(classes)])
    drawn = []
    monkeypatch.setattr(curves, 'plot_curves', lambda values, png, num_classes=None: drawn.append(num_classes))
    TrainingCurves().update(tmp_path)  # what the trainer calls: the class count comes from the run folder
    assert drawn == [classes]
    texts = axis_texts(draw_curves(read_log(tmp_path / 'log.csv'), classes))
    assert texts['Accuracy (%)'] == ('accuracy (%)', ['top-1', f'top-{k}', 'EMA top-1'])
    assert texts['Macro F1 (%)'] == ('macro F1 (%)', ['macro F1'])  # log.csv's macro_f1 is in %, as the report's
    assert texts['Loss'][0] == 'loss' and texts['Learning rate'][0] == 'learning rate'
    assert texts['keep rate'][0] == texts['compute ratio'][0] == 'ratio (0-1)'
    assert all(ylabel for ylabel, _ in texts.values())


def test_class_count_of_a_run_folder(tmp_path):
    assert read_num_classes(tmp_path) is None  # no class_indices.json
    (tmp_path / 'class_indices.json').write_text('{"0": "a", ')
    assert read_num_classes(tmp_path) is None  # unreadable: the label says top-k, not a wrong k
    write_class_indices(tmp_path / 'class_indices.json', ['a', 'b', 'c'])
    assert read_num_classes(tmp_path) == 3
    assert curves.y_label('tokens out') == 'tokens' and curves.y_label('stage') == 'stage'


def test_a_plot_failure_is_one_warning_and_keeps_the_old_png(tmp_path, monkeypatch, caplog):
    (tmp_path / 'log.csv').write_text(LOG)
    (tmp_path / 'curves.png').write_bytes(b'old')

    def failing_save(self, f, **kwargs):  # savefig gets the open temporary file
        f.write(b'half a png')
        raise OSError('No space left on device\nsecond line')

    monkeypatch.setattr(curves.Figure, 'savefig', failing_save)
    with caplog.at_level(logging.WARNING):
        TrainingCurves().update(tmp_path)
    assert [r.getMessage() for r in caplog.records] == ['curves.png not redrawn: OSError: No space left on device']
    assert (tmp_path / 'curves.png').read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png', 'log.csv']


def test_tensorboard_tags():
    assert [tag(c) for c in ('train_loss', 'val_loss', 'top1', 'ema_top1', 'macro_f1', 'lr', 'val_compute_ratio')] == \
        ['train/loss', 'val/loss', 'val/top1', 'val/ema_top1', 'val/macro_f1', 'train/lr', 'val/compute_ratio']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), per_class=10)


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """A 2-epoch MTViT run (a method statistic in log.csv) with EMA, the report and TensorBoard."""
    run = tmp_path_factory.mktemp('run')
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '2', *TINY_FLAGS,
                           '--method', 'mtvit', '--mtvit-keep-rate', '0.5', '--model-ema', '--report',
                           '--log-tensorboard']) == 0
    return run


def test_curves_png_after_training(run):
    assert (run / 'curves.png').read_bytes().startswith(PNG_MAGIC)
    Image.open(run / 'curves.png').verify()
    assert [title for title, _ in panels(read_log(run / 'log.csv'))] == \
        ['Loss', 'Accuracy (%)', 'Macro F1 (%)', 'Learning rate', 'keep rate']
    accuracy = dict(panels(read_log(run / 'log.csv'), read_num_classes(run)))['Accuracy (%)']
    assert ('top5', 'top-3') in accuracy  # 3 classes: log.csv's top5 column is top-3 accuracy


def test_report_shows_the_training_curves(run, data, tmp_path):
    import base64
    page = (run / 'report' / 'report.html').read_text()
    assert '<h2>Training curves</h2>' in page
    assert (run / 'report' / 'curves.png').read_bytes() == (run / 'curves.png').read_bytes()
    assert base64.b64encode((run / 'curves.png').read_bytes()).decode() in page  # the page stands alone
    out = tmp_path / 'predicted'
    assert predict.main(['--weights', str(run / 'best.pth'), '--data-root', str(data), '--output-dir', str(out),
                         '--workers', '0']) == 0
    assert 'Training curves' not in (out / 'report.html').read_text()


def assert_tensorboard_equals_log(run_dir):
    rows = read_rows(run_dir)
    scalars = tensorboard_scalars(run_dir / 'tb')
    expected_tags = {tag(c) for c in rows[0] if c != 'epoch'}
    assert set(scalars) == expected_tags
    for column in rows[0]:
        if column != 'epoch':
            expected = [(int(r['epoch']), float(r[column])) for r in rows]
            got = scalars[tag(column)]
            assert [s for s, _ in got] == [s for s, _ in expected], column
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), column


def test_tensorboard_scalars_equal_log_csv(run):
    assert len(read_rows(run)) == 2
    assert {'val/keep_rate', 'train/keep_rate', 'val/ema_top1', 'train/lr'} <= set(tensorboard_scalars(run / 'tb'))
    assert_tensorboard_equals_log(run)


def test_resume_appends_to_the_same_tensorboard_folder(run, tmp_path):
    resumed = tmp_path / 'resumed'
    shutil.copytree(run, resumed)
    assert train_gpu.main(['--resume', str(resumed / 'last.pth'), '--epochs', '3', '--no-report']) == 0
    assert [int(r['epoch']) for r in read_rows(resumed)] == [0, 1, 2]
    assert_tensorboard_equals_log(resumed)  # each epoch once, at its own step


def test_missing_tensorboard_is_one_line_before_training(data, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith('torch.utils.tensorboard')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'tensorboard', None)  # import tensorboard fails, as when not installed
    run = tmp_path / 'run'
    code = train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS,
                           '--log-tensorboard'])
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err
    lines = [line for line in err.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'pip install -r requirements-tensorboard.txt' in lines[0], err
    assert not run.exists()  # stopped before the run folder, let alone any training


def test_log_tensorboard_flag():
    parse = train_gpu.get_args_parser().parse_args
    assert parse([]).log_tensorboard is None
    assert parse(['--log-tensorboard']).log_tensorboard is True
    assert parse(['--log-tensorboard', 'tb_logs']).log_tensorboard == 'tb_logs'
