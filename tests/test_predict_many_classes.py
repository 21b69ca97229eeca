"""predict.py with a 1000-class head: top-k columns, every probability on request, a report page of the worst."""
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, top_k_accuracy_score

import predict
from conftest import TINY
from utils.report import MAX_TABLE_ROWS

CLASSES = [f'n{i:04d}' for i in range(1000)]
IN_DATA = CLASSES[::8]  # 125 class folders of 2 images: 250 images scored against 1000 classes


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
    """A tiny ViT checkpoint (random weights) with a 1000-class head, its report of the folder (--topk 3
    --save-probs) and the folder."""
    import torch
    from datasets.transforms import data_config
    from models.checkpoint import make_checkpoint, save_atomic
    from models.factory import build_model
    root = tmp_path_factory.mktemp('many')
    torch.manual_seed(0)
    model = build_model('vit_tiny_patch16_224', num_classes=len(CLASSES), **TINY)
    meta = dict(model_name='vit_tiny_patch16_224', model_kwargs={k: v for k, v in TINY.items() if k != 'img_size'},
                method='none', method_cfg={}, num_classes=len(CLASSES), class_names=CLASSES,
                data_config=data_config(model, 32))
    save_atomic(make_checkpoint(meta, model.state_dict()), root / 'best.pth')
    rng = np.random.default_rng(0)
    for name in IN_DATA:
        (root / 'data' / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / 'data' / name / f'{i}.png')
    assert predict.main(['--weights', str(root / 'best.pth'), '--data-root', str(root / 'data'), '--output-dir',
                         str(root / 'report'), '--workers', '0', '--topk', '3', '--save-probs']) == 0
    return root


def test_predictions_have_top_k_columns_that_agree_with_the_saved_probabilities(labelled):
    out = labelled / 'report'
    table = pd.read_csv(out / 'predictions.csv')
    assert list(table.columns) == ['file', 'true', 'predicted', 'confidence', 'label_1', 'prob_1', 'label_2',
                                   'prob_2', 'label_3', 'prob_3'] and len(table) == 250
    probs = np.load(out / 'probabilities.npy')
    assert probs.dtype == np.float32 and probs.shape == (250, 1000)
    assert json.loads((out / 'classes.json').read_text()) == CLASSES
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    top = np.argsort(-probs, axis=1, kind='stable')[:, :3]  # rows in predictions.csv's order
    assert (table[['label_1', 'label_2', 'label_3']].values == np.array(CLASSES)[top]).all()
    np.testing.assert_allclose(table[['prob_1', 'prob_2', 'prob_3']], np.take_along_axis(probs, top, 1), rtol=1e-6)
    assert (table['label_1'] == table['predicted']).all() and np.allclose(table['prob_1'], table['confidence'])
    assert (table['true'] == table['file'].str.split('/').str[-2]).all()


def test_report_numbers_are_scikit_learns_and_the_page_shows_the_worst_classes(labelled):
    out = labelled / 'report'
    probs, table = np.load(out / 'probabilities.npy'), pd.read_csv(out / 'predictions.csv')
    targets = table['true'].map(CLASSES.index).values
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['top_k'] == 3 and np.isclose(summary['top_k_accuracy'],
                                                top_k_accuracy_score(targets, probs, k=3, labels=range(1000)))
    per_class = pd.read_csv(out / 'per_class_report.csv', index_col=0)
    for name in IN_DATA[:5]:
        positive = targets == CLASSES.index(name)
        assert np.isclose(per_class.loc[name, 'roc_auc'], roc_auc_score(positive, probs[:, CLASSES.index(name)]))
        assert np.isclose(per_class.loc[name, 'average_precision'],
                          average_precision_score(positive, probs[:, CLASSES.index(name)]))
    page = (out / 'report.html').read_text()
    rows = re.findall(r'<tr>\s*<th>(.*?)</th>', page.split('<h2>Per class</h2>')[1].split('</table>')[0])
    averages = len(per_class) - len(IN_DATA)  # the CSV keeps every class, then accuracy and the averages
    assert set(IN_DATA) <= set(per_class.index) and len(rows) == MAX_TABLE_ROWS + averages
    assert f'The {MAX_TABLE_ROWS} classes of lowest F1 (then ROC AUC) of {len(IN_DATA)}' in page
    np.testing.assert_allclose(per_class.loc[rows[:MAX_TABLE_ROWS], 'f1-score'],
                               np.sort(per_class.loc[IN_DATA, 'f1-score'])[:MAX_TABLE_ROWS])
    for name in ('confusion_matrix.png', 'roc_curves.png', 'pr_curves.png'):
        assert max(Image.open(out / name).size) <= 2200, name


def test_classified_images_get_top_k_columns_and_probabilities(labelled, tmp_path):
    out = tmp_path / 'images'
    assert predict.main(['--weights', str(labelled / 'best.pth'), '--images', str(labelled / 'data' / IN_DATA[0]),
                         '--output-dir', str(out), '--workers', '0', '--save-probs']) == 0
    table = pd.read_csv(out / 'predictions.csv')
    assert list(table.columns)[-2:] == ['label_5', 'prob_5'] and 'p_n0000' not in table
    assert np.load(out / 'probabilities.npy').shape == (2, 1000)


def test_topk_below_one_is_refused(labelled, capsys):
    assert predict.main(['--weights', str(labelled / 'best.pth'), '--data-root', str(labelled / 'data'),
                         '--topk', '0']) == 2
    assert 'error: --topk must be at least 1 (got 0)' in capsys.readouterr().err
