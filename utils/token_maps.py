"""Token maps: what a method did to the tokens, drawn on the user's own images.

Methods record their provenance per block (``models.provenance``) only inside ``models.registry.record_tokens``,
so it costs nothing otherwise. Owner maps (ToMe, GTP, MTViT, ToE) paint each group of patches that one token
stands for in the group's mean colour with borders between groups; patches removed (GTP) or dropped (MTViT, ToE) are dimmed,
tinted with the colour of the token that took them in, if any; ToE's seed tokens carry a cyan dot, so the
tokens kept without one are its expansions. Grain maps (DGE) lay green / yellow / red over
the regions that got fine / medium / coarse queries. A dense model gets a note that no token is reduced.
"""
import textwrap
from pathlib import Path
from typing import List, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
matplotlib.rcParams['text.parse_math'] = False  # file names with '$' are text, not maths
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from datasets.images import try_load_rgb  # noqa: E402
from datasets.transforms import eval_transform  # noqa: E402
from models.registry import method_cfg, method_name, record_tokens, unwrap  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.report import layout_under_title, plot_text  # noqa: E402

PANEL_INCHES = 2.6  # the side of one picture of token_maps.png
TITLE_SIZE = 9  # points
GRAIN_COLOURS = np.array([[0.1, 0.8, 0.2], [1.0, 0.85, 0.1], [0.9, 0.15, 0.1]])  # fine, medium, coarse
SEED_COLOUR = np.array([0.0, 0.9, 1.0])


def owner_map(image: np.ndarray, owner: np.ndarray, removed: np.ndarray, grid, seed=None) -> np.ndarray:
    """Paint patch groups in their mean colour with borders; dim removed patches; dot the ``seed`` patches."""
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    patches = image[:h * ph, :w * pw].reshape(h, ph, w, pw, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, ph * pw, 3)
    means = patches.mean(axis=1)
    colour = np.zeros((h * w, 3))
    for group in np.unique(owner[owner >= 0]):
        members = owner == group
        colour[members] = means[members].mean(axis=0)
    colour[removed] = 0.25 * colour[removed] + 0.1
    out = np.repeat(np.repeat(colour.reshape(h, w, 3), ph, axis=0), pw, axis=1)
    labels = np.repeat(np.repeat(owner.reshape(h, w), ph, axis=0), pw, axis=1)
    edges = np.zeros(labels.shape, dtype=bool)
    edges[1:] |= labels[1:] != labels[:-1]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    out[edges] = 1.0
    if seed is not None:
        dots = np.zeros((h, ph, w, pw), dtype=bool)
        dots[:, ph // 3: ph - ph // 3, :, pw // 3: pw - pw // 3] = True
        out[(dots & seed.reshape(h, 1, w, 1)).reshape(h * ph, w * pw)] = SEED_COLOUR
    return out


def grain_map(image: np.ndarray, grain: np.ndarray, splits: Sequence[int], grid) -> np.ndarray:
    """Overlay fine / medium / coarse colours on the image by the split each patch's region got."""
    h, w = grid
    rank = {s: min(i, 2) if len(splits) <= 3 else round(2 * i / (len(splits) - 1))
            for i, s in enumerate(sorted(splits, reverse=True))}
    colour = GRAIN_COLOURS[[rank[int(g)] for g in grain]].reshape(h, w, 3)
    overlay = np.repeat(np.repeat(colour, image.shape[0] // h, axis=0), image.shape[1] // w, axis=1)
    return 0.55 * image[:overlay.shape[0], :overlay.shape[1]] + 0.45 * overlay


def describe(entry: dict, patches: int) -> str:
    if 'grain' in entry:
        values, counts = np.unique(entry['grain'], return_counts=True)
        return f"block {entry['block'] + 1}: " + ', '.join(f'{int(v)}x{int(v)}: {c}' for v, c in zip(values, counts))
    owner, removed = entry['owner'], entry.get('removed')
    tokens = len(np.unique(owner[owner >= 0]))
    gone = int(removed.sum()) if removed is not None else 0
    seeds = f" ({int(entry['seed'].sum())} seeds)" if 'seed' in entry else ''
    return f"block {entry['block'] + 1}: {tokens} tokens{seeds}" + (f', {gone} patches removed' if gone else '')


def pick(records: List[dict], count: int = 3) -> List[dict]:
    """The first, middle and last recorded blocks (or all of them when fewer)."""
    if len(records) <= count:
        return records
    return [records[round(i * (len(records) - 1) / (count - 1))] for i in range(count)]


def write_token_maps(model, files: Sequence[str], data_config: dict, out_dir, n: int = 16) -> Path:
    """token_maps.png (a row per image: the image, then its map at a few depths) and token_maps/<image>.png.

    Files that fail to decode are skipped with a warning."""
    out_dir = Path(out_dir)
    loaded = [(f, try_load_rgb(f)) for f in list(files)[:n]]
    files, images = [f for f, img in loaded if img is not None], [img for _, img in loaded if img is not None]
    if not files:
        raise UserError(f"token maps: none of the {len(loaded)} images could be decoded (truncated or corrupt files)")
    (out_dir / 'token_maps').mkdir(parents=True, exist_ok=True)
    transform = eval_transform(data_config)
    device = next(unwrap(model).parameters()).device
    batch = torch.stack([transform(img) for img in images]).to(device)
    records = pick(record_tokens(model, batch))
    mean, std = np.array(data_config['mean']), np.array(data_config['std'])
    shown = np.clip(batch.permute(0, 2, 3, 1).cpu().numpy() * std + mean, 0, 1)
    patch = unwrap(model).patch_embed.patch_size
    grid = (batch.shape[-2] // patch[0], batch.shape[-1] // patch[1])
    splits = method_cfg(model).get('splits', ()) if records and 'grain' in records[0] else ()
    rows = []
    for row, path in enumerate(files):
        panels = [(shown[row], plot_text(Path(path).name[:28]))]
        for entry in records:
            view = {k: v[row].numpy() if torch.is_tensor(v) else v for k, v in entry.items()}
            picture = grain_map(shown[row], view['grain'], splits, grid) if 'grain' in view else owner_map(
                shown[row], view['owner'], view.get('removed', np.zeros_like(view['owner'], dtype=bool)), grid,
                view.get('seed'))
            panels.append((picture, describe(view, grid[0] * grid[1])))
        if not records:
            panels.append((np.ones_like(shown[row]), f'{method_name(model)}: no token is reduced'))
        rows.append(panels)
        single, single_axes = plt.subplots(1, len(panels), figsize=(PANEL_INCHES * len(panels), 2.8), squeeze=False)
        for ax, (picture, title) in zip(single_axes[0], panels):
            ax.imshow(picture)
            ax.set_title(title, fontsize=7)
            ax.axis('off')
        single.tight_layout()
        single.savefig(out_dir / 'token_maps' / f'{row:03d}_{Path(path).stem}.png', dpi=100)
        plt.close(single)
    legend = ' (green: fine, yellow: medium, red: coarse queries)' if splits else ''
    if records and 'seed' in records[0]:
        legend = ' (cyan dot: seed token; kept without a dot: expanded; dimmed: merged away)'
    title = f'Token maps: {method_name(model)} {method_cfg(model) if records else ""}{legend}'
    draw_overview(rows, title).savefig(out_dir / 'token_maps.png', dpi=100)
    return out_dir / 'token_maps.png'


def draw_overview(rows: List[List[Tuple[np.ndarray, str]]], title: str) -> Figure:
    """token_maps.png's figure: a row of (picture, title) panels per image under ``title``, wrapped to the
    figure's width, in room kept for all its lines (MTViT's settings take two or three) above the first row's
    titles, whatever the number of rows."""
    columns = max(len(panels) for panels in rows)
    width, height = PANEL_INCHES * columns, PANEL_INCHES * len(rows)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for ax_row, panels in zip(axes, rows):
        for ax in ax_row:
            ax.axis('off')
        for ax, (picture, panel_title) in zip(ax_row, panels):
            ax.imshow(picture)
            ax.set_title(panel_title, fontsize=7)
    layout_under_title(fig, textwrap.fill(title, width=int(12 * width)), TITLE_SIZE)  # ~12 characters per inch
    return fig
