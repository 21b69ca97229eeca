"""The evaluation report of a labelled set, from probabilities to files (no model here).

Metrics are scikit-learn's; the one-vs-rest ROC AUC and average precision of many classes come from
``utils.ranking`` (all classes sorted in blocks, equal to scikit-learn's). Per-class figures cover the classes present in the data; predictions of a class
absent from the data still count as mistakes; ROC and PR curves need both sides of a class in the data (n/a
otherwise). With many classes the plots show the most confused / worst classes and say so in their titles, the
page the worst rows of the per-class table, predictions.csv the top-k classes instead of every probability
(``--save-probs`` keeps them all in probabilities.npy), while the other CSV files keep every class; nothing per
image and class is a Python object (probabilities stay one float32 array). Names are the user's folder and file
names, whatever they hold: plot text is not read as maths (``$``), CSV cells that hold a name cannot start a
spreadsheet formula (a leading ``'`` as OWASP advises), file names that are not UTF-8 are written byte for byte
(surrogate escapes).
"""
import base64
import html
import json
import warnings
from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use('Agg')
matplotlib.rcParams['text.parse_math'] = False  # class and file names with '$' are text, not maths
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay, auc,  # noqa: E402
                             classification_report, confusion_matrix, top_k_accuracy_score)

from utils.calibration import BINS, calibration_scores, plot_reliability  # noqa: E402
from utils.ranking import (average_precision, held_counts, one_vs_rest_scores, pr_points, roc_auc,  # noqa: E402
                           roc_points)

MAX_CLASSES_DRAWN = 30   # confusion-matrix rows/columns drawn before switching to the most confused classes
MAX_CURVES = 10          # per-class ROC/PR curves drawn before switching to the worst classes
MAX_TABLE_ROWS = 30      # per-class rows on the page and the terminal before switching to the lowest F1
PROB_COLUMNS_MAX = 20    # classes up to which predictions.csv has a column per class (top-k columns beyond)
MISTAKES_SHOWN = 16
MISTAKE_COLUMNS = 4
FORMULA_START = ('=', '+', '-', '@', '\t', '\r', "'")  # "'" too, so that read_name undoes safe_name exactly
CSV_OPTIONS = dict(errors='surrogateescape')  # non-UTF-8 file names are written as the bytes they are
# every name predict.py writes into its --output-dir: a folder of only these is an earlier output it may replace
REPORT_FILES = ('predictions.csv', 'predictions.json', 'probabilities.npy', 'classes.json', 'confusion_matrix.csv',
                'confusion_matrix_normalized.csv', 'confusion_matrix.png', 'confusion_matrix_normalized.png',
                'roc_curves.png', 'pr_curves.png', 'reliability.png', 'misclassified.png', 'per_class_report.csv',
                'summary.json', 'report.html', 'token_maps.png', 'token_maps', 'curves.png')  # curves: a run's report/


def safe_name(name: str) -> str:
    """A name for a CSV cell that a spreadsheet cannot run as a formula (OWASP: prefix a quote)."""
    return "'" + name if name.startswith(FORMULA_START) else name


def plot_text(name: str) -> str:
    """A name as plot text: bytes of a non-UTF-8 file name (surrogate escapes) shown as U+FFFD."""
    return name.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')


def read_name(cell: str) -> str:
    """The name ``safe_name`` wrote into a cell."""
    return cell[1:] if cell.startswith("'") else cell


def read_report_csv(path) -> pd.DataFrame:
    """A report CSV of names and numbers as written: 'NA' / 'None' stay names, only empty cells are NaN."""
    table = pd.read_csv(path, index_col=0, keep_default_na=False, na_values=[''], encoding_errors='surrogateescape')
    table.index = table.index.map(read_name)
    return table


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, names: List[str], path: Path, normalized: bool) -> None:
    """scikit-learn's ConfusionMatrixDisplay of ``cm``, of the MAX_CLASSES_DRAWN most confused classes beyond that."""
    shown = np.arange(len(names))
    title = 'Confusion matrix' + (' (row-normalised)' if normalized else ' (counts)')
    if len(names) > MAX_CLASSES_DRAWN:
        off = cm - np.diag(np.diag(cm))
        shown = np.sort(np.argsort(-(off.sum(0) + off.sum(1)))[:MAX_CLASSES_DRAWN])
        title += f': the {MAX_CLASSES_DRAWN} most confused of {len(names)} classes'
    values = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalized else cm
    numbers = len(shown) <= 20  # each cell's value written in it, up to 20 classes
    side = min(max(4.5, (0.45 if numbers else 0.3) * len(shown) + 2), 18)  # inches; a cell without a number is smaller
    fig, ax = plt.subplots(figsize=(side + 1, side))
    display = ConfusionMatrixDisplay(values[np.ix_(shown, shown)], display_labels=[plot_text(names[i]) for i in shown])
    display.plot(ax=ax, cmap='Blues', include_values=numbers, values_format='.2f' if normalized else 'd',
                 xticks_rotation=90 if len(shown) > 6 else 'horizontal', colorbar=False, text_kw=dict(fontsize=7),
                 im_kw=dict(vmin=0, vmax=1 if normalized else None))
    fig.colorbar(display.im_, ax=ax, fraction=0.046)  # as tall as the matrix (the display's own is the figure's)
    ax.tick_params(labelsize=8)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title, fontsize=10)
    _save(fig, path)


ROC_GRID = np.linspace(0, 1, 201)  # false positive rates at which the macro-average ROC averages the classes


def curve_display(kind: str, tps: np.ndarray, fps: np.ndarray, value: float):
    """scikit-learn's ROC (``kind`` 'roc') or precision-recall display of a row of ``ranking.held_counts``, with its
    AUC or average precision ``value``."""
    if kind == 'roc':
        fpr, tpr = roc_points(tps, fps)
        return RocCurveDisplay(fpr=fpr, tpr=tpr, roc_auc=value)
    precision, recall = pr_points(tps, fps)
    return PrecisionRecallDisplay(precision=precision, recall=recall, average_precision=value)


def worst_curves(probs: np.ndarray, targets: np.ndarray, scores: dict, kind: str) -> dict:
    """{class: display} of the MAX_CURVES classes of lowest ``scores`` ({class: AUC or AP}), worst first."""
    worst = sorted(scores, key=scores.get)[:MAX_CURVES]
    tps, fps = held_counts(probs[:, worst].T, targets[None, :] == np.asarray(worst, dtype=int)[:, None])
    return {c: curve_display(kind, t, f, scores[c]) for c, t, f in zip(worst, tps, fps)}


def average_curves(probs: np.ndarray, targets: np.ndarray, present: List[int], mean_tpr: np.ndarray) -> dict:
    """{'roc': [(name, display)], 'pr': [...]}: the micro-average (every image x class present as one binary
    decision) of both, and the macro-average ROC (``mean_tpr``: the classes' curves averaged on ROC_GRID)."""
    scores = (probs if len(present) == probs.shape[1] else probs[:, present]).ravel()
    tps, fps = held_counts(scores[None], (targets[:, None] == np.asarray(present)).ravel()[None])
    macro = RocCurveDisplay(fpr=ROC_GRID, tpr=mean_tpr, roc_auc=auc(ROC_GRID, mean_tpr))
    return dict(roc=[('micro-average', curve_display('roc', tps[0], fps[0], roc_auc(tps, fps)[0])),
                     ('macro-average', macro)],
                pr=[('micro-average', curve_display('pr', tps[0], fps[0], average_precision(tps, fps)[0]))])


AVERAGE_STYLE = {'micro-average': '--', 'macro-average': ':'}


def plot_curves(curves: dict, total: int, averages: list, names: List[str], kind: str, path: Path) -> None:
    """The ``kind`` ('roc' or 'pr') displays ``curves`` ({class: display}, worst first) of the ``total`` classes
    that have a curve, and ``averages``."""
    binary = len(names) == 2
    fig, ax = plt.subplots(figsize=(7, 6))
    title = ('ROC' if kind == 'roc' else 'Precision-recall') + (f' ({plot_text(names[1])} as positive)' if binary else '')
    if total > len(curves):
        title += f': the {len(curves)} worst of {total} classes + averages'
    for c, display in curves.items():
        display.plot(ax=ax, name=plot_text(names[c])).line_.set_linewidth(1.2)
    for name, display in averages:
        display.plot(ax=ax, name=name).line_.set(color='k', linestyle=AVERAGE_STYLE[name], linewidth=2)
    if not curves:
        ax.text(0.5, 0.5, 'n/a: the data holds images of one class only', ha='center', transform=ax.transAxes)
    if kind == 'roc':
        ax.plot([0, 1], [0, 1], color='grey', lw=0.8)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc='lower right' if kind == 'roc' else 'lower left')
    ax.grid(alpha=0.3)
    _save(fig, path)


def layout_under_title(fig, title: str, fontsize: float, **tight_layout_kwargs) -> None:
    """tight_layout for the axes, then ``title`` (its lines as given) above them in room reserved for all its
    lines: tight_layout alone lets a figure title run into the first row's axes titles in a tall figure."""
    height = fig.get_size_inches()[1]
    top_pad = 0.08  # inches above the title
    room = top_pad + (title.count('\n') + 1) * fontsize * 1.2 / 72 + 0.05  # matplotlib's line spacing is 1.2
    fig.tight_layout(rect=(0, 0, 1, 1 - room / height), **tight_layout_kwargs)
    fig.suptitle(title, fontsize=fontsize, y=1 - top_pad / height, va='top')


def plot_mistakes(table: pd.DataFrame, path: Path) -> int:
    """A grid of the most confident mistakes; returns how many there were in all."""
    wrong = table[table['true'] != table['predicted']].sort_values('confidence', ascending=False)
    fig = draw_mistakes(wrong)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(wrong)


def draw_mistakes(wrong: pd.DataFrame):
    """The figure of the first MISTAKES_SHOWN rows of ``wrong`` (predictions table rows), as many columns as
    pictures up to MISTAKE_COLUMNS."""
    from datasets.images import load_rgb
    shown = wrong.head(MISTAKES_SHOWN)
    cols = min(max(len(shown), 1), MISTAKE_COLUMNS)  # as many columns as pictures, up to MISTAKE_COLUMNS
    rows = max(1, int(np.ceil(len(shown) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows if len(shown) else 1.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis('off')
    if shown.empty:  # a line of text, not a blank page
        axes[0, 0].text(0.5, 0.5, 'No misclassified images.', fontsize=14, ha='center', va='center')
    for ax, (_, r) in zip(axes.ravel(), shown.iterrows()):
        ax.imshow(load_rgb(r['file']))
        ax.set_title(f"true: {plot_text(r['true'])}\npred: {plot_text(r['predicted'])} ({r['confidence']:.2f})", fontsize=8, color='darkred')
    # h_pad: room for each picture's two-line title (tight_layout's own estimate lets it touch the row above)
    layout_under_title(fig, f'Most confident mistakes ({len(shown)} of {len(wrong)})', 11, h_pad=2.5)
    return fig


def names_column(names, index=None) -> pd.Series:
    """Names (files, classes) as a column of Python strings: pandas 3 would store them as its str type, which
    refuses the surrogate escapes of file names that are not UTF-8."""
    return pd.Series(list(names), index=index, dtype=object)


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """predictions.csv: the names in it (file, true, predicted, label_i) made spreadsheet-safe."""
    named = [c for c in table if c in ('file', 'true', 'predicted') or c.startswith('label_')]
    table.assign(**{c: names_column(map(safe_name, table[c]), table.index) for c in named}).to_csv(
        path, index=False, **CSV_OPTIONS)


def predictions_table(probs: np.ndarray, targets, paths, names, topk: int = 5) -> pd.DataFrame:
    """file, true, predicted, confidence, then a probability per class (p_<class>) up to PROB_COLUMNS_MAX classes,
    the ``topk`` classes beyond (label_1, prob_1, ..., most probable first)."""
    predicted = probs.argmax(axis=1)
    table = pd.DataFrame(dict(file=names_column(paths), true=names_column(names[t] if t >= 0 else '' for t in targets),
                              predicted=names_column(names[p] for p in predicted), confidence=probs.max(axis=1)))
    if len(names) <= PROB_COLUMNS_MAX:
        return pd.concat([table, pd.DataFrame(probs, columns=[f'p_{n}' for n in names])], axis=1)
    top = np.argsort(-probs, axis=1, kind='stable')[:, :topk]  # stable: label_1 is argmax's class on ties
    labels, top_probs = np.asarray(names, dtype=object)[top], np.take_along_axis(probs, top, axis=1)
    for i in range(top.shape[1]):
        table[f'label_{i + 1}'], table[f'prob_{i + 1}'] = names_column(labels[:, i]), top_probs[:, i]
    return table


def write_probabilities(probs: np.ndarray, names: Sequence[str], out: Path) -> None:
    """probabilities.npy (float32, a row per image in predictions.csv's order) and classes.json (its columns)."""
    np.save(out / 'probabilities.npy', probs.astype(np.float32, copy=False))
    (out / 'classes.json').write_text(json.dumps(list(names)))


def write_labelled_report(probs: np.ndarray, targets: np.ndarray, paths: Sequence[str], names: List[str],
                          out: Path, context: dict, topk: int = 5, save_probs: bool = False) -> dict:
    """Every report file for probabilities [N, C] of images with true class indices ``targets``; the top-``topk``
    accuracy (and columns of predictions.csv beyond PROB_COLUMNS_MAX classes); ``save_probs``: all of ``probs``."""
    out.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(axis=1)
    present = sorted(set(targets.tolist()))
    k = min(topk, len(names))
    table = predictions_table(probs, targets, paths, names, k)
    write_predictions(table, out / 'predictions.csv')
    if save_probs:
        write_probabilities(probs, names, out)

    labels = sorted(set(present) | set(predicted.tolist()))
    with warnings.catch_warnings():  # one label, all right and all predicted as it: scikit-learn's 1x1 is right
        warnings.filterwarnings('ignore', 'A single label was found', UserWarning)
        cm = confusion_matrix(targets, predicted, labels=labels)
    label_names = [names[i] for i in labels]
    safe = [safe_name(n) for n in label_names]
    pd.DataFrame(cm, index=safe, columns=safe).to_csv(out / 'confusion_matrix.csv', **CSV_OPTIONS)
    normalised = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    pd.DataFrame(normalised, index=safe, columns=safe).to_csv(out / 'confusion_matrix_normalized.csv', **CSV_OPTIONS)
    plot_confusion(cm, label_names, out / 'confusion_matrix.png', normalized=False)
    plot_confusion(cm, label_names, out / 'confusion_matrix_normalized.png', normalized=True)

    counts = np.bincount(targets, minlength=len(names))  # images per class
    # the classes with images of their own and of others (a ROC curve needs both)
    ranked = [c for c in ([1] if len(names) == 2 else present) if 0 < counts[c] < len(targets)]
    found = one_vs_rest_scores(probs, targets, ranked, ROC_GRID)
    roc, ap = (dict(zip(ranked, found[kind].tolist())) for kind in ('roc_auc', 'average_precision'))
    averages = average_curves(probs, targets, present, found['mean_tpr']) if len(names) > 2 and ranked else {}
    for kind, scores in (('roc', roc), ('pr', ap)):
        plot_curves(worst_curves(probs, targets, scores, kind), len(scores), averages.get(kind, []), names, kind,
                    out / f'{kind}_curves.png')
    report = classification_report(targets, predicted, labels=present, target_names=[names[c] for c in present],
                                   output_dict=True, zero_division=0)
    per_class = pd.DataFrame({k: v for k, v in report.items() if isinstance(v, dict)}).T
    per_class['roc_auc'] = per_class.index.map({names[c]: v for c, v in roc.items()})
    per_class['average_precision'] = per_class.index.map({names[c]: v for c, v in ap.items()})
    for column, scores in (('roc_auc', roc), ('average_precision', ap)):  # their macro and weighted averages
        if scores:
            per_class.loc['macro avg', column] = np.mean(list(scores.values()))
            per_class.loc['weighted avg', column] = np.average(list(scores.values()), weights=counts[list(scores)])
    accuracy = float((predicted == targets).mean())
    per_class.loc['accuracy'] = [np.nan, np.nan, accuracy, len(targets), np.nan, np.nan]
    per_class['support'] = per_class['support'].astype(int)
    per_class.index.name = 'class'
    per_class.rename(index=safe_name).to_csv(out / 'per_class_report.csv', **CSV_OPTIONS)

    # one-vs-rest AUC averaged over the classes present (sklearn's 'ovr' macro when all are present)
    macro_auc = float(per_class.loc['macro avg', 'roc_auc']) if roc else None
    mistakes = plot_mistakes(table, out / 'misclassified.png')
    calibration = calibration_scores(probs, targets)
    plot_reliability(probs, targets, calibration['ece'], out / 'reliability.png')
    with warnings.catch_warnings():  # k = number of classes is allowed (and trivially 100 %)
        warnings.simplefilter('ignore')
        top_k = float(top_k_accuracy_score(targets, probs[:, 1] if len(names) == 2 else probs, k=k,
                                           labels=list(range(len(names)))))
    summary = dict(
        accuracy=accuracy, top_k=k, top_k_accuracy=top_k,
        macro_f1=float(report['macro avg']['f1-score']), weighted_f1=float(report['weighted avg']['f1-score']),
        macro_auc=macro_auc, **calibration, images=int(len(targets)), misclassified=mistakes, classes=list(names),
        classes_in_data=[names[c] for c in present], **context)
    if not roc:
        summary['notes'] = ['ROC AUC and average precision are n/a: the data holds images of one class only']
    summary['skipped_files'] = len(context.get('skipped', []))
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    write_html(out, summary, per_class)
    return summary


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{path.name}">'


SCALE_NOTE = ('Scores on a 0-1 scale, as scikit-learn gives them (0.8500 = 85.00 %); the summary above, log.csv '
              'and the training curves give accuracy and F1 in %.')


def per_class_shown(per_class: pd.DataFrame, n_classes: int):
    """(rows, note) of the per-class table to show on the page and the terminal: every row up to MAX_TABLE_ROWS
    classes, beyond that the worst classes and the averages, with a line saying so ('' otherwise)."""
    if n_classes <= MAX_TABLE_ROWS:
        return per_class, ''
    classes, averages = per_class.iloc[:n_classes], per_class.iloc[n_classes:]  # averages: the last rows
    worst = classes.sort_values(['f1-score', 'roc_auc'], kind='stable').head(MAX_TABLE_ROWS)
    return (pd.concat([worst, averages]), f'The {MAX_TABLE_ROWS} classes of lowest F1 (then ROC AUC) of {n_classes}; '
                                          'per_class_report.csv holds every class.')


def per_class_html(per_class: pd.DataFrame) -> str:
    """The per-class table as HTML: one header row, its first cell naming the column of class names (pandas
    writes an index name as a second, otherwise empty, header row)."""
    table = per_class.rename_axis(index=None, columns=per_class.index.name or 'class')
    return table.to_html(float_format=lambda v: f'{v:.4f}', na_rep='-')


def write_html(out: Path, summary: dict, per_class: pd.DataFrame) -> None:
    """report.html: one self-contained page (plots embedded) with the summary, tables and plots."""
    facts = [('checkpoint', summary['checkpoint']), ('model', summary['model']),
             ('method', f"{summary['method']} {summary['method_cfg'] or ''}"),
             ('images', summary['images']), ('accuracy', f"{summary['accuracy'] * 100:.2f} %"),
             (f"top-{summary['top_k']} accuracy", f"{summary['top_k_accuracy'] * 100:.2f} %"),
             ('macro / weighted F1', f"{summary['macro_f1'] * 100:.2f} % / {summary['weighted_f1'] * 100:.2f} %"),
             ('macro ROC AUC', 'n/a' if summary['macro_auc'] is None else f"{summary['macro_auc']:.4f}"),
             (f'expected calibration error (top-1, {BINS} bins)', f"{summary['ece'] * 100:.2f} %"),
             ('log-loss / Brier score', f"{summary['log_loss']:.4f} / {summary['brier']:.4f}"),
             ('images / s', f"{summary['images_per_s']:.1f}"), ('misclassified', summary['misclassified']),
             ('skipped files', summary['skipped_files'])]
    facts += [(k, f'{v:.4g}') for k, v in summary.get('method_stats', {}).items()]
    facts += [('note', note) for note in summary.get('notes', [])]
    if summary.get('unknown_classes'):
        facts.append(('classes not in the checkpoint (skipped)', ', '.join(summary['unknown_classes'])))
    rows = ''.join(f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>' for k, v in facts)
    skipped = ''.join(f'<li>{html.escape(str(p))}: {html.escape(str(w))}</li>' for p, w in summary.get('skipped', []))
    plots = [('Confusion matrix', 'confusion_matrix.png'), ('Confusion matrix, normalised', 'confusion_matrix_normalized.png'),
             ('ROC curves', 'roc_curves.png'), ('Precision-recall curves', 'pr_curves.png'),
             ('Reliability (calibration of the top-1 confidence)', 'reliability.png'),
             ('Most confident mistakes', 'misclassified.png')]
    extra = [(title, name) for title, name in summary.get('extra_plots', []) if (out / name).exists()]
    figures = ''.join(f'<h2>{html.escape(t)}</h2>{_img(out / n)}' for t, n in plots + extra)
    shown, note = per_class_shown(per_class, len(summary['classes_in_data']))
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Evaluation report</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:14px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3;text-align:left}}</style></head><body>
<h1>Evaluation report</h1><table>{rows}</table>
<h2>Per class</h2><p>{html.escape(note)} {SCALE_NOTE}</p>{per_class_html(shown)}
{f'<h2>Skipped files</h2><ul>{skipped}</ul>' if skipped else ''}{figures}
<p>Files: predictions.csv, per_class_report.csv, confusion_matrix*.csv, summary.json in this folder.</p>
</body></html>"""
    (out / 'report.html').write_text(page, encoding='utf-8', errors='backslashreplace')


def add_plot(out: Path, title: str, name: str) -> None:
    """Show another picture of ``out`` (e.g. token_maps.png) on the report page."""
    summary = json.loads((out / 'summary.json').read_text())
    summary['extra_plots'] = summary.get('extra_plots', []) + [[title, name]]
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    write_html(out, summary, read_report_csv(out / 'per_class_report.csv'))
