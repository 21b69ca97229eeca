"""Side-by-side cost (and optionally accuracy) of token-reduction methods on one backbone.

Each row is one method with one setting. A setting that a built model can change at run time
(``configure``) is applied to the same model; otherwise the model is rebuilt. Rows are measured the same
way for every method; a new method joins through the registry with no change here.
"""
import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
import torch

from models.factory import build_model
from models.registry import available_methods, check_setting_types, method_cfg, method_stats
from utils.errors import UserError
from utils.profiling import count_macs, peak_memory_mib, reset_peak_memory, time_forward

Setting = Tuple[str, Dict[str, object]]  # (method, cfg changes)
# every name benchmark.py writes into its --output-dir: a folder of only these is an earlier output it may replace
OUTPUT_FILES = ('benchmark.csv', 'benchmark.md', 'pareto.png', 'token_maps.png', 'token_maps')


def parse_sweep(items: List[str], methods: List[str]) -> List[Setting]:
    """``['tome.r=8,13', 'gtp.num_prop=4']`` and the plain ``methods`` -> one (method, changes) per row.

    Dense always comes first (the reference of every ratio); a method named only in ``methods`` gets one row
    with its defaults.
    """
    settings: List[Setting] = [('none', {})]
    swept = set()
    for item in items or []:
        key, sep, values = item.partition('=')
        method, dot, name = key.partition('.')
        if not (sep and dot and values):
            raise UserError(f"--sweep '{item}' is not METHOD.KEY=V1,V2 (e.g. tome.r=4,8,13)")
        if method not in available_methods():
            raise UserError(f"--sweep '{item}': unknown method '{method}'; available: {', '.join(available_methods())}")
        swept.add(method)
        for value in values.split(','):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            check_setting_types(method, {name: parsed})
            settings.append((method, {name: parsed}))
    for method in methods or []:
        if method not in available_methods():
            raise UserError(f"unknown method '{method}'; available: {', '.join(available_methods())}")
        if method != 'none' and method not in swept:
            settings.append((method, {}))
    return settings


@dataclass
class BenchConfig:
    model: str
    img_size: int
    batch_size: int = 64
    device: torch.device = torch.device('cpu')
    amp_dtype: Optional[torch.dtype] = None
    runs: int = 10
    warmup: int = 3
    mac_images: int = 2
    train: bool = False
    num_classes: int = 1000
    model_kwargs: dict = field(default_factory=dict)
    runtimes: Sequence[str] = ('torch',)  # 'onnxruntime' adds each row's images/s as an exported ONNX graph
    compile: object = False  # time each row's model under torch.compile (a --compile value: True or a backend)


class ModelSource:
    """Builds each method's model once (random weights, or a checkpoint's) and applies run-time changes."""

    def __init__(self, cfg: BenchConfig, checkpoint: Optional[dict] = None, source: str = 'checkpoint'):
        self.cfg, self.checkpoint, self.source, self.cache, self.initial = cfg, checkpoint, source, {}, {}

    def _build(self, method: str, changes: dict):
        if self.checkpoint is not None:
            from models.factory import model_from_checkpoint
            return model_from_checkpoint(self.checkpoint, self.source, method, changes)
        return build_model(self.cfg.model, method, changes, num_classes=self.cfg.num_classes,
                           img_size=self.cfg.img_size, **self.cfg.model_kwargs)

    def get(self, method: str, changes: dict):
        """The method's model with its default settings and ``changes`` (other rows' changes undone)."""
        if method not in self.cache:
            self.cache[method] = self._build(method, {})
            self.initial[method] = method_cfg(self.cache[method])
        model = self.cache[method]
        if method != 'none':
            try:
                model.configure(**{**self.initial[method], **changes})
            except ValueError:  # a build-time setting: a model of its own
                model = self._build(method, changes)
        return model.to(self.cfg.device)


def input_images(cfg: BenchConfig, files: Optional[Sequence[str]] = None,
                 data_config: Optional[dict] = None) -> torch.Tensor:
    """The images every row is measured on: random ones, or images ``files`` spread over the list, with the
    model's eval transform (so that input-dependent methods such as DGE route as they do on the user's data);
    a file that fails to decode is skipped with a warning."""
    count = max(cfg.batch_size, cfg.mac_images)
    if not files:
        return torch.randn(count, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    from datasets.images import try_load_rgb
    from datasets.transforms import eval_transform
    picked = [files[round(i * (len(files) - 1) / max(count - 1, 1))] for i in range(min(count, len(files)))]
    images = [img for img in map(try_load_rgb, picked) if img is not None]  # a file that fails is skipped
    if not images:
        raise UserError(f'none of the {len(picked)} images picked from --data-root could be decoded')
    transform = eval_transform(data_config)
    return torch.stack([transform(img) for img in images])


def timed_model(model, cfg: BenchConfig):
    """The model the timings run: with ``cfg.compile``, compiled afresh for the row (dynamo's caches cleared, so
    that a sweep's settings never reach its recompile limit and fall back to eager); the warm-up runs compile it."""
    if not cfg.compile:
        return model
    from utils.cli_args import compile_backend
    torch._dynamo.reset()
    return torch.compile(model, backend=compile_backend(cfg.compile))


def measure_row(model, cfg: BenchConfig, images: torch.Tensor) -> dict:
    """Parameters, GMACs (over the first ``cfg.mac_images`` images), images/s at the batch size, batch-1 latency,
    peak memory of one model."""
    device = cfg.device
    macs, skipped = count_macs(model, images[:cfg.mac_images].to(device))
    batch = images[torch.arange(cfg.batch_size) % len(images)].to(device)
    timed = timed_model(model, cfg)
    reset_peak_memory(device)
    images_per_s = time_forward(timed, batch, cfg.runs, cfg.warmup, cfg.amp_dtype, cfg.train)
    memory = peak_memory_mib(device)
    latency_ms = 1000 / time_forward(timed, batch[:1], cfg.runs, cfg.warmup, cfg.amp_dtype, cfg.train)
    model.eval()
    return dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6, gmacs=macs / 1e9,
                images_per_s=images_per_s, latency_ms=latency_ms, peak_mem_mib=memory,
                unprofiled_ops=' '.join(skipped))


def run_rows(settings: List[Setting], source: ModelSource, cfg: BenchConfig, images: torch.Tensor,
             evaluate=None, token_image: Optional[str] = None, out_dir: Optional[Path] = None) -> pd.DataFrame:
    """One measured row per setting, with ratios against the dense first row (and its token map of
    ``token_image`` under ``out_dir``/token_maps/)."""
    rows = []
    for index, (method, changes) in enumerate(settings):
        model = source.get(method, changes)
        shown = {**method_cfg(model), **changes}  # run-time controls (e.g. a forced grain) are shown too
        row = dict(method=method, settings=', '.join(f'{k}={v}' for k, v in shown.items()) or 'dense')
        row.update(measure_row(model, cfg, images))
        if 'onnxruntime' in cfg.runtimes:
            from utils.export import onnxruntime_images_per_second
            batch = images[torch.arange(cfg.batch_size) % len(images)]
            row['ort_images_per_s'] = onnxruntime_images_per_second(model, batch, cfg.runs, cfg.warmup)
        if evaluate is not None:
            row.update(evaluate(model))
        row.update({f'stat_{k}': v for k, v in method_stats(model).items()})
        if token_image:
            from datasets.transforms import data_config
            from utils.token_maps import write_token_maps
            write_token_maps(model, [token_image], data_config(model, cfg.img_size),
                             out_dir / 'token_maps' / f'{index:02d}-{method}', 1)
        rows.append(row)
        print(f"  {method:6s} {row['settings'][:60]:60s} {row['gmacs']:.3f} GMACs {row['images_per_s']:.1f} img/s")
    table = pd.DataFrame(rows)
    dense = table.iloc[0]
    table.insert(4, 'mac_ratio', table['gmacs'] / dense['gmacs'])
    table.insert(6, 'speedup', table['images_per_s'] / dense['images_per_s'])
    # efficiency: the speed-up got per speed-up the MACs promise (1.0 = time falls exactly with MACs)
    table.insert(7, 'efficiency', table['speedup'] * table['mac_ratio'])
    if 'ort_images_per_s' in table:
        table.insert(table.columns.get_loc('ort_images_per_s') + 1, 'ort_speedup',
                     table['ort_images_per_s'] / dense['ort_images_per_s'])
    return table


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub markdown table, numbers to 3 significant digits."""
    def cell(v):
        return f'{v:.3g}' if isinstance(v, float) else str(v)
    lines = ['| ' + ' | '.join(table.columns) + ' |', '|' + '---|' * len(table.columns)]
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in table.itertuples(index=False)]
    return '\n'.join(lines)


def write_outputs(table: pd.DataFrame, header: str, out_dir: Path, accuracy_column: Optional[str]) -> None:
    """benchmark.csv, benchmark.md (header + table) and pareto.png into ``out_dir``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / 'benchmark.csv', index=False)
    shown = table.drop(columns=[c for c in table.columns if c == 'unprofiled_ops' and not table[c].any()])
    (out_dir / 'benchmark.md').write_text(f'{header}\n\n{markdown_table(shown)}\n')
    y = accuracy_column or 'images_per_s'
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, group in table.groupby('method', sort=False):
        ax.plot(group['gmacs'], group[y], 'o-' if len(group) > 1 else 'o', label=method,
                markersize=12 if method == 'none' else 7, zorder=3 if method == 'none' else 2)
        for _, r in group.iterrows():
            ax.annotate(r['settings'][:18], (r['gmacs'], r[y]), fontsize=7, xytext=(3, 3), textcoords='offset points')
    ax.set_xlabel('GMACs per image')
    ax.set_ylabel({'images_per_s': 'images / s'}.get(y, y))
    ax.set_title(header.splitlines()[0][:90], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / 'pareto.png', dpi=120)
    plt.close(fig)


def stack_token_maps(out_dir: Path) -> Optional[Path]:
    """token_maps.png: every row's token map of the same image, one under the other."""
    from PIL import Image
    parts = [Image.open(p).convert('RGB') for p in sorted((out_dir / 'token_maps').glob('*/token_maps.png'))]
    if not parts:
        return None
    sheet = Image.new('RGB', (max(p.width for p in parts), sum(p.height for p in parts)), 'white')
    top = 0
    for part in parts:
        sheet.paste(part, (0, top))
        top += part.height
    sheet.save(out_dir / 'token_maps.png')
    return out_dir / 'token_maps.png'
