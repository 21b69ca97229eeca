"""One error path for the three command-line tools (predict.py's: tests/test_predict.py)."""
import pytest
import timm
import torch

import benchmark
import train_gpu
from conftest import TINY, TINY_FLAGS, make_image_folder
from utils.errors import MethodConfigError, Stopped, UserError, run_cli


def test_bad_method_setting_is_one_line_in_every_cli(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'd', per_class=5, size=16)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'r'), '--method', 'mtvit',
                           '--keep-rate', '1.5', *TINY_FLAGS]) == 2
    assert benchmark.main(['--model', 'vit_tiny_patch16_224', '--img-size', '32', '--model-kwargs', 'patch_size=8',
                           'depth=4', 'embed_dim=32', 'num_heads=2', '--sweep', 'mtvit.keep_rate=1.5',
                           '--runs', '1', '--warmup', '0', '--batch-size', '2', '--output-dir', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err
    assert err.count('error: mtvit: keep_rate must be in (0, 1], got 1.5') == 2 and 'Traceback' not in err


@pytest.mark.parametrize('exc, code, message', [(UserError('bad input'), 2, 'error: bad input'),
                                                (MethodConfigError('bad value'), 2, 'error: bad value'),
                                                (Stopped('stopped by SIGTERM', 143), 143, 'stopped by SIGTERM'),
                                                (KeyboardInterrupt(), 130, 'stopped by you')])
def test_run_cli_codes(exc, code, message, capsys):
    def fail():
        raise exc
    assert run_cli(fail, 'stopped by you') == code
    assert capsys.readouterr().err.strip() == message
    assert run_cli(lambda: None) == 0


def test_a_bug_keeps_its_traceback():
    """Only bad input is one line: a ValueError from inside torch or timm is a bug to see whole."""
    def fail():
        raise ValueError('a bug')
    with pytest.raises(ValueError, match='a bug'):
        run_cli(fail)


@pytest.mark.parametrize('model', ['resnet50', 'no_such_model'])
def test_a_model_that_is_not_a_vit_is_one_line_on_every_path(model, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'd', per_class=3, size=16)
    run = tmp_path / 'run'
    for argv in (['--output-dir', str(run)], ['--data-root', str(data), '--output-dir', str(run)]):  # demo, data
        assert train_gpu.main(['--model', model, *argv]) == 2
    assert benchmark.main(['--model', model, '--output-dir', str(tmp_path / 'b')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith('error: ') and model in line for line in err), err
    assert not run.exists() and not (tmp_path / 'b').exists()


@pytest.mark.parametrize('kwargs', [['bogus=1'], ['depth=x'], ['embed_dim=100']])
def test_model_kwargs_timm_does_not_take_are_one_line_on_every_path(kwargs, tmp_path, capsys):
    import predict
    data = make_image_folder(tmp_path / 'd', per_class=3, size=16)
    model = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', *kwargs]
    assert train_gpu.main([*model, '--data-root', str(data), '--output-dir', str(tmp_path / 'run')]) == 2
    assert benchmark.main([*model, '--output-dir', str(tmp_path / 'b')]) == 2
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=3, **TINY).state_dict(), tmp_path / 'w.pth')
    assert predict.main([*model, '--pretrained', str(tmp_path / 'w.pth'), '--images', str(data),
                         '--output-dir', str(tmp_path / 'p')]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 3 and 'Traceback' not in err
    assert all(line.startswith('error: vit_tiny_patch16_224 cannot be built with') and kwargs[0] in line
               for line in errors)
    assert not any((tmp_path / name).exists() for name in ('run', 'b', 'p'))


def test_the_shared_flags_come_from_one_parent_parser():
    import export
    import predict
    from utils import cli_args
    parents = {'--device': cli_args.device_flag(), '--model-kwargs': cli_args.model_flags('x'),
               '--weights': cli_args.weights_flag(), '--tome-r': cli_args.method_flags(override=True)}
    tools = {'train_gpu': train_gpu, 'predict': predict, 'export': export, 'benchmark': benchmark}
    for flag, parent in parents.items():
        shared = next(a for a in parent._actions if flag in a.option_strings)
        users = [name for name, tool in tools.items()
                 if any(flag in a.option_strings for a in tool.get_args_parser()._actions)]
        assert len(users) >= 2, (flag, users)
        for name in users:
            action = next(a for a in tools[name].get_args_parser()._actions if flag in a.option_strings)
            assert (action.nargs, action.type, action.metavar) == (shared.nargs, shared.type, shared.metavar), name
            assert action.help.startswith(shared.help.split(':')[0]), (name, action.help)


def test_numbers_outside_their_range_are_one_line_from_the_flags_or_a_config(tmp_path, capsys):
    """Each of these was a traceback deep in torch or timm (batch 0, --accum-steps 0, --log-interval 0,
    --smoothing 1.5, --ratio 0), or a run that trained on nonsense (--epochs 0, --hflip 2)."""
    run = tmp_path / 'run'
    bad = [['--batch-size', '0'], ['--accum-steps', '0'], ['--log-interval', '0'], ['--smoothing', '1.5'],
           ['--ratio', '0', '1'], ['--epochs', '0'], ['--hflip', '2'], ['--workers', '-1'], ['--lr', '-1']]
    for flags in bad:
        assert train_gpu.main(['--output-dir', str(run), *flags]) == 2
    (tmp_path / 'c.yaml').write_text('drop_path: 1.5\n')
    assert train_gpu.main(['--output-dir', str(run), '--config', str(tmp_path / 'c.yaml')]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == len(bad) + 1 and 'Traceback' not in err and not run.exists()
    assert lines[3] == 'error: --smoothing 1.5 is outside [0, 1), the values it can take'
    assert lines[4].startswith('error: --ratio 0.0 is outside (0, inf)') and lines[-1].startswith('error: --drop-path 1.5')
