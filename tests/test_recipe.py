"""The training recipe: transforms without hidden parts, lr by the global batch, EMA warm-up, the metric that
chooses best.pth (DGE within its budget), macro F1 as scikit-learn computes it."""
import argparse
import csv

import pytest
import torch
import yaml
from torchvision import transforms as T

import train_gpu
from conftest import TINY, TINY_FLAGS, make_image_folder
from datasets.transforms import Augmentation, train_transform

CFG = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)


def _kinds(transform):
    return [type(t).__name__ for t in transform.transforms]


def _aug(tmp_path, *flags):
    """The augmentation train_gpu.py builds from ``flags``."""
    return Augmentation.from_args(train_gpu.parse_args(['--data-root', str(tmp_path), *flags]))


def test_no_colour_jitter_unless_asked(tmp_path):
    assert 'ColorJitter' not in _kinds(train_transform(CFG, _aug(tmp_path)))
    asked = train_transform(CFG, _aug(tmp_path, '--color-jitter', '0.3', '--aa', 'rand-m9-mstd0.5-inc1'))  # + RandAugment
    jitter = next(t for t in asked.transforms if isinstance(t, T.ColorJitter))
    assert jitter.brightness == pytest.approx((0.7, 1.3))
    assert 'RandAugment' in _kinds(asked)


def test_crop_ratio_and_interpolation_reach_the_crop(tmp_path):
    aug = _aug(tmp_path, '--scale', '0.5', '1', '--ratio', '1', '1', '--train-interpolation', 'bilinear')
    crop = train_transform(CFG, aug).transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.ratio == (1.0, 1.0)
    assert 'bilinear' in repr(crop)


def _args(**given):
    defaults = dict(lr=None, lr_base=None, lr_base_size=512, lr_base_scale='linear', pretrained=None, batch_size=32,
                    accum_steps=1)
    return argparse.Namespace(**{**defaults, **given})


def test_lr_follows_the_global_batch():
    from utils.optim import LR_BASE, resolve_lr
    lr = resolve_lr(_args(lr_base=1e-3, accum_steps=2), world_size=4)  # 32 x 4 processes x 2 steps = 256
    assert lr.global_batch == 256 and lr.value == pytest.approx(1e-3 * 256 / 512)
    assert resolve_lr(_args(lr=3e-4, lr_base=1e-3), 4).value == 3e-4  # --lr is absolute
    assert resolve_lr(_args(), 1).value == resolve_lr(_args(pretrained=True), 1).value == pytest.approx(LR_BASE * 32 / 512)
    assert '--lr-base 0.001 x global batch 256 / 512' in str(resolve_lr(_args(lr_base=1e-3, accum_steps=2), 4))


def test_warmup_is_30_percent_of_the_run_at_most_5():
    from utils.errors import UserError
    from utils.schedule import warmup_epochs
    assert [warmup_epochs(argparse.Namespace(warmup_epochs=None, epochs=e)) for e in (2, 8, 10, 30, 300)] == \
        pytest.approx([0.6, 2.4, 3, 5, 5])
    assert warmup_epochs(argparse.Namespace(warmup_epochs=0, epochs=30)) == 0
    with pytest.raises(UserError, match='--warmup-epochs 8 leaves no epoch of --epochs 8'):
        warmup_epochs(argparse.Namespace(warmup_epochs=8, epochs=8))


def test_cosine_reaches_the_peak_after_warmup_then_falls_to_min_lr():
    """timm's cosine without warmup_prefix spans the whole run: after 3 of 8 warm-up epochs it resumed at 0.66 of
    the peak, which the run never reached."""
    from utils.schedule import lr_schedule
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = lr_schedule(optimizer, 'cosine', 1.0, epochs=8, warmup=2.4, min_lr=1e-6, updates_per_epoch=5)
    lrs = [schedule._get_lr(t)[0] for t in range(41)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[12] == pytest.approx(1.0)  # 2.4 epochs = 12 updates
    assert all(a < b for a, b in zip(lrs[:12], lrs[1:13]))  # rising
    assert all(a > b for a, b in zip(lrs[12:40], lrs[13:41]))  # then falling
    assert lrs[40] == pytest.approx(1e-6)


def test_onecycle_follows_pytorchs_onecycle_and_cycles_beta1():
    """Rate and Adam's beta1 as torch's OneCycleLR (its defaults) at every update, the layer-decay group at its
    lr_scale; a schedule built at update 20 (a resume) continues where one stepped to 20 is. Torch counts its
    phases to the step before each end (its peak at pct_start x total - 1), hence 41 steps with the peak at 12."""
    from utils.schedule import lr_schedule

    def optimizer():
        w = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
        return torch.optim.AdamW([dict(params=[w[0]]), dict(params=[w[1]], lr_scale=0.5)], lr=1.0)

    ours = optimizer()
    schedule = lr_schedule(ours, 'onecycle', 1.0, epochs=8, warmup=2.4, min_lr=1e-6, updates_per_epoch=5)
    theirs = optimizer()
    reference = torch.optim.lr_scheduler.OneCycleLR(theirs, [1.0, 0.5], total_steps=41, pct_start=13 / 41,
                                                    final_div_factor=4e4)
    seen = []
    for t in range(41):
        schedule.step_update(t)
        seen.append((ours.param_groups[0]['lr'], ours.param_groups[0]['betas'][0]))
        assert seen[-1] == pytest.approx((theirs.param_groups[0]['lr'], theirs.param_groups[0]['betas'][0]))
        assert ours.param_groups[1]['lr'] == pytest.approx(theirs.param_groups[1]['lr'])
        theirs.step()
        reference.step()
    assert seen[0] == pytest.approx((1 / 25, 0.95)) and seen[12] == pytest.approx((1.0, 0.85))
    assert seen[40] == pytest.approx((1e-6, 0.95))
    resumed = optimizer()
    lr_schedule(resumed, 'onecycle', 1.0, epochs=8, warmup=2.4, min_lr=1e-6, updates_per_epoch=5).step_update(20)
    assert (resumed.param_groups[0]['lr'], resumed.param_groups[0]['betas'][0]) == pytest.approx(seen[20])


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), per_class=16)


def _flags(drop=('--lr',)):
    """TINY_FLAGS without the flags in ``drop`` (and their value)."""
    out, skip = [], False
    for flag in TINY_FLAGS:
        if skip:
            skip = False
            continue
        if flag in drop:
            skip = True
            continue
        out.append(flag)
    return out


def test_resolved_lr_is_logged_and_saved(data, tmp_path):
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *_flags(),
                           '--lr-base', '2e-3', '--accum-steps', '2']) == 0
    config = yaml.safe_load((run / 'config.yaml').read_text())
    assert config['lr'] is None and config['lr_base'] == 2e-3
    assert config['run_info']['global_batch'] == 32 and config['run_info']['lr'] == pytest.approx(2e-3 * 32 / 512)
    assert config['run_info']['warmup_epochs'] == pytest.approx(0.3)  # 30 % of 1 epoch
    assert 'learning rate 0.000125 (--lr-base 0.002 x global batch 32 / 512)' in (run / 'train.log').read_text()
    rows = list(csv.DictReader((run / 'log.csv').open()))
    assert float(rows[0]['lr']) <= 2e-3 * 32 / 512 * (1 + 1e-6)


def _ema_distance(run):
    ckpt = torch.load(run / 'last.pth', weights_only=True)
    return sum((ckpt['model_ema'][k].float() - v.float()).norm() ** 2 for k, v in ckpt['model'].items()
               if v.is_floating_point()) ** 0.5, ckpt['model']


def test_ema_warmup_follows_a_short_run(data, tmp_path):
    """Four updates: with the warm-up the EMA is near the trained weights; without, it is still the start."""
    distances = {}
    for warm in ('--model-ema-warmup', '--no-model-ema-warmup'):
        run = tmp_path / warm
        assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS,
                               '--model-ema', warm]) == 0
        distances[warm] = _ema_distance(run)
    (warm, model_w), (cold, model_c) = distances.values()
    assert all(torch.equal(model_w[k], model_c[k]) for k in model_w)  # the EMA does not change the training
    assert warm < 0.5 * cold


@pytest.mark.parametrize('metric, column, pick', [('loss', 'val_loss', min), ('macro_f1', 'macro_f1', max)])
def test_eval_metric_chooses_best(metric, column, pick, data, tmp_path):
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '4', *TINY_FLAGS,
                           '--eval-metric', metric]) == 0
    rows = list(csv.DictReader((run / 'log.csv').open()))
    values = [float(r[column]) for r in rows]
    best = torch.load(run / 'best.pth', weights_only=True)
    assert best['epoch'] == values.index(pick(values)) and best['eval_metric'] == metric
    assert best['best_metric'] == pytest.approx(pick(values), rel=1e-4)  # log.csv keeps 6 digits
    assert f'best {"val loss" if metric == "loss" else "macro F1"}' in (run / 'train.log').read_text()


def test_resume_with_another_eval_metric_is_refused(data, tmp_path, capsys):
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS]) == 0
    capsys.readouterr()
    assert train_gpu.main(['--resume', str(run / 'last.pth'), '--epochs', '2', '--eval-metric', 'loss']) == 2
    assert '--eval-metric top1 (this run: loss)' in capsys.readouterr().err


def test_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score
    from datasets.folder import Batch
    from utils.engine import StepSettings, evaluate
    x, y = torch.randn(50, 5), torch.randint(0, 5, (50,))
    x[:, 4] = -10  # class 4 is never predicted, class 3 may be absent from y
    model = torch.nn.Identity()
    batches = [Batch(x[i:i + 16], y[i:i + 16], torch.arange(i, min(i + 16, 50)), []) for i in range(0, 50, 16)]
    stats = evaluate(model, batches,
                     StepSettings(torch.device('cpu'), show_progress=False), 5)
    assert stats['macro_f1'] == pytest.approx(100 * f1_score(y, x.argmax(1), average='macro'))


def test_dge_best_is_within_its_budget():
    from models import build_model
    from models.registry import within_budget
    from utils.selection import rank
    dge = build_model('vit_tiny_patch16_224', 'dge', dict(budget=0.5, region=2, splits=[2, 1]), num_classes=3, **TINY)
    assert within_budget(dge, dict(top1=90.0, val_compute_ratio=0.51))
    assert not within_budget(dge, dict(top1=95.0, val_compute_ratio=0.7))
    assert within_budget(build_model('vit_tiny_patch16_224', num_classes=3, **TINY), dict(top1=1.0))
    assert rank(80.0, 'top1', True) > rank(95.0, 'top1', False)  # within the budget beats a better epoch over it
    assert rank(0.3, 'loss', True) > rank(0.5, 'loss', True)


def test_recipe_lays_defaults_under_the_flags(tmp_path):
    light = train_gpu.parse_args(['--data-root', str(tmp_path)])
    assert (light.aa, light.reprob, light.mixup, tuple(light.scale), light.crop_pct, light.sched) == \
        ('', 0.0, 0.0, (1.0, 1.0), 1.0, 'onecycle')
    deit = train_gpu.parse_args(['--data-root', str(tmp_path), '--recipe', 'deit', '--reprob', '0.1'])
    assert (deit.aa, deit.reprob, deit.mixup, deit.cutmix, tuple(deit.scale), deit.crop_pct, deit.sched) == \
        ('rand-m9-mstd0.5-inc1', 0.1, 0.8, 1.0, (0.08, 1.0), None, 'cosine')
    (tmp_path / 'c.yaml').write_text('recipe: deit\nmixup: 0.2\n')
    from_file = train_gpu.parse_args(['--data-root', str(tmp_path), '--config', str(tmp_path / 'c.yaml')])
    assert (from_file.aa, from_file.mixup) == ('rand-m9-mstd0.5-inc1', 0.2)


def test_deit_recipe_evaluates_with_the_models_crop(data, tmp_path):
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS,
                           '--recipe', 'deit']) == 0
    best = torch.load(run / 'best.pth', weights_only=True)
    assert best['data_config']['crop_pct'] == 0.9  # vit_tiny_patch16_224's own
    assert best['args']['mixup'] == 0.8 and best['args']['aa'] == ''  # TINY_FLAGS' --aa '' wins


def test_crop_pct_out_of_range_is_one_line(data, tmp_path, capsys):
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'run'), '--epochs', '1',
                           *TINY_FLAGS, '--crop-pct', '-1']) == 2
    err = capsys.readouterr().err
    assert 'error: --crop-pct must be between 0 and 1 (got -1.0)' in err and 'Traceback' not in err


def test_warmup_as_long_as_the_run_is_refused_before_the_run_folder(data, tmp_path, capsys):
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'run'), '--epochs', '2',
                           *TINY_FLAGS, '--warmup-epochs', '2']) == 2
    err = capsys.readouterr().err
    assert 'error: --warmup-epochs 2 leaves no epoch of --epochs 2' in err and 'Traceback' not in err
    assert not (tmp_path / 'run').exists()
