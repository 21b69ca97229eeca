"""--pretrained from the Hugging Face hub through timm: alone, a tag, hf-hub:ORG/NAME, offline from a hand-made cache.

Nothing downloads: each test writes a Hugging Face cache in tmp_path (models--ORG--NAME/refs/main and
snapshots/<commit>/model.safetensors, which is all timm's load_state_dict_from_hf reads) and turns the hub off.
"""
import pytest
import timm
import torch
import yaml

import train_gpu
from conftest import TINY, TINY_FLAGS, make_image_folder, put_hub_weights, use_hub_cache
from datasets.transforms import data_config
from models import build_model
from utils.errors import UserError

KW = {k: v for k, v in TINY.items() if k != 'img_size'}
DEFAULT = timm.models.get_pretrained_cfg('vit_tiny_patch16_224').hf_hub_id  # timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline, empty Hugging Face cache in tmp_path; ``hub(repo_id, state)`` puts weights into it."""
    cache = tmp_path / 'hf' / 'hub'
    cache.mkdir(parents=True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    use_hub_cache(monkeypatch, cache)

    def put(repo_id: str, state: dict) -> None:
        put_hub_weights(cache, repo_id, state)
    put.cache = cache
    return put


def tiny_state(seed: int, **change) -> dict:
    """A tiny ViT's weights with 1000 classes, as a hub repository holds them."""
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', num_classes=1000, img_size=32, **{**KW, **change}).state_dict()


def test_pretrained_alone_loads_the_models_default_timm_weights_with_new_head_and_position_embedding(hub):
    state = tiny_state(1)
    hub(DEFAULT, state)
    model = build_model('vit_tiny_patch16_224', 'tome', dict(r=2), num_classes=3, img_size=48, pretrained=True, **KW)
    assert torch.equal(model.blocks[2].mlp.fc1.weight, state['blocks.2.mlp.fc1.weight'])
    assert model.head.weight.shape == (3, 64)                    # a new head for 3 classes
    assert model.pos_embed.shape == (1, 1 + 36, 64)              # 4 x 4 grid resampled to 6 x 6
    assert 'state_dict' not in model.pretrained_cfg              # no second copy of the weights


@pytest.mark.parametrize('tag', ['dino', 'vit_base_patch16_224.dino'])
def test_a_tag_loads_its_weights_and_its_normalisation(tag, hub):
    state = tiny_state(2)
    hub('timm/vit_base_patch16_224.dino', state)
    model = build_model('vit_base_patch16_224', num_classes=3, pretrained=tag, **TINY)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state['blocks.0.attn.qkv.weight'])
    cfg = data_config(model, 32)  # DINO's normalisation, not the default tag's (0.5, 0.5, 0.5)
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert data_config(build_model('vit_base_patch16_224', num_classes=3, **TINY))['mean'] == (0.5, 0.5, 0.5)


def test_hf_hub_repository_loads_its_weights_for_the_model(hub):
    state = tiny_state(3)
    hub('someone/my-vit', state)
    model = build_model('vit_tiny_patch16_224', num_classes=3, pretrained='hf-hub:someone/my-vit', **TINY)
    assert torch.equal(model.blocks[3].mlp.fc2.weight, state['blocks.3.mlp.fc2.weight'])
    assert model.pretrained_cfg['hf_hub_id'] == 'someone/my-vit'


def test_method_parameters_start_from_their_own_initialisation(hub):
    from models.factory import model_new_params
    state = tiny_state(4)
    hub(DEFAULT, state)
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(keep_rate=0.7), num_classes=3, pretrained=True, **TINY)
    assert model_new_params(model) and all(n.startswith('mtvit_fusion.') for n in model_new_params(model))
    assert torch.equal(model.blocks[1].attn.proj.weight, state['blocks.1.attn.proj.weight'])


def test_hub_weights_of_another_depth_name_the_cause(hub):
    hub(DEFAULT, tiny_state(5, depth=2))  # timm alone would load these half-way without a word
    with pytest.raises(UserError) as err:
        build_model('vit_tiny_patch16_224', num_classes=3, pretrained=True, **TINY)
    assert str(err.value) == (f"weights in '{DEFAULT[5:]}' do not fit model 'vit_tiny_patch16_224': the file holds "
                              f"depth 2; vit_tiny_patch16_224 has 4; pass the --model these weights were made for")


@pytest.mark.parametrize('pretrained, label, repo', [(True, DEFAULT[5:], DEFAULT),
                                                     ('hf-hub:nobody/nothing', 'hf-hub:nobody/nothing', 'nobody/nothing')])
def test_weights_in_neither_cache_nor_reach_are_one_line(pretrained, label, repo, hub):
    with pytest.raises(UserError) as err:
        build_model('vit_tiny_patch16_224', num_classes=3, pretrained=pretrained, **TINY)
    assert str(err.value) == (f"could not get the weights of {label} from the Hugging Face hub ({repo}): not in the "
                              f"cache ({hub.cache}) and the hub cannot be reached (HF_HUB_OFFLINE is set); run once "
                              f"with network access, download the file and pass --pretrained FILE, or train from scratch with "
                              f"--pretrained none")


@pytest.mark.parametrize('error, cause', [(PermissionError(13, 'Permission denied'), 'PermissionError: [Errno 13] '
                                                                                    'Permission denied; check the cache folder'),
                                           (ConnectionError('no route'), 'the hub cannot be reached')])
def test_other_failures_of_the_hub_say_what_happened(error, cause, hub, monkeypatch):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr('models.pretrained.load_state_dict_from_hf', fail)
    with pytest.raises(UserError) as err:
        build_model('vit_tiny_patch16_224', num_classes=3, pretrained=True, **TINY)
    assert cause in str(err.value) and '\n' not in str(err.value)


def test_missing_hub_weights_through_the_cli_are_one_error_line(hub, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'd', per_class=5, size=16)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'r'), *TINY_FLAGS,
                           '--pretrained']) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err
    assert errors[0].startswith(f'error: could not get the weights of {DEFAULT[5:]} from the Hugging Face hub '
                                f'({DEFAULT}): not in the cache ({hub.cache})')


@pytest.mark.parametrize('value, message', [
    ('deit_small_patch16_224.fb_in1k', "'deit_small_patch16_224.fb_in1k' are timm weights of deit_small_patch16_224, "
                                       "not of --model vit_tiny_patch16_224; pass --model deit_small_patch16_224, or a "
                                       "tag of vit_tiny_patch16_224 (augreg_in21k, augreg_in21k_ft_in1k)"),
    ('fb_in1k', "'fb_in1k' is neither a weights file nor a timm pretrained tag: no such file, and the tags of "
                "vit_tiny_patch16_224 are augreg_in21k, augreg_in21k_ft_in1k; give a .pth/.safetensors path, "
                "hf-hub:ORG/NAME, or a tag such as deit_small_patch16_224.fb_in1k")])
def test_a_tag_of_another_model_or_no_tag_at_all_is_refused_in_one_line(value, message, hub):
    with pytest.raises(UserError) as err:
        build_model('vit_tiny_patch16_224', num_classes=3, pretrained=value, **TINY)
    assert str(err.value) == message


def test_an_existing_file_wins_over_a_tag_of_the_same_name(hub, tmp_path, monkeypatch):
    state = tiny_state(6)
    torch.save({'model': state}, tmp_path / 'augreg_in21k')
    monkeypatch.chdir(tmp_path)  # the hub cache is empty: only the file can give these weights
    model = build_model('vit_tiny_patch16_224', num_classes=3, pretrained='augreg_in21k', **TINY)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, state['blocks.0.mlp.fc1.weight'])


def test_training_with_pretrained_alone_records_it_and_resumes(hub, tmp_path):
    hub(DEFAULT, tiny_state(7))
    data, run = make_image_folder(tmp_path / 'd', per_class=10, size=32), tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS,
                           '--pretrained', '--method', 'mtvit']) == 0
    assert 'start from their own initialisation (mtvit_fusion.' in (run / 'train.log').read_text()
    assert train_gpu.parse_args(['--config', str(run / 'config.yaml')]).pretrained is True
    assert torch.load(run / 'last.pth', weights_only=True)['args']['pretrained'] is True
    assert train_gpu.main(['--resume', str(run / 'last.pth'), '--epochs', '2']) == 0
    assert torch.load(run / 'last.pth', weights_only=True)['epoch'] == 1


def _without_pretrained_none(flags):
    return [f for i, f in enumerate(flags) if f != '--pretrained' and (i == 0 or flags[i - 1] != '--pretrained')]


def test_your_data_starts_from_the_models_timm_weights_by_default_and_says_so(hub, tmp_path):
    state = tiny_state(8)
    hub(DEFAULT, state)
    data, run = make_image_folder(tmp_path / 'd', per_class=5, size=32), tmp_path / 'run'
    flags = _without_pretrained_none(TINY_FLAGS)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '1', *flags,
                           '--lr', '0']) == 0
    line = f'weights: {DEFAULT[5:]} from the Hugging Face cache ({DEFAULT})'
    assert line in (run / 'train.log').read_text()
    assert yaml.safe_load((run / 'config.yaml').read_text())['run_info']['weights'] == line
    best = torch.load(run / 'best.pth', weights_only=True)['model']  # lr 0: the hub's weights as they came
    assert torch.equal(best['blocks.1.attn.qkv.weight'], state['blocks.1.attn.qkv.weight'])
    scratch = tmp_path / 'scratch'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(scratch), '--epochs', '1', *flags,
                           '--pretrained', 'none']) == 0
    assert 'from scratch: random initialisation' in (scratch / 'train.log').read_text()
    assert train_gpu.parse_args([]).pretrained == 'none'  # the built-in demo stays offline, from scratch


def test_no_cache_and_no_network_names_both_ways_out(hub, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'd', per_class=5, size=16)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(tmp_path / 'r'),
                           *_without_pretrained_none(TINY_FLAGS)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f'weights: {DEFAULT[5:]} from the Hugging Face hub ({DEFAULT}), downloading once into {hub.cache}'
    assert len(err) == 2 and err[1].startswith('error: could not get the weights')
    assert '--pretrained FILE' in err[1] and '--pretrained none' in err[1] and not (tmp_path / 'r').exists()


def test_hub_warnings_are_printed_once(tmp_path):
    """huggingface_hub prints through its own handler; the run's console handler must not print it again."""
    import logging
    from utils.run_files import setup_logging
    setup_logging(tmp_path, True)
    logger, consoles = logging.getLogger('huggingface_hub.utils._http'), 0
    while logger is not None:  # the handlers a record of it reaches
        consoles += sum(type(h) is logging.StreamHandler for h in logger.handlers)
        logger = logger.parent if logger.propagate else None
    assert consoles == 1
