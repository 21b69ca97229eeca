"""Experiment trackers (``--log-to tensorboard mlflow wandb``): what the run folder records, also where the user looks.

The trainer drives every tracker the same way, on process 0 only, through ``Trackers``:
- start: config.yaml's settings as parameters (the trackers' run ids go into the run folder's trackers.json);
- step, every ``--log-interval`` steps: the mean training loss of those steps (process 0's batches) and the lr, at
  the number of optimizer updates (``step/loss``, ``step/lr``);
- epoch: the row of log.csv, at the epoch, under the names of ``tag`` (``train/loss``, ``val/top1``, ...);
- finish: best.pth's epoch and validation metrics (its row of log.csv) as ``best/<column>``, and report/,
  curves.png, log.csv, config.yaml as artifacts;
- close: the run's outcome (FINISHED, FAILED or KILLED, as MLflow names them).
A tracker's package is imported only when a run asks for it; a missing one stops the run before it writes anything,
and so does a tracker that cannot start. One that fails later is one warning and logs no more; the training goes on.
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List

import yaml

from utils.atomic_write import replaced_atomically
from utils.curves import first_line, read_log
from utils.errors import UserError

log = logging.getLogger('train')
VAL_METRICS = ('top1', 'top5', 'macro_f1')
IDS_FILE = 'trackers.json'  # {tracker: its record of this run (e.g. MLflow's run id)}, read back by a resume
ARTIFACTS = ('report', 'curves.png', 'log.csv', 'config.yaml')  # what ``finish`` hands over, when present


def tag(column: str) -> str:
    """A log.csv column's name in the trackers, grouped by split: ``train_loss`` -> ``train/loss``,
    ``val_keep_rate`` -> ``val/keep_rate``, ``top1`` / ``ema_top1`` -> ``val/top1`` / ``val/ema_top1``,
    ``lr`` -> ``train/lr``."""
    split, _, name = column.partition('_')
    if split in ('train', 'val') and name:
        return f'{split}/{name}'
    if column in VAL_METRICS or column.startswith('ema_'):
        return f'val/{column}'
    if column == 'lr':
        return 'train/lr'
    return column


def scalars(row: dict) -> Dict[str, float]:
    """A log.csv row under the trackers' names, without its epoch and without what was not logged (NaN)."""
    return {tag(column): float(value) for column, value in row.items() if column != 'epoch' and math.isfinite(value)}


class Tracker:
    """What the trainer tells a tracker, in this order; an instance is made at the start of a run, when its
    package (imported by ``__init__``) is known to be there."""
    requirements = ''  # the requirements file that installs the package

    def start(self, run_dir: Path, config: dict, record: dict, first_epoch: int, first_update: int) -> dict:
        """Open the tracker's run; ``record`` is what this method returned for the run folder before (empty on a
        new run); returns what a resumed run will need (saved in trackers.json)."""
        return {}

    def log_step(self, update: int, values: Dict[str, float]) -> None:
        pass

    def log_epoch(self, epoch: int, values: Dict[str, float]) -> None:
        pass

    def finish(self, best: Dict[str, float], best_epoch: int, files: List[Path]) -> None:
        pass

    def close(self, outcome: str) -> None:
        pass


class TensorBoard(Tracker):
    """torch's SummaryWriter, into ``log_dir`` (default: the run folder's tb/): the epochs' scalars at the epoch;
    the steps' in tb/steps/ at the update (a file of their own: a resumed run purges what a crashed session wrote
    past its restart point, the epoch or the update after it, on each axis). The settings and the report's place
    are text; the report itself stays in the run folder."""
    requirements = 'requirements-tensorboard.txt'

    def __init__(self, log_dir=None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer_class, self.log_dir = SummaryWriter, log_dir
        self.writers = {}

    def start(self, run_dir, config, record, first_epoch, first_update):
        folder = Path(self.log_dir or Path(run_dir) / 'tb')
        self.writers = dict(epochs=self.writer_class(str(folder), purge_step=first_epoch),
                            steps=self.writer_class(str(folder / 'steps'), purge_step=first_update + 1))
        self.writers['epochs'].add_text('config', indented(yaml.safe_dump(config, sort_keys=False)), first_epoch)
        return {}

    def log_step(self, update, values):
        for name, value in values.items():
            self.writers['steps'].add_scalar(name, value, update)

    def log_epoch(self, epoch, values):
        for name, value in values.items():
            self.writers['epochs'].add_scalar(name, value, epoch)
        for writer in self.writers.values():
            writer.flush()

    def finish(self, best, best_epoch, files):
        for name, value in best.items():
            self.writers['epochs'].add_scalar(name, value, best_epoch)
        self.writers['epochs'].add_text('files', indented('\n'.join(str(f.resolve()) for f in files)), best_epoch)

    def close(self, outcome):
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def indented(text: str) -> str:
    """``text`` as a Markdown code block (TensorBoard's text panel shows it as it is)."""
    return '\n'.join('    ' + line for line in text.splitlines())


def flat(config: dict, prefix: str = '') -> Dict[str, str]:
    """Nested settings as ``{'section.key': 'value'}`` (MLflow's parameters are flat strings)."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat(value, f'{prefix}{key}.'))
        else:
            params[f'{prefix}{key}'] = str(value)
    return params


class MLflow(Tracker):
    """Into the store at ``uri`` (--mlflow-uri), else MLFLOW_TRACKING_URI, else MLflow's default (from MLflow 3.7
    sqlite:///mlflow.db in the current folder, what ``mlflow ui`` started there shows), in the experiment of
    MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID, else Default; the MLflow run is named after the run folder. A
    resumed run continues its MLflow run (a new one when the store does not have it); its parameters keep their
    first values (MLflow refuses a change) and new ones are added."""
    requirements = 'requirements-mlflow.txt'

    def __init__(self, uri=None):
        import mlflow
        self.mlflow, self.uri, self.run_id = mlflow, uri, None

    def start(self, run_dir, config, record, first_epoch, first_update):
        mlflow = self.mlflow
        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        run = None
        if record.get('run_id'):
            try:
                run = mlflow.start_run(run_id=record['run_id'])
            except mlflow.exceptions.MlflowException as err:
                log.warning(f"MLflow run {record['run_id']} not continued ({first_line(err)}): logging into a new one")
        run = run or mlflow.start_run(run_name=Path(run_dir).name)
        self.run_id = run.info.run_id
        known = run.data.params
        mlflow.log_params({k: v for k, v in flat(config).items() if k not in known}, run_id=self.run_id)
        log.info(f'MLflow: run {self.run_id} in {mlflow.get_tracking_uri()} (experiment {run.info.experiment_id})')
        return dict(run_id=self.run_id, tracking_uri=mlflow.get_tracking_uri())

    def log_step(self, update, values):
        self.mlflow.log_metrics(values, step=update, run_id=self.run_id)

    def log_epoch(self, epoch, values):
        self.mlflow.log_metrics(values, step=epoch, run_id=self.run_id)

    def finish(self, best, best_epoch, files):
        self.mlflow.log_metrics(best, step=best_epoch, run_id=self.run_id)
        for path in files:
            if path.is_dir():
                self.mlflow.log_artifacts(str(path), artifact_path=path.name, run_id=self.run_id)
            else:
                self.mlflow.log_artifact(str(path), run_id=self.run_id)

    def close(self, outcome):
        if self.run_id is not None:
            self.mlflow.end_run(status=outcome)
            self.run_id = None


class WandB(Tracker):
    """Into the W&B project ``project`` (--wandb-project), else WANDB_PROJECT, else W&B's default; the run is named
    after the run folder, its files go under WANDB_DIR, else the run folder (wandb/). Offline (``wandb sync`` uploads
    it later) when WANDB_MODE is not set and W&B finds no login (WANDB_API_KEY, its settings, ~/.netrc; never a
    prompt). Epoch scalars are plotted against ``epoch``, step scalars against ``update``; best.pth's row is the
    summary; the files are one artifact of type ``report``. A resumed run continues its W&B run id."""
    requirements = 'requirements-wandb.txt'

    def __init__(self, project=None):
        import wandb
        self.wandb, self.project, self.run, self.defined = wandb, project, None, set()

    def start(self, run_dir, config, record, first_epoch, first_update):
        wandb = self.wandb
        mode = None if os.environ.get('WANDB_MODE') or wandb.login(verify=False, prompt=False) else 'offline'
        self.run = wandb.init(project=self.project, name=Path(run_dir).name, config=config, allow_val_change=True,
                              id=record.get('id'), resume='allow' if record.get('id') else None, mode=mode,
                              dir=None if os.environ.get('WANDB_DIR') else str(run_dir))
        log.info(f'W&B: run {self.run.id} ({self.run.settings.mode}) in {self.run.dir}')
        return dict(id=self.run.id)

    def _log(self, values: dict, axis: str, at: int) -> None:
        """``values`` plotted against the scalar ``axis`` (``epoch`` or ``update``), there at ``at``."""
        for name in set(values) - self.defined:
            self.run.define_metric(name, step_metric=axis)
            self.defined.add(name)
        self.run.log({**values, axis: at})

    def log_step(self, update, values):
        self._log(values, 'update', update)

    def log_epoch(self, epoch, values):
        self._log(values, 'epoch', epoch)

    def finish(self, best, best_epoch, files):
        self.run.summary.update(best)
        artifact = self.wandb.Artifact(f'report-{self.run.id}', type='report')
        for path in files:
            (artifact.add_dir(str(path), name=path.name) if path.is_dir() else artifact.add_file(str(path)))
        self.run.log_artifact(artifact)

    def close(self, outcome):
        if self.run is not None:
            self.run.finish(exit_code=0 if outcome == 'FINISHED' else 1)
            self.run = None


TRACKERS = dict(tensorboard=TensorBoard, mlflow=MLflow, wandb=WandB)


class Trackers:
    """The trackers a run asked for (``--log-to``, ``--log-tensorboard``), alive on process 0 only; every call is
    a no-op elsewhere and without any."""

    def __init__(self, trackers: Dict[str, Tracker]):
        self.trackers = trackers

    @classmethod
    def from_args(cls, args, is_main: bool) -> 'Trackers':
        """Import each tracker's package on every process, so that a missing one stops them all at once."""
        names = list(dict.fromkeys(list(args.log_to or []) + (['tensorboard'] if args.log_tensorboard else [])))
        settings = dict(tensorboard=args.log_tensorboard if args.log_tensorboard is not True else None,
                        mlflow=args.mlflow_uri, wandb=args.wandb_project)
        made = {}
        for name in names:
            try:
                made[name] = TRACKERS[name](settings[name])
            except ImportError as err:
                raise UserError(f'logging to {name} needs its package, which does not import ({first_line(err)}): '
                                f'pip install -r {TRACKERS[name].requirements} (or log without {name})') from None
        return cls(made if is_main else {})

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, run_dir, first_epoch: int, first_update: int) -> None:
        """Open each tracker's run at the run's first epoch and update; one that cannot is a ``UserError``."""
        if not self.trackers:
            return
        run_dir = Path(run_dir)
        config = yaml.safe_load((run_dir / 'config.yaml').read_text())
        records = read_records(run_dir / IDS_FILE)
        for name, tracker in self.trackers.items():
            try:
                records[name] = tracker.start(run_dir, config, records.get(name, {}), first_epoch, first_update)
            except Exception as err:  # noqa: BLE001 (a tracker's own errors: its store, its login, its settings)
                raise UserError(f'{name} could not start: {first_line(err)}; fix its settings or log without '
                                f'{name}') from None
        with replaced_atomically(run_dir / IDS_FILE, 'w') as f:
            json.dump(records, f, indent=2)

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 (a tracker must not stop a training)
                log.warning(f'{name} logs no more: {method} failed with {first_line(err)}')
                del self.trackers[name]
                self._close(tracker, 'FAILED')

    def log_step(self, update: int, values: Dict[str, float]) -> None:
        self._each('log_step', update, {f'step/{name}': value for name, value in values.items()})

    def log_epoch(self, row: dict) -> None:
        self._each('log_epoch', int(row['epoch']), scalars(row))

    def finish(self, run_dir, best_epoch: int) -> None:
        """best.pth's epoch and validation metrics (from log.csv's row of ``best_epoch``) and the run's files that
        exist."""
        if not self.trackers:
            return
        run_dir = Path(run_dir)
        self._each('finish', best_metrics(run_dir / 'log.csv', best_epoch), best_epoch,
                   [run_dir / name for name in ARTIFACTS if (run_dir / name).exists()])

    def close(self, outcome: str) -> None:
        """End every tracker's run with ``outcome``: FINISHED, FAILED or KILLED."""
        for tracker in self.trackers.values():
            self._close(tracker, outcome)
        self.trackers = {}

    @staticmethod
    def _close(tracker: Tracker, outcome: str) -> None:
        try:
            tracker.close(outcome)
        except Exception as err:  # noqa: BLE001
            log.warning(f'{type(tracker).__name__} did not close cleanly: {first_line(err)}')


def best_metrics(log_csv: Path, best_epoch: int) -> Dict[str, float]:
    """``best/epoch`` and the validation columns of log.csv's row of ``best_epoch`` as ``best/<column>``; empty
    (with a warning) when log.csv has no such row or cannot be read."""
    try:
        values = read_log(log_csv)
        at = values['epoch'].index(best_epoch)
    except (OSError, ValueError, KeyError) as err:
        log.warning(f'no best/ metrics for the trackers: epoch {best_epoch} not read from {log_csv} '
                    f'({first_line(err)})')
        return {}
    return {f'best/{c}': v[at] for c, v in values.items()
            if (c == 'epoch' or tag(c).startswith('val/')) and math.isfinite(v[at])}


def read_records(path: Path) -> dict:
    """trackers.json of a run folder; empty when there is none (a new run) or it is unreadable."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}
