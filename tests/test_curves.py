"""Training curves: curves.png from log.csv, and its place in the run's report."""
import logging

import pytest
from PIL import Image

import predict
import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from utils import curves
from utils.curves import draw_curves, panels, plot_curves, read_log, read_num_classes, update_curves
from utils.run_files import write_class_indices

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LOG = """epoch,lr,train_loss,val_loss,top1,top5,macro_f1,epoch_seconds,train_images_per_s,train_keep_rate,val_keep_rate,val_compute_ratio,ema_top1
0,0.001,1.1,1.0,40,100,35,2.0,50,0.7,0.7,0.9,
1,0.0005,0.9,0.8,60,100,55,2.1,52,0.5,0.5,0.8,55
2,1e-06,0.7,0.7,70,100,68,2.0,51,0.5,0.5,0.75,66
"""


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
    update_curves(tmp_path)  # what the trainer calls: the class count comes from the run folder
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
        update_curves(tmp_path)
    assert [r.getMessage() for r in caplog.records] == ['curves.png not redrawn: OSError: No space left on device']
    assert (tmp_path / 'curves.png').read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['curves.png', 'log.csv']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), per_class=10)


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """A 2-epoch MTViT run (a method statistic in log.csv) with EMA and the report."""
    run = tmp_path_factory.mktemp('run')
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '2', *TINY_FLAGS,
                           '--method', 'mtvit', '--mtvit-keep-rate', '0.5', '--model-ema', '--report']) == 0
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
