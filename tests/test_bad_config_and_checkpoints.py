"""A --config file typed as its flags, checked before anything is written; a bad weights file named in our words."""
import argparse
import collections

import numpy as np
import pytest
import torch
import yaml

import predict
import train_gpu
from models.checkpoint import read_checkpoint
from utils.config import check_config
from utils.errors import UserError
from utils.run_files import NOT_SETTINGS, write_config


def _config(tmp_path, text):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    return path


@pytest.mark.parametrize('text, expected', [
    ('epochs: 2.7', 'epochs: expected an integer (as --epochs takes), got 2.7'),
    ('epochs: 2.0', 'epochs: expected an integer (as --epochs takes), got 2.0'),
    ('epochs: true', 'epochs: expected an integer (as --epochs takes), got true'),
    ('epochs: ten', 'epochs: expected an integer (as --epochs takes), got "ten"'),
    ('epochs: null', 'epochs: expected an integer (as --epochs takes), got null'),
    ('lr: yes', 'lr: expected a number (as --lr takes), got true'),
    ('scale: 0.5', 'scale: expected a list of 2 numbers (as --scale takes), got 0.5'),
    ('ratio: [1, 2, 3]', 'ratio: expected a list of 2 numbers (as --ratio takes), got [1, 2, 3]'),
    ('sched: linear', 'sched: expected one of onecycle, cosine (as --sched takes), got "linear"'),
    ('amp: 1', 'amp: expected true or false (as --amp takes), got 1'),
    ('pretrained: [a]', 'pretrained: expected true, false or a string (as --pretrained takes), got ["a"]'),
    ('model_kwargs: [depth4]', 'model_kwargs: expected a list of KEY=VALUE strings, or a mapping (as '
                               '--model-kwargs takes), got ["depth4"]'),
    ('tome_r: []', 'tome_r: expected a list of one or more strings (as --tome-r takes), got []'),
    ('dge_splits: [2, 1.5]', 'dge_splits: expected a list of one or more integers (as --dge-splits takes), '
                             'got [2, 1.5]'),
    ('gtp_preset: 20', 'gtp_preset: expected one of 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 (as --gtp-preset '
                       'takes), got 20'),
    ('mtvit_fusion: fused', 'mtvit_fusion: expected one of merge, fuse (as --mtvit-fusion takes), got "fused"'),
])
def test_mistyped_config_value_is_one_line_naming_file_key_and_type(text, expected, tmp_path):
    path = _config(tmp_path, text)
    with pytest.raises(UserError) as err:
        train_gpu.parse_args(['--config', str(path)])
    assert str(err.value) == f"config file '{path}': {expected}"


def test_mistyped_config_fails_before_the_run_folder(tmp_path, capsys):
    path = _config(tmp_path, 'epochs: 2.7\n')
    assert train_gpu.main(['--config', str(path), '--output-dir', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config file '{path}': epochs: expected an integer (as --epochs takes), got 2.7\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ['c.yaml']


def test_config_values_become_what_their_flags_store(tmp_path):
    path = _config(tmp_path, 'lr: 1\ntome_r: [8, 8]\npretrained: false\nmodel_kwargs: {depth: 4}\n'
                             'crop_pct: null\nscale: [0, 1]\naa: ""\nlog_tensorboard: tb\nlayer_decay: null\n')
    args = train_gpu.parse_args(['--config', str(path)])
    assert (args.lr, args.tome_r, args.pretrained, args.model_kwargs, args.crop_pct, args.scale, args.aa,
            args.log_tensorboard, args.layer_decay) == (1.0, ['8', '8'], False, {'depth': 4}, None, [0.0, 1.0], '',
                                                        'tb', None)
    assert isinstance(args.lr, float) and all(isinstance(v, float) for v in args.scale)


def _settings(args: argparse.Namespace) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in NOT_SETTINGS}


@pytest.mark.parametrize('flags', [
    [],
    ['--recipe', 'deit', '--pretrained', '--log-tensorboard', '--model-kwargs', 'depth=4', "act_layer='gelu'",
     '--no-amp', '--model-ema', '--nb-classes', '3', '--lr', '2e-3', '--clip-grad', '1', '--aa', '',
     '--train-interpolation', 'random', '--interpolation', 'bicubic', '--scale', '0.5', '1'],
    ['--pretrained', 'weights/x.pth', '--log-tensorboard', 'tb', '--crop-pct', '0.9', '--class-balance', 'sampler'],
    ['--method', 'tome', '--tome-r', '8', '8', '4', '--no-tome-prop-attn'],
    ['--method', 'gtp', '--gtp-preset', '4', '--gtp-graph', 'spatial', '--gtp-selection', 'CLSAttnMean'],
    ['--method', 'mtvit', '--keep-rate', '0.5', '--prune-blocks', '1', '2', '--mtvit-fusion', 'fuse',
     '--shrink-epochs', '2', '--shrink-start-epoch', '1', '--no-multi-scale'],
    ['--method', 'toe', '--toe-keep-rate', '0.5', '1', '--toe-steps', '0', '0.5', '--toe-substeps', '3'],
    ['--method', 'dge', '--dge-splits', '2', '1', '--dge-budget', '0.4', '--dge-region', '2'],
    ['--teacher', 'runs/dense/best.pth', '--distill-type', 'hard', '--distill-alpha', '0.3',
     '--distill-temperature', '2'],
    ['--teacher', 'deit_base_patch16_224.fb_in1k', '--teacher-weights', 'weights/teacher.pth'],
    ['--num-classes', '3', '-b', '8', '-j', '1', '--grad-accum-steps', '2', '--torchcompile', 'aot_eager',
     '--initial-checkpoint', 'weights/x.pth', '--grad-checkpointing', '--lr-base-size', '256',
     '--lr-base-scale', 'sqrt'],
])
def test_config_yaml_of_a_run_passes_the_check_unchanged(flags, tmp_path):
    args = train_gpu.parse_args(['--data-root', str(tmp_path), *flags])
    write_config(tmp_path / 'config.yaml', args, dict(lr=1e-3))
    written = {k: v for k, v in yaml.safe_load((tmp_path / 'config.yaml').read_text()).items() if k != 'run_info'}
    nullable = {k for recipe in train_gpu.RECIPES.values() for k, v in recipe.items() if v is None}
    assert check_config(train_gpu.get_args_parser(), written, 'config.yaml', nullable) == written
    again = train_gpu.parse_args(['--config', str(tmp_path / 'config.yaml')])
    assert _settings(again) == _settings(args) and again.method_cfg == args.method_cfg


class _Settings(collections.OrderedDict):
    """A class of the sender's own: a safe load refuses to build it."""


def _checkpoint(tmp_path, kind):
    """A weights file of ``kind`` in ``tmp_path``."""
    state = {'w': torch.arange(64.0), 'b': torch.zeros(8)}
    path = tmp_path / ('w.safetensors' if kind == 'safetensors_truncated' else 'w.pth')
    if kind == 'truncated':
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif kind == 'random':
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'folder':  # a run folder given for its checkpoint
        path = tmp_path / 'run'
        path.mkdir()
        torch.save(state, path / 'best.pth')
    elif kind == 'text':
        path.write_text('<html><body>404 Not Found</body></html>\n')
    elif kind in ('custom_class', 'namespace'):
        torch.save(_Settings(state) if kind == 'custom_class' else argparse.Namespace(model=state), path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


KINDS = {'truncated': 'is truncated or damaged (', 'random': 'is not a checkpoint: its 4096 bytes',
         'empty': 'is empty (0 bytes)', 'text': 'is a text file, not a checkpoint',
         'folder': 'is a folder; give a weights file in it: best.pth',
         'custom_class': 'holds Python objects besides tensors', 'namespace': 'holds Python objects besides tensors',
         'safetensors_truncated': 'is truncated or damaged ('}


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_bad_checkpoint_is_named_in_our_words(kind, tmp_path):
    path = _checkpoint(tmp_path, kind)
    with pytest.raises(UserError) as err:
        read_checkpoint(str(path))
    message = str(err.value)
    assert message.startswith(f"'{path}' {KINDS[kind]}")
    assert 'weights_only' not in message and '\n' not in message and len(message) < 300 + len(str(path))


def test_bad_checkpoint_through_predict_is_one_line(tmp_path, capsys):
    from PIL import Image
    image = tmp_path / 'a.png'
    Image.new('RGB', (16, 16)).save(image)
    for kind in ('truncated', 'custom_class'):
        path = _checkpoint(tmp_path, kind)
        assert predict.main(['--weights', str(path), '--images', str(image)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: '{path}' {KINDS[kind]}") and err.count('\n') == 1
        assert 'weights_only' not in err
