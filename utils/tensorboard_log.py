"""``--log-tensorboard``: each epoch's row of log.csv as TensorBoard scalars (step = epoch), via torch's SummaryWriter.

Tags group by split: ``train_loss`` -> ``train/loss``, ``val_keep_rate`` -> ``val/keep_rate``, the validation
metrics ``top1``, ``top5``, ``macro_f1``, ``ema_*`` -> ``val/...``, ``lr`` -> ``train/lr``. A resumed run writes into
the same folder from its first new epoch on (events a crashed session left at later steps are purged).
"""
import math
from pathlib import Path

from utils.errors import UserError

REQUIREMENTS = 'requirements-tensorboard.txt'
VAL_METRICS = ('top1', 'top5', 'macro_f1')


def summary_writer_class():
    """torch's SummaryWriter; a UserError saying how to install tensorboard when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f'--log-tensorboard needs the tensorboard package, which is not installed: '
                        f'pip install -r {REQUIREMENTS} (or drop --log-tensorboard)') from None
    return SummaryWriter


def tag(column: str) -> str:
    split, _, name = column.partition('_')
    if split in ('train', 'val') and name:
        return f'{split}/{name}'
    if column in VAL_METRICS or column.startswith('ema_'):
        return f'val/{column}'
    if column == 'lr':
        return 'train/lr'
    return column


class ScalarLog:
    """Scalars of epochs into the TensorBoard folder ``log_dir`` (created at the first epoch written)."""

    def __init__(self, log_dir):
        self.writer_class = summary_writer_class()
        self.log_dir = Path(log_dir)
        self.writer = None

    def write(self, row: dict) -> None:
        """One epoch: ``row`` maps log.csv's columns to numbers (NaN: not logged); flushed to disk."""
        epoch = int(row['epoch'])
        if self.writer is None:
            self.writer = self.writer_class(str(self.log_dir), purge_step=epoch)
        for column, value in row.items():
            if column != 'epoch' and not math.isnan(value):
                self.writer.add_scalar(tag(column), value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
