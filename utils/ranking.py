"""One-vs-rest ROC AUC, average precision and curve points of many classes at once, as scikit-learn defines them.

scikit-learn's ``roc_curve`` / ``precision_recall_curve`` sort one class per call and check their input each
time: at 1,000 classes x 10,000 images the checks cost more than the sorts (8 s of a 12 s report). Here a block
of classes is sorted in one call. Ranked by score, highest first, the running counts of true positives (tps)
and false positives (fps) at the last image of each run of tied scores are scikit-learn's curve points
(``_binary_clf_curve``); between those points the counts are held at the last point ("held counts"), so that
every step of a block has the same length. From them:

- ROC AUC: the trapezoids between consecutive points of (fps / negatives, tps / positives) from (0, 0),
  scikit-learn's ``auc`` of ``roc_curve``;
- average precision: sum over points of (recall step) x precision, precision = tps / (tps + fps),
  scikit-learn's ``average_precision_score``.

Both are tested equal to scikit-learn's. Drawn curves of a few classes are still scikit-learn's own.
"""
from typing import Tuple

import numpy as np

BLOCK = 64  # classes sorted together: the temporaries are a few BLOCK x images arrays


def held_counts(scores: np.ndarray, positive: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(tps, fps), each [K, N], of scores [K, N] (a row per class) and the boolean truth ``positive`` [K, N]:
    the counts at each rank of the row sorted by score (highest first), held at the last image of each run of
    tied scores, so that only scikit-learn's curve points are visible (tied images count together)."""
    order = np.argsort(scores, axis=1)[:, ::-1]  # tied scores may come in any order: only their run's end counts
    ranked = np.take_along_axis(scores, order, axis=1)
    count = np.int32 if ranked.shape[1] < 2 ** 31 else np.int64  # int32: a third of int64's time to sum
    tps = np.cumsum(np.take_along_axis(positive, order, axis=1), axis=1, dtype=count)
    fps = np.arange(1, ranked.shape[1] + 1, dtype=count) - tps
    inside = np.zeros(ranked.shape, dtype=bool)  # not the last of a run of tied scores
    inside[:, :-1] = ranked[:, 1:] == ranked[:, :-1]
    for counts in (tps, fps):  # counts never fall: the running maximum of the run ends' counts holds them
        counts[inside] = 0
        np.maximum.accumulate(counts, axis=1, out=counts)
    return tps, fps


def _before(counts: np.ndarray) -> np.ndarray:
    """The counts one rank earlier (0 before the first)."""
    return np.pad(counts[:, :-1], ((0, 0), (1, 0)))


def roc_auc(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """[K] ROC AUC of held counts (rows with both positives and negatives)."""
    area = ((fps - _before(fps)) * (tps + _before(tps)).astype(float)).sum(axis=1)  # twice the trapezoids
    return area / (2.0 * tps[:, -1] * fps[:, -1])  # float64 holds the counts' products exactly below 2 ** 53


def average_precision(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """[K] average precision of held counts (rows with positives)."""
    precision = tps / np.maximum(tps + fps, 1).astype(float)  # 0 / 1 before the first point (no recall step)
    return ((tps - _before(tps)) * precision).sum(axis=1) / tps[:, -1]


def _points(tps: np.ndarray, fps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One row's held counts at its curve points only (where they change: the ends of runs of tied scores)."""
    point = np.r_[True, (tps[1:] != tps[:-1]) | (fps[1:] != fps[:-1])]
    point[0] = tps[0] + fps[0] > 0
    return tps[point], fps[point]


def roc_points(tps: np.ndarray, fps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of one row's held counts: (0, 0), then the curve's corners (the points inside a horizontal or
    vertical run dropped), the same line as ``roc_curve``'s."""
    tps, fps = _points(tps, fps)
    fpr, tpr = np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]
    inside = np.r_[False, ((fpr[1:-1] == fpr[:-2]) & (fpr[1:-1] == fpr[2:])) |
                   ((tpr[1:-1] == tpr[:-2]) & (tpr[1:-1] == tpr[2:])), False]
    return fpr[~inside], tpr[~inside]


def pr_points(tps: np.ndarray, fps: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of one row's held counts as ``precision_recall_curve(drop_intermediate=True)`` gives
    them: the curve's points where the recall changes on either side, recall falling, ending at (1, 0)."""
    tps, fps = _points(tps, fps)
    if len(tps) > 2:
        keep = np.r_[True, (tps[1:-1] != tps[:-2]) | (tps[1:-1] != tps[2:]), True]
        tps, fps = tps[keep], fps[keep]
    return np.r_[(tps / (tps + fps))[::-1], 1.0], np.r_[(tps / tps[-1])[::-1], 0.0]


def macro_roc(tps: np.ndarray, fps: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """[K, len(grid)] true positive rates of each row's ROC curve at the false positive rates ``grid``: linear
    between corners, the top of a vertical step on it (where ``np.interp`` takes the last of equal x)."""
    return np.stack([np.interp(grid, *roc_points(t, f)) for t, f in zip(tps, fps)])


def one_vs_rest_scores(probs: np.ndarray, targets: np.ndarray, classes, grid: np.ndarray) -> dict:
    """{'roc_auc': [K], 'average_precision': [K], 'mean_tpr': [len(grid)]} of the ``classes`` (each with images
    of its own and of others) ranked by their column of ``probs`` [N, C] against true class ``targets`` [N];
    ``mean_tpr``: the classes' ROC curves averaged at the false positive rates ``grid`` (the macro-average)."""
    classes = np.asarray(classes, dtype=int)
    auc, ap, tpr_sum = [np.empty(0)], [np.empty(0)], np.zeros(len(grid))  # empty arrays for no classes
    for start in range(0, len(classes), BLOCK):
        block = classes[start:start + BLOCK]
        tps, fps = held_counts(probs[:, block].T, targets[None, :] == block[:, None])
        auc.append(roc_auc(tps, fps))
        ap.append(average_precision(tps, fps))
        tpr_sum += macro_roc(tps, fps, grid).sum(axis=0)
    return dict(roc_auc=np.concatenate(auc), average_precision=np.concatenate(ap), mean_tpr=tpr_sum / max(len(classes), 1))
