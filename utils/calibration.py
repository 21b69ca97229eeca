"""Calibration of the report: is an image predicted with 80 % confidence right 80 % of the time?

Top-1 confidence against accuracy in ``BINS`` equal-width bins, as Guo et al. ("On Calibration of Modern Neural
Networks", ICML 2017) measure it: the reliability diagram (scikit-learn's ``calibration_curve`` /
``CalibrationDisplay`` on "top-1 is right" against the top-1 confidence) and the expected calibration error,
ECE = sum over bins of |accuracy - mean confidence| x the bin's share of the images. With them, two proper scores
of all the probabilities: the log-loss (scikit-learn's ``log_loss``) and the multi-class Brier score (Brier 1950: the mean over
images of the squared distance between the probability vector and the one-hot truth; 0 is perfect, 2 the worst).
"""
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import CalibrationDisplay

BINS = 15  # Guo et al.'s


def calibration_scores(probs: np.ndarray, targets: np.ndarray) -> dict:
    """ECE (top-1, ``BINS`` bins), log-loss and Brier score of probabilities [N, C] for true class indices."""
    probs = probs.astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # a float32 softmax sums to 1 within ~1e-7 only
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    bin_of = np.searchsorted(np.linspace(0, 1, BINS + 1)[1:-1], confidence)  # calibration_curve's bins
    ece = sum(abs(correct[bin_of == b].mean() - confidence[bin_of == b].mean()) * (bin_of == b).mean()
              for b in np.unique(bin_of))
    # both from the true class's probability, without an images x classes one-hot array: scikit-learn's log_loss
    # (its clipping to [eps, 1 - eps] included) and |p - one_hot|^2 = |p|^2 - 2 p_true + 1
    true_probs = probs[np.arange(len(targets)), targets]
    eps = np.finfo(probs.dtype).eps
    return dict(ece=float(ece), log_loss=float(-np.log(np.clip(true_probs, eps, 1 - eps)).mean()),
                brier=float(((probs ** 2).sum(axis=1) - 2 * true_probs + 1).mean()))


def plot_reliability(probs: np.ndarray, targets: np.ndarray, ece: float, path: Path) -> None:
    """The reliability diagram of the top-1 confidence, with the ECE in the title."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    CalibrationDisplay.from_predictions(probs.argmax(axis=1) == targets, probs.max(axis=1), n_bins=BINS,
                                        strategy='uniform', name='top-1', ax=ax)
    ax.set_xlabel('top-1 confidence (mean per bin)')
    ax.set_ylabel('top-1 accuracy (per bin)')
    ax.set_title(f'Reliability: expected calibration error {ece * 100:.2f} % ({BINS} bins)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
