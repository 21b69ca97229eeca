"""predict.py and the report: every file, numbers that agree with scikit-learn, bad input."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss, precision_recall_fscore_support, roc_auc_score

import predict
import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from utils.report import write_labelled_report

REPORT_FILES = ['confusion_matrix.png', 'confusion_matrix_normalized.png', 'confusion_matrix.csv',
                'confusion_matrix_normalized.csv', 'roc_curves.png', 'pr_curves.png', 'per_class_report.csv',
                'predictions.csv', 'misclassified.png', 'reliability.png', 'summary.json', 'report.html']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A tiny model trained 3 epochs on textures, with the end-of-training report on."""
    base = tmp_path_factory.mktemp('predict')
    data = make_image_folder(base / 'data', per_class=20)
    flags = [f for f in TINY_FLAGS if f != '--no-report']
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(base / 'run'), '--epochs', '3', *flags]) == 0
    return base / 'run', data


def test_training_writes_the_report_of_best(run):
    run_dir, _ = run
    for name in REPORT_FILES:
        assert (run_dir / 'report' / name).is_file(), name
    summary = json.loads((run_dir / 'report' / 'summary.json').read_text())
    assert summary['images'] == 12  # the validation split


def test_labelled_report_agrees_with_predictions_and_sklearn(run, tmp_path):
    run_dir, data = run
    data_copy = tmp_path / 'data'
    shutil.copytree(data, data_copy)
    (data_copy / 'checker' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'0' * 20)
    out = tmp_path / 'report'
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--data-root', str(data_copy),
                         '--output-dir', str(out), '--workers', '0']) == 0
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    assert not (out / 'probabilities.npy').exists()  # only with --save-probs
    preds = pd.read_csv(out / 'predictions.csv')
    cm = pd.read_csv(out / 'confusion_matrix.csv', index_col=0)
    assert len(preds) == 60 and cm.values.sum() == 60
    for name in cm.index:
        hits = ((preds['true'] == name) & (preds['predicted'] == name)).sum()
        assert cm.loc[name, name] == hits
    table = pd.read_csv(out / 'per_class_report.csv', index_col=0)
    classes = ['checker', 'stripes_h', 'stripes_v']
    p, r, f, s = precision_recall_fscore_support(preds['true'], preds['predicted'], labels=classes, zero_division=0)
    assert np.allclose(table.loc[classes, 'precision'], p) and np.allclose(table.loc[classes, 'recall'], r)
    assert np.allclose(table.loc[classes, 'f1-score'], f) and list(table.loc[classes, 'support']) == list(s)
    probs = preds[[f'p_{c}' for c in classes]].values
    y = preds['true'].map(classes.index).values
    for i, c in enumerate(classes):
        assert np.isclose(table.loc[c, 'roc_auc'], roc_auc_score(y == i, probs[:, i]))
    summary = json.loads((out / 'summary.json').read_text())
    assert np.isclose(summary['macro_auc'], roc_auc_score(y, probs, multi_class='ovr'))
    assert np.isclose(table.loc['macro avg', 'roc_auc'], summary['macro_auc'])
    assert np.isclose(table.loc['weighted avg', 'roc_auc'], roc_auc_score(y, probs, multi_class='ovr', average='weighted'))
    assert np.isclose(summary['accuracy'], (preds['true'] == preds['predicted']).mean())
    assert np.isclose(summary['log_loss'], log_loss(y, probs / probs.sum(1, keepdims=True), labels=[0, 1, 2]), rtol=1e-4)
    assert np.isclose(summary['brier'], ((probs - np.eye(3)[y]) ** 2).sum(1).mean(), rtol=1e-4)
    assert 'expected calibration error' in (out / 'report.html').read_text()
    assert summary['skipped_files'] == 1 and 'broken.png' in (out / 'report.html').read_text()
    assert '<img src="data:image/png;base64,' in (out / 'report.html').read_text()


def test_unknown_classes_are_skipped_and_reported(run, tmp_path, capsys):
    run_dir, data = run
    mixed = tmp_path / 'mixed'
    shutil.copytree(data / 'checker', mixed / 'checker')
    make_image_folder(mixed, classes=('dots',), per_class=3)
    out = tmp_path / 'out'
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--data-root', str(mixed),
                         '--output-dir', str(out), '--workers', '0']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['unknown_classes'] == ['dots'] and summary['images'] == 20
    printed = capsys.readouterr().out  # the accuracy row and the n/a AUC of one class: '-', as in report.html
    assert 'NaN' not in printed and 'accuracy ' in printed
    only_unknown = tmp_path / 'unknown'
    make_image_folder(only_unknown, classes=('dots',), per_class=2)
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--data-root', str(only_unknown)]) == 2
    assert 'none of the folder' in capsys.readouterr().err


def test_classify_images_prints_topk_and_writes_csv(run, tmp_path, capsys):
    run_dir, data = run
    files = sorted((data / 'stripes_h').glob('*.png'))[:2]
    out = tmp_path / 'imgs'
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--images', str(files[0]), str(data / 'checker'),
                         '--topk', '2', '--output-dir', str(out), '--workers', '0']) == 0
    printed = capsys.readouterr().out
    assert str(files[0]) in printed and printed.count(':') >= 21
    assert len(pd.read_csv(out / 'predictions.csv')) == 21


def test_method_override_on_a_dense_checkpoint(run, tmp_path):
    run_dir, data = run
    out = tmp_path / 'tome'
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--data-root', str(data), '--method', 'tome',
                         '--tome-r', '2', '--output-dir', str(out), '--workers', '0']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['method'] == 'tome' and summary['method_cfg']['r'] == 2


@pytest.mark.parametrize('kind', ['missing', 'truncated', 'plain_state_dict'])
def test_bad_weights(kind, run, tmp_path, capsys):
    run_dir, data = run
    path = tmp_path / 'w.pth'
    if kind == 'truncated':
        path.write_bytes((run_dir / 'best.pth').read_bytes()[:5000])
    elif kind == 'plain_state_dict':
        torch.save(torch.load(run_dir / 'best.pth', weights_only=True)['model'], path)
    assert predict.main(['--weights', str(path), '--data-root', str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error:') and 'Traceback' not in err
    assert {'missing': 'does not exist', 'truncated': 'is truncated or damaged',
            'plain_state_dict': 'not a checkpoint of this toolkit'}[kind] in err
    assert (f'predict.py --model NAME --pretrained {path}' in err) == (kind == 'plain_state_dict')


def test_empty_folder_and_missing_images(run, tmp_path, capsys):
    run_dir, _ = run
    (tmp_path / 'empty' / 'checker').mkdir(parents=True)
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--data-root', str(tmp_path / 'empty')]) == 2
    assert 'no readable images' in capsys.readouterr().err
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--images', str(tmp_path / 'nope.jpg')]) == 2
    assert 'not found' in capsys.readouterr().err


def _synthetic(n_classes, per_class, rng):
    targets = np.repeat(np.arange(n_classes), per_class)
    logits = rng.normal(size=(len(targets), n_classes))
    logits[np.arange(len(targets)), targets] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, targets


@pytest.mark.parametrize('n_classes', [2, 120])
def test_binary_and_many_classes_stay_readable(n_classes, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    probs, targets = _synthetic(n_classes, 3, rng)
    img = tmp_path / 'x.png'
    Image.new('RGB', (8, 8)).save(img)
    names = [f'class_{i:03d}' for i in range(n_classes)]
    context = dict(checkpoint='c', model='m', method='none', method_cfg={}, images_per_s=1.0)
    summary = write_labelled_report(probs, targets, [str(img)] * len(targets), names, tmp_path / 'r', context)
    for name in REPORT_FILES:
        assert (tmp_path / 'r' / name).is_file(), name
    assert summary['images'] == len(targets)
    width, height = Image.open(tmp_path / 'r' / 'confusion_matrix.png').size
    assert width <= 2200 and height <= 2200  # top-N view, not a 120 x 120 wall
    table = pd.read_csv(tmp_path / 'r' / 'per_class_report.csv', index_col=0)
    if n_classes == 2:
        assert np.isclose(table.loc['class_001', 'roc_auc'], roc_auc_score(targets, probs[:, 1]))
        assert np.isnan(table.loc['class_000', 'roc_auc'])
    else:
        assert len(pd.read_csv(tmp_path / 'r' / 'confusion_matrix.csv', index_col=0)) == n_classes


def test_method_flags_count_when_given_at_their_default(run, tmp_path, capsys):
    run_dir, data = run
    ckpt = torch.load(run_dir / 'best.pth', weights_only=True)
    ckpt.update(method='tome', method_cfg=dict(r=2, prop_attn=True))  # a ToMe r=2 checkpoint (no new weights)
    torch.save(ckpt, tmp_path / 'tome.pth')
    for extra, r in (([], 2), (['--tome-r', '13'], 13)):  # 13 is the flag's default
        out = tmp_path / f'r{r}'
        assert predict.main(['--weights', str(tmp_path / 'tome.pth'), '--data-root', str(data), '--method', 'tome',
                             *extra, '--output-dir', str(out), '--workers', '0']) == 0
        assert json.loads((out / 'summary.json').read_text())['method_cfg']['r'] == r
    assert predict.main(['--weights', str(tmp_path / 'tome.pth'), '--data-root', str(data), '--tome-r', '4']) == 2
    assert 'add --method tome' in capsys.readouterr().err
    assert predict.main(['--weights', str(tmp_path / 'tome.pth'), '--data-root', str(data), '--method', 'tome',
                         '--gtp-num-prop', '4']) == 2
    assert '--gtp-num-prop: not for --method tome but gtp' in capsys.readouterr().err


@pytest.mark.filterwarnings('error')  # no scikit-learn warning on the terminal either
def test_two_class_model_on_data_of_one_class(tmp_path):
    from PIL import Image
    img = tmp_path / 'x.png'
    Image.new('RGB', (8, 8)).save(img)
    probs = np.random.default_rng(0).dirichlet([1, 1], 6)
    context = dict(checkpoint='c', model='m', method='none', method_cfg={}, images_per_s=1.0)
    for only in (0, 1):
        out = tmp_path / f'only{only}'
        summary = write_labelled_report(probs, np.full(6, only), [str(img)] * 6, ['cat', 'dog'], out, context)
        assert summary['macro_auc'] is None and summary['images'] == 6
        assert 'one class only' in (out / 'report.html').read_text()
        assert np.isnan(pd.read_csv(out / 'per_class_report.csv', index_col=0).loc[['cat', 'dog'][only], 'roc_auc'])
    all_right = write_labelled_report(np.tile([0.9, 0.1], (6, 1)), np.zeros(6, int), [str(img)] * 6, ['cat', 'dog'],
                                      tmp_path / 'all_right', context)  # one class, every image predicted as it
    assert all_right['accuracy'] == 1


def test_truncated_images_are_skipped_or_refused(run, tmp_path, capsys, caplog):
    run_dir, data = run
    from PIL import Image
    Image.open(data / 'checker' / '000.png').save(tmp_path / 'whole.jpg')
    good = (tmp_path / 'whole.jpg').read_bytes()
    for i in range(2):  # a JPEG's header reads fine; the truncation shows only when decoded
        (tmp_path / f"cut{i}.jpg").write_bytes(good[: len(good) * 9 // 10])
    assert predict.main(['--weights', str(run_dir / 'best.pth'), '--images', str(tmp_path / 'cut0.jpg'),
                         str(tmp_path / 'cut1.jpg'), '--workers', '0', '--output-dir', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'error: none of the 2 --images could be decoded' in err and 'Traceback' not in err
    from models.factory import load_for_inference
    from utils.token_maps import write_token_maps
    model, meta = load_for_inference(run_dir / 'best.pth', method='tome', method_cfg=dict(r=2))
    files = [str(tmp_path / 'cut0.jpg'), str(data / 'checker' / '000.png')]
    write_token_maps(model, files, meta['data_config'], tmp_path / 'maps')
    assert [p.name for p in (tmp_path / 'maps' / 'token_maps').iterdir()] == ['000_000.png']
    assert 'skipping' in caplog.text and 'cut0.jpg' in caplog.text


def _four_classes_with_mistakes(tmp_path, wrong: int):
    """Probabilities of 16 images of 4 classes, the first ``wrong`` of them predicted as the next class."""
    from PIL import Image
    img = tmp_path / 'x.png'
    Image.new('RGB', (8, 8), (200, 30, 30)).save(img)
    targets = np.arange(16) % 4
    probs = np.full((16, 4), 0.1)
    probs[np.arange(16), np.where(np.arange(16) < wrong, (targets + 1) % 4, targets)] = 0.7
    return probs, targets, [str(img)] * 16, ['cat', 'dog', 'eel', 'fox']


def test_report_page_one_header_row_f1_in_percent_and_a_small_mistakes_grid(tmp_path):
    import re
    from PIL import Image
    probs, targets, paths, names = _four_classes_with_mistakes(tmp_path, 1)
    context = dict(checkpoint='c', model='m', method='none', method_cfg={}, images_per_s=1.0)
    summary = write_labelled_report(probs, targets, paths, names, tmp_path / 'r', context)
    page = (tmp_path / 'r' / 'report.html').read_text()
    head = re.search(r'<thead>(.*?)</thead>', page, re.S).group(1)
    assert head.count('<tr') == 1 and re.findall(r'<th>(.*?)</th>', head)[:2] == ['class', 'precision']
    assert '<th></th>' not in head  # no empty header cell (pandas' row of the index name)
    from sklearn.metrics import f1_score
    assert summary['macro_f1'] == pytest.approx(f1_score(targets, probs.argmax(1), average='macro'))  # 0-1 in json
    assert f"<td>{summary['macro_f1'] * 100:.2f} % / {summary['weighted_f1'] * 100:.2f} %</td>" in page
    assert 'Scores on a 0-1 scale' in page  # the per-class table says its scale
    assert summary['misclassified'] == 1
    width, height = Image.open(tmp_path / 'r' / 'misclassified.png').size
    assert width <= 400 and height <= 400  # one picture wide, not four columns of blank


def test_mistakes_grid_keeps_titles_apart(tmp_path):
    from utils.report import MISTAKES_SHOWN, draw_mistakes, predictions_table
    probs, targets, paths, names = _four_classes_with_mistakes(tmp_path, 16)
    table = predictions_table(probs, targets, paths, names)
    fig = draw_mistakes(table[table['true'] != table['predicted']])
    fig.canvas.draw()
    axes = np.array(fig.axes).reshape(-1, 4)
    assert axes.shape == (MISTAKES_SHOWN // 4, 4) and tuple(fig.get_size_inches()) == (12, 3.2 * 4)
    title = fig._suptitle.get_window_extent()
    assert title.y0 > max(ax.title.get_window_extent().y1 for ax in axes[0])  # above the first row's titles
    for upper, lower in zip(axes[:-1, 0], axes[1:, 0]):  # each row's titles below the pictures above
        assert lower.title.get_window_extent().y1 < upper.get_window_extent().y0
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_calibration_error_follows_its_definition_and_scikit_learns_bins():
    """ECE from scikit-learn's calibration_curve (15 uniform bins) weighted by each bin's share of the images;
    0 for confidences that equal the accuracy in every bin; Brier as scikit-learn's multi-class score."""
    from sklearn.calibration import calibration_curve
    from utils.calibration import BINS, calibration_scores
    rng = np.random.default_rng(0)
    probs, targets = rng.dirichlet(np.ones(4) * 0.5, size=400), rng.integers(0, 4, 400)
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=BINS, strategy='uniform')
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, BINS + 1)[1:-1], confidence), minlength=BINS)
    expected = (np.abs(accuracy - mean_confidence) * counts[counts > 0] / len(targets)).sum()
    scores = calibration_scores(probs, targets)
    assert np.isclose(scores['ece'], expected) and scores['ece'] > 0.1
    assert np.isclose(scores['log_loss'], log_loss(targets, probs, labels=range(4)))
    assert np.isclose(scores['brier'], ((probs - np.eye(4)[targets]) ** 2).sum(1).mean())
    calibrated = np.full((10, 2), 0.5)  # 50 % confident and right half the time
    assert calibration_scores(calibrated, np.array([0, 1] * 5))['ece'] == 0
