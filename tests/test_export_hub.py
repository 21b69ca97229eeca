"""export.py --format hub: a folder timm's hub loader reads back (same logits, the classes as label names), the
toolkit's --pretrained hf-hub: and predict.py read it, and bad requests are one line that loses nothing.

Nothing uploads: the folder's files are copied into a Hugging Face cache in tmp_path (as test_hub_weights.py
builds one) and the hub is offline.
"""
import contextlib
import io
import json
import re
import shutil

import pytest
import timm
import torch
from huggingface_hub import constants

import export
import predict
import train_gpu
from conftest import TINY, TINY_FLAGS, make_image_folder
from models import build_model
from models.factory import load_for_inference
from models.registry import apply_method

CLASSES = ['checker', 'stripes_h', 'stripes_v']
REPO = 'someone/tiny-tome'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One tiny ToMe run; its hub folder, pushed to REPO without a network (the push fails, the folder stays); the
    same checkpoint exported as DGE (parameters of its own)."""
    root = tmp_path_factory.mktemp('hub')
    data = make_image_folder(root / 'data', per_class=6, size=32)
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(root / 'run'), '--epochs', '1', *TINY_FLAGS,
                           '--method', 'tome', '--tome-r', '2']) == 0
    best = root / 'run' / 'best.pth'
    with pytest.MonkeyPatch.context() as offline, contextlib.redirect_stderr(io.StringIO()) as push_error:
        offline.setattr(constants, 'HF_HUB_OFFLINE', True)  # the autouse offline fixture starts after this one
        assert export.main(['--weights', str(best), '--format', 'hub', '--output', str(root / 'plain'),
                            '--push-to-hub', REPO]) == 2
    assert export.main(['--weights', str(best), '--format', 'hub', '--output', str(root / 'dge'),
                        '--method', 'dge']) == 0
    return dict(root=root, best=best, plain=root / 'plain', dge=root / 'dge', image=next((data / 'checker').iterdir()),
                push_error=push_error.getvalue().strip())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path holding the plain folder as the repository REPO."""
    def put(folder):
        hub = tmp_path / 'hf'
        snapshot = hub / f"models--{REPO.replace('/', '--')}" / 'snapshots' / ('c0ffee' * 6 + 'c0de')
        shutil.copytree(folder, snapshot)
        (snapshot.parents[1] / 'refs').mkdir()
        (snapshot.parents[1] / 'refs' / 'main').write_text(snapshot.name)
        monkeypatch.setenv('HF_HUB_CACHE', str(hub))
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(hub))
    return put


def logits(model, seed=0):
    with torch.no_grad():
        return model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def test_plain_folder_loads_from_the_hub_with_timm_as_the_checkpoint_and_with_its_classes(run, cache):
    assert sorted(p.name for p in run['plain'].iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cache(run['plain'])
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True).eval()
    dense = load_for_inference(run['best'], method='none')[0]
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=1e-6)
    assert model.pretrained_cfg['label_names'] == CLASSES and model.num_classes == 3
    assert tuple(model.pretrained_cfg['input_size']) == (3, 32, 32)
    config = json.loads((run['plain'] / 'config.json').read_text())
    assert config['label_names'] == CLASSES and config['toolkit'] == dict(method='tome', method_cfg=dict(
        r=2, prop_attn=True))
    trained = load_for_inference(run['best'])[0]  # ToMe on: as the card says, apply_method on timm's model
    torch.testing.assert_close(logits(apply_method(model, 'tome', config['toolkit']['method_cfg'])), logits(trained),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(logits(trained), logits(dense), atol=1e-4)  # the reduction is really on


def test_the_toolkits_pretrained_hf_hub_reads_the_folder(run, cache):
    cache(run['plain'])
    model = build_model('vit_tiny_patch16_224', 'tome', num_classes=5, pretrained=f'hf-hub:{REPO}', **TINY)
    saved = torch.load(run['best'], weights_only=True)['model']
    assert torch.equal(model.blocks[3].mlp.fc2.weight, saved['blocks.3.mlp.fc2.weight'])
    assert model.head.weight.shape[0] == 5  # other classes: a new head
    same = build_model('vit_tiny_patch16_224', 'tome', num_classes=3, pretrained=f'hf-hub:{REPO}', **TINY)
    assert torch.equal(same.head.weight, saved['head.weight'])  # the same classes: the pushed model's head


def test_the_card_states_the_runs_figures_and_its_python_predicts(run, cache, capsys):
    card = (run['plain'] / 'README.md').read_text()
    val = torch.load(run['best'], weights_only=True)['val']
    assert f"top-1 {val['top1']:.2f} %, macro F1 {val['macro_f1']:.2f} %" in card
    assert re.search(r'MAC ratio 0\.\d\d', card) and 'library_name: timm' in card and 'apply_method(' in card
    cache(run['plain'])
    snippet = card.split('```python\n')[1].split('```')[0]
    exec(snippet.replace('photo.jpg', str(run['image'])), {})
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and set(printed[::2]) <= set(CLASSES)


def test_a_method_with_parameters_of_its_own_is_the_toolkits_checkpoint_and_predict_reads_it(run, capsys):
    folder = run['dge']
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'checkpoint.pth', 'config.json']
    model, meta = load_for_inference(folder / 'checkpoint.pth')
    assert meta['method'] == 'dge' and meta['class_names'] == CLASSES
    saved = torch.load(run['best'], weights_only=True)['model']
    assert torch.equal(model.blocks[1].attn.qkv.weight, saved['blocks.1.attn.qkv.weight'])
    card = (folder / 'README.md').read_text()
    assert 'python predict.py --weights model/checkpoint.pth' in card and 'library_name: timm' not in card
    assert predict.main(['--weights', str(folder / 'checkpoint.pth'), '--images', str(run['image']),
                         '--topk', '2']) == 0
    assert any(name in capsys.readouterr().out for name in CLASSES)


@pytest.mark.parametrize('extra, message', [
    (['--output', 'PLAIN'], "error: --output 'PLAIN' exists and is not an empty folder; choose a new --output"),
    (['--push-to-hub', 'a/b/c'], "error: --push-to-hub 'a/b/c' is not a hub repository name"),
    (['--img-size', '48'], "error: --format hub writes the model at the checkpoint's input size"),
])
def test_bad_requests_are_one_line_and_touch_nothing(extra, message, run, tmp_path, capsys):
    before = sorted(p.name for p in run['plain'].iterdir())
    extra = [str(run['plain']) if e == 'PLAIN' else e for e in extra]
    out = tmp_path / 'out' if '--output' not in extra else None
    argv = ['--weights', str(run['best']), '--format', 'hub', *extra] + (['--output', str(out)] if out else [])
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.replace('PLAIN', str(run['plain']))) and '\n' not in err
    assert sorted(p.name for p in run['plain'].iterdir()) == before and (out is None or not out.exists())


def test_push_without_a_network_says_so_and_keeps_the_checked_folder(run):
    err = run['push_error']
    assert err.startswith(f"error: could not push to the Hugging Face hub repository '{REPO}' (OfflineModeIsEnabled")
    assert f"hf upload {REPO} {run['plain']}" in err and '\n' not in err
    assert f'hf-hub:{REPO}' in (run['plain'] / 'README.md').read_text()
    assert not list(run['root'].glob('.*.partial-*'))
