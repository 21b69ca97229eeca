"""curves.png: a run's training curves, drawn from its log.csv (so a resumed run shows its whole history).

One panel per group of columns: loss, accuracy, macro F1, learning rate, then one per statistic a method
logs (every ``train_*`` / ``val_*`` column that is not a standard one, e.g. ``keep_rate``, ``compute_ratio``),
its train and val values together. Columns absent from the log (EMA, macro F1) give no panel or line.
Each panel's y axis names its unit: accuracy and macro F1 are in % (as log.csv holds them, and as report.html
shows them). log.csv's ``top5`` column is top-k accuracy with k = min(5, classes): its line is labelled with the
real k, read from the run folder's class_indices.json.
``update_curves`` is what the trainer calls after each epoch.
"""
import csv
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.atomic_write import replaced_atomically

log = logging.getLogger('train')

PANELS = (('Loss', (('train_loss', 'train'), ('val_loss', 'val'))),  # (title, ((column, label), ...))
          ('Accuracy (%)', (('top1', 'top-1'), ('top5', 'top-k'), ('ema_top1', 'EMA top-1'))),
          ('Macro F1 (%)', (('macro_f1', 'macro F1'), ('ema_macro_f1', 'EMA macro F1'))),
          ('Learning rate', (('lr', ''),)))  # an empty label: no legend
Y_LABELS = {'Loss': 'loss', 'Accuracy (%)': 'accuracy (%)', 'Macro F1 (%)': 'macro F1 (%)',
            'Learning rate': 'learning rate'}
NOT_STATS = {'train_loss', 'val_loss', 'train_images_per_s'}  # train_/val_ columns that are no method statistic
COLUMNS_PER_ROW = 3


def read_log(path) -> Dict[str, List[float]]:
    """log.csv as {column: values}; a cell left empty (a column added at a resume) is NaN."""
    with Path(path).open(newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return {c: [float(r[c]) if r.get(c) not in (None, '') else math.nan for r in rows] for c in reader.fieldnames or ()}


def read_num_classes(run_dir) -> Optional[int]:
    """The number of classes of a run, from its class_indices.json; None when the file is missing or unreadable."""
    try:
        classes = json.loads((Path(run_dir) / 'class_indices.json').read_text())
    except (OSError, ValueError):
        return None
    return len(classes) if isinstance(classes, (dict, list)) and classes else None


def top_k_label(num_classes: Optional[int]) -> str:
    """The label of log.csv's ``top5`` column: top-k accuracy with k = min(5, classes), as the evaluation takes it."""
    return f'top-{min(5, num_classes)}' if num_classes else 'top-k (k = min(5, classes))'


def y_label(title: str) -> str:
    """The y-axis label (with its unit) of a panel; a method statistic's unit is guessed from its name."""
    if title in Y_LABELS:
        return Y_LABELS[title]
    if 'tokens' in title:
        return 'tokens'
    if 'band' in title:
        return 'pixels'
    if any(word in title for word in ('rate', 'ratio', 'share')):
        return 'ratio (0-1)'
    return title


def panels(columns, num_classes: Optional[int] = None) -> List[tuple]:
    """[(title, [(column, label)])] of the panels that ``columns`` fill; ``num_classes`` gives the k of top-k."""
    found = [(title, [(c, top_k_label(num_classes) if c == 'top5' else label) for c, label in lines if c in columns])
             for title, lines in PANELS]
    stats = {}
    for c in columns:
        split, _, name = c.partition('_')
        if split in ('train', 'val') and name and c not in NOT_STATS:
            stats.setdefault(name, []).append((c, split))
    found += [(name.replace('_', ' '), lines) for name, lines in stats.items()]
    return [(title, lines) for title, lines in found if lines]


def draw_curves(values: Dict[str, List[float]], num_classes: Optional[int] = None) -> Figure:
    """The figure of the columns of a log (``read_log``); ``num_classes`` gives the k of the top-k line."""
    shown = panels(values, num_classes)
    epochs = values.get('epoch', [])
    cols = min(COLUMNS_PER_ROW, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / cols))
    width, height = 4.2 * cols, 3 * rows
    fig = Figure(figsize=(width, height))  # margins in inches, set by hand: a layout engine doubles the time
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.3 / height,
                        wspace=0.3, hspace=0.45)
    FigureCanvasAgg(fig)
    marker = 'o' if len(epochs) <= 30 else None  # a single epoch still shows as a point
    for i, (title, lines) in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        for column, label in lines:
            ax.plot(epochs, values[column], marker=marker, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('epoch', fontsize=8)
        ax.set_ylabel(y_label(title), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if any(label for _, label in lines):
            ax.legend(fontsize=7)
    return fig


def plot_curves(values: Dict[str, List[float]], out_png, num_classes: Optional[int] = None) -> List[str]:
    """Draw the columns of a log (``read_log``) into ``out_png`` (a temporary file, then renamed); returns the
    panel titles."""
    fig = draw_curves(values, num_classes)
    with replaced_atomically(out_png) as f:
        fig.savefig(f, format='png', dpi=90)
    return [ax.get_title() for ax in fig.axes]


def first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def update_curves(run_dir) -> None:
    """Redraw the run folder's curves.png from its log.csv (on the main process, after each epoch). A failure to
    read or draw is one warning, never the end of the training."""
    run_dir = Path(run_dir)
    try:
        values = read_log(run_dir / 'log.csv')
    except (OSError, ValueError) as err:
        log.warning(f'curves not updated, log.csv unreadable: {first_line(err)}')
        return
    try:
        plot_curves(values, run_dir / 'curves.png', read_num_classes(run_dir))
    except Exception as err:  # noqa: BLE001 (a plot must not stop a training)
        log.warning(f'curves.png not redrawn: {first_line(err)}')


def add_curves_to_report(run_dir, report_dir) -> None:
    """Copy curves.png into the run's report folder and show it there under "Training curves"."""
    from utils.report import add_plot
    source = Path(run_dir) / 'curves.png'
    if source.exists():
        shutil.copyfile(source, Path(report_dir) / 'curves.png')
        add_plot(Path(report_dir), 'Training curves', 'curves.png')
