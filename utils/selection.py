"""Which epoch's weights become best.pth: the validation metric chosen by ``--eval-metric`` (top-1, macro F1,
or the loss, lower being better), and among the epochs a method accepts first (DGE: those within its compute
budget, see ``models.registry.within_budget``), so a DGE model that beats the others by spending more than its
budget never becomes best.pth while an epoch within the budget exists."""
from typing import Optional, Tuple

EVAL_METRICS = ('top1', 'macro_f1', 'loss')
_STAT = dict(top1='top1', macro_f1='macro_f1', loss='val_loss')


def metric_value(stats: dict, metric: str) -> float:
    return float(stats[_STAT[metric]])


def rank(value: float, metric: str, eligible: bool) -> Tuple[bool, float]:
    """Larger is better: an eligible epoch beats any other, then the metric's ``value`` (the loss negated)."""
    return eligible, -value if metric == 'loss' else value


def describe(value: Optional[float], metric: str) -> str:
    if value is None:
        return f'{metric} n/a'
    return f'val loss {value:.4f}' if metric == 'loss' else f"{'top-1' if metric == 'top1' else 'macro F1'} {value:.2f}%"
