"""timm's flag names where its users type them (aliases stored under the toolkit's own setting, on the command
line and in a --config file), --help with each default once, the --lr-base rule, and --grad-checkpointing that
really recomputes every block of every method and changes neither the loss nor the gradients."""
import argparse

import pytest
import torch
from torch import nn
from torch.utils import checkpoint

import benchmark
import export
import predict
import train_gpu
from conftest import TINY
from models import build_model
from models.registry import available_methods
from utils.cli_args import compile_backend
from utils.errors import UserError
from utils.optim import LR_BASE, resolve_lr

CLIS = (train_gpu, predict, benchmark, export)
ON = {'none': {}, 'tome': dict(r=2), 'gtp': dict(num_prop=2), 'toe': dict(stage=0),
      'mtvit': dict(keep_rate=0.5, prune_blocks=[2, 3]),  # block 1 runs the multi-scale stem's pooled attention
      'dge': dict(budget=0.5)}


@pytest.mark.parametrize('cli', CLIS, ids=lambda m: m.__name__)
def test_help_says_each_default_once(cli, monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')  # each flag's help on one line
    lines = cli.get_args_parser().format_help().splitlines()
    assert [line for line in lines if line.count('default:') > 1] == []
    assert not any('(default: None)' in line for line in lines)


def test_workers_help_gives_its_value_once(monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')
    parser = train_gpu.get_args_parser()
    text = parser.format_help()
    workers = text[text.index('\n  --workers WORKERS'):].split('\n  -')[1]  # the flag's entry, up to the next one
    assert workers.count('default:') == 1 and f': {parser.get_default("workers")} here)' in workers


def test_timm_names_store_the_toolkits_settings():
    timm_style = train_gpu.parse_args(['--data-root', 'x', '--num-classes', '3', '-b', '8', '-j', '1',
                                       '--grad-accum-steps', '2', '--initial-checkpoint', 'w.pth', '--torchcompile'])
    own = train_gpu.parse_args(['--data-root', 'x', '--nb-classes', '3', '--batch-size', '8', '--workers', '1',
                                '--accum-steps', '2', '--pretrained', 'w.pth', '--compile'])
    assert vars(timm_style) == vars(own)
    assert (own.nb_classes, own.batch_size, own.workers, own.accum_steps, own.pretrained, own.compile) == \
        (3, 8, 1, 2, 'w.pth', True)
    for cli, argv in ((predict, ['--weights', 'w', '--images', 'a']), (benchmark, []), (export, ['--weights', 'w'])):
        assert cli.get_args_parser().parse_args(argv + ['-b', '5']).batch_size == 5
    assert predict.get_args_parser().parse_args(['--weights', 'w', '--images', 'a', '-j', '3']).workers == 3


def test_compile_takes_timms_optional_backend():
    parse = lambda *argv: train_gpu.parse_args(['--data-root', 'x', *argv]).compile  # noqa: E731
    assert (parse(), parse('--compile'), parse('--torchcompile', 'aot_eager'), parse('--compile', '--no-compile')) == \
        (False, True, 'aot_eager', False)
    assert [compile_backend(v) for v in (False, True, 'aot_eager')] == [None, 'inductor', 'aot_eager']
    with pytest.raises(UserError, match='--compile nope: not a torch.compile backend'):
        compile_backend('nope')


def test_config_takes_timms_keys(tmp_path):
    """(A run's config.yaml, which stores the toolkit's names, reads back: test_bad_config_and_checkpoints.py.)"""
    given = tmp_path / 'timm.yaml'
    given.write_text('data_root: x\nnum_classes: 3\ngrad_accum_steps: 2\ntorchcompile: aot_eager\n'
                     'initial_checkpoint: w.pth\n')
    args = train_gpu.parse_args(['--config', str(given)])
    assert (args.nb_classes, args.accum_steps, args.compile, args.pretrained) == (3, 2, 'aot_eager', 'w.pth')
    given.write_text('num_classes: 3\nnb_classes: 3\n')
    with pytest.raises(UserError, match='num_classes and nb_classes are the same setting'):
        train_gpu.parse_args(['--config', str(given)])


@pytest.mark.parametrize('flags, world, expected', [
    ([], 1, LR_BASE * 64 / 512),                                  # DeiT's rule, the default
    (['-b', '32', '--grad-accum-steps', '4'], 2, LR_BASE * 256 / 512),
    (['--lr-base', '1e-3', '--lr-base-size', '256', '-b', '128'], 4, 1e-3 * 2),  # timm's 256, linear
    (['--lr-base', '1e-3', '--lr-base-size', '256', '--lr-base-scale', 'sqrt', '-b', '128'], 4, 1e-3 * 2 ** 0.5),
    (['--lr-base', '1e-3', '--lr-base-size', '256', '--lr-base-scale', 'sqrt', '-b', '16'], 1, 1e-3 * 0.25),
    (['--lr-base-size', '256', '--lr-base-scale', 'sqrt', '-b', '256'], 1, LR_BASE * 256 / 512),
    (['--lr', '3e-4', '--lr-base-scale', 'sqrt'], 8, 3e-4),                      # --lr as it is
])
def test_lr_base_rule(flags, world, expected):
    args = train_gpu.parse_args(['--data-root', 'x', *flags])
    assert resolve_lr(args, world).value == pytest.approx(expected)


def test_lr_base_sqrt_says_so():
    args = train_gpu.parse_args(['--data-root', 'x', '--lr-base', '1e-3', '--lr-base-scale', 'sqrt', '-b', '128'])
    assert 'x sqrt(global batch 128 / 512)' in str(resolve_lr(args, 1))
    with pytest.raises(UserError, match='--lr-base-size 0'):
        resolve_lr(train_gpu.parse_args(['--data-root', 'x', '--lr-base-size', '0']), 1)


def _step(model, x, y, checkpointing: bool):
    """(loss, every gradient, Linear calls of the blocks in forward, then in backward) of one training step."""
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    calls = []
    linears = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linears]
    torch.manual_seed(1)  # drop path and DGE's Gumbel noise draw the same in both steps
    with checkpoint.set_checkpoint_early_stop(False):  # recompute whole blocks, not just up to their last saved tensor
        loss = nn.functional.cross_entropy(model(x), y)
    extra = model.extra_loss() if hasattr(model, 'extra_loss') else None
    loss = loss + extra if extra is not None else loss
    forward = len(calls)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, forward, len(calls) - forward


@pytest.mark.parametrize('method', [m for m in ON if m == 'none' or m in available_methods()])
def test_grad_checkpointing_recomputes_every_block_and_changes_nothing(method):
    torch.manual_seed(0)
    model = build_model('vit_tiny_patch16_224', method, ON[method], num_classes=3, drop_path_rate=0.1,
                        **TINY).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    loss, grads, forward, backward = _step(model, x, y, checkpointing=False)
    loss_ckpt, grads_ckpt, forward_ckpt, backward_ckpt = _step(model, x, y, checkpointing=True)
    assert backward == 0 and forward_ckpt == forward > 0
    assert backward_ckpt == forward  # every Linear of every block ran again in the backward pass
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6), name


def test_grad_checkpointing_flag_reaches_the_model():
    from utils.distributed import DistInfo
    from utils.trainer import build_run_model
    from conftest import TINY_FLAGS
    args = train_gpu.parse_args(['--data-root', 'x', *TINY_FLAGS, '--grad-checkpointing'])
    model, _ = build_run_model(args, ['a', 'b'], None, DistInfo())
    assert model.grad_checkpointing is True
    assert build_run_model(argparse.Namespace(**{**vars(args), 'grad_checkpointing': False}), ['a', 'b'], None,
                           DistInfo())[0].grad_checkpointing is False
