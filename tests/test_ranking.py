"""utils.ranking: one-vs-rest ROC AUC, average precision and curve points of many classes at once, equal to
scikit-learn's per class, with ties, float32 scores and a perfect or a useless ranking among the rows."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from utils.ranking import (average_precision, held_counts, macro_roc, one_vs_rest_scores, pr_points, roc_auc,
                           roc_points)


def cases(levels):
    """Scores [C, N] (float32, ``levels`` distinct values per row: ties when few) and truth [C, N]."""
    rng = np.random.default_rng(levels)
    truth = rng.random((12, 300)) < 0.2
    truth[:, :2] = [True, False]  # both sides in every row
    scores = np.round(rng.random((12, 300)) * (levels - 1) + truth * rng.random(12)[:, None] * levels) / levels
    scores[0] = truth[0]  # a perfect ranking
    scores[1] = 0.5       # a useless one: every score tied
    return scores.astype(np.float32), truth


@pytest.mark.parametrize('levels', [3, 20, 10 ** 6])
def test_scores_and_points_equal_scikit_learns(levels):
    scores, truth = cases(levels)
    tps, fps = held_counts(scores, truth)
    aucs, aps = roc_auc(tps, fps), average_precision(tps, fps)
    for row in range(len(scores)):
        assert np.isclose(aucs[row], roc_auc_score(truth[row], scores[row]), rtol=0, atol=1e-12)
        assert np.isclose(aps[row], average_precision_score(truth[row], scores[row]), rtol=0, atol=1e-12)
        precision, recall, _ = precision_recall_curve(truth[row], scores[row], drop_intermediate=True)
        ours = pr_points(tps[row], fps[row])
        np.testing.assert_allclose(ours[0], precision, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours[1], recall, rtol=0, atol=1e-12)
        fpr, tpr, _ = roc_curve(truth[row], scores[row])
        points = roc_points(tps[row], fps[row])
        between = np.setdiff1d(np.linspace(0, 1, 101), fpr)  # where scikit-learn's line has one value
        np.testing.assert_allclose(np.interp(between, *points), np.interp(between, fpr, tpr), rtol=0, atol=1e-12)
        steps = np.unique(fpr)  # on a vertical step, the macro-average takes its top
        np.testing.assert_allclose(np.interp(steps, *points), [tpr[fpr == x].max() for x in steps], rtol=0, atol=1e-12)


def test_blocks_of_classes_give_each_class_its_scores(monkeypatch):
    """Classes sorted in blocks (two here) of a probability table give each class its own scikit-learn AUC and
    AP, and the macro-average ROC is the mean of the classes' curves on the grid."""
    monkeypatch.setattr('utils.ranking.BLOCK', 4)
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(7), 20)
    probs = rng.dirichlet(np.ones(7), size=len(targets)).astype(np.float32)
    probs[np.arange(len(targets)), targets] += 0.3
    grid = np.linspace(0, 1, 51)
    found = one_vs_rest_scores(probs, targets, range(7), grid)
    for c in range(7):
        assert np.isclose(found['roc_auc'][c], roc_auc_score(targets == c, probs[:, c]), rtol=0, atol=1e-12)
        assert np.isclose(found['average_precision'][c], average_precision_score(targets == c, probs[:, c]),
                          rtol=0, atol=1e-12)
    tps, fps = held_counts(probs.T, targets[None, :] == np.arange(7)[:, None])
    np.testing.assert_allclose(found['mean_tpr'], macro_roc(tps, fps, grid).mean(axis=0), rtol=0, atol=1e-12)


def test_micro_average_equals_scikit_learns():
    """The report's micro-average (every image x class present as one decision) has scikit-learn's micro AUC and
    AP, over the classes present only when the model knows more."""
    from utils.report import ROC_GRID, average_curves
    rng = np.random.default_rng(1)
    targets = np.repeat([0, 1, 3], 30)
    probs = rng.dirichlet(np.ones(4), size=len(targets)).astype(np.float32)
    probs[np.arange(len(targets)), targets] += 0.2
    present = [0, 1, 3]
    one_hot = targets[:, None] == np.asarray(present)
    found = average_curves(probs, targets, present, np.zeros(len(ROC_GRID)))
    assert np.isclose(found['roc'][0][1].roc_auc, roc_auc_score(one_hot, probs[:, present], average='micro'),
                      rtol=0, atol=1e-12)
    assert np.isclose(found['pr'][0][1].average_precision,
                      average_precision_score(one_hot, probs[:, present], average='micro'), rtol=0, atol=1e-12)
