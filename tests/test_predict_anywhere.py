"""predict.py beyond a checkpoint and local files: a stock timm model (--model) with ImageNet class names, image
URLs served by a local HTTP server, --format json, --topk of a labelled folder, and the refusals of bad sources.

No test trains: the timm model is a tiny ViT whose 1000-class weights sit in a hand-made offline Hugging Face
cache under the hub repository of vit_tiny_patch16_224's default tag, so its ImageNet names apply.
"""
import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import predict
from conftest import TINY, make_image_folder, put_hub_weights, use_hub_cache

KW = {k: v for k, v in TINY.items() if k != 'img_size'}
MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', *(f'{k}={v}' for k, v in TINY.items()), '--workers', '0']
REPO = timm.models.get_pretrained_cfg('vit_tiny_patch16_224').hf_hub_id  # its default tag's, augreg_in21k_ft_in1k
GOLDFISH = 1  # ImageNet class the weights favour


@pytest.fixture(scope='module')
def stock(tmp_path_factory):
    """(hub cache, weights, two images): tiny 1000-class ViT weights leaning to goldfish, in an offline cache."""
    base = tmp_path_factory.mktemp('anywhere')
    torch.manual_seed(0)
    state = timm.create_model('vit_tiny_patch16_224', num_classes=1000, **TINY).state_dict()
    state['head.bias'][GOLDFISH] += 8
    put_hub_weights(base / 'hub', REPO, state)
    images = make_image_folder(base / 'images', classes=('checker',), per_class=2)
    return base / 'hub', state, sorted(str(p) for p in (images / 'checker').glob('*.png'))


@pytest.fixture
def hub(stock, monkeypatch):
    use_hub_cache(monkeypatch, stock[0])
    return stock


def reference_probs(state, path) -> torch.Tensor:
    """What timm alone gives for ``path``: the same weights, the tag's eval transform at 32 px."""
    model = timm.create_model('vit_tiny_patch16_224', num_classes=1000, **TINY).eval()
    model.load_state_dict(state)
    transform = create_transform(**resolve_data_config({'input_size': (3, 32, 32)}, model=model))
    with torch.no_grad():
        return model(transform(Image.open(path).convert('RGB'))[None]).softmax(1)[0]


def test_a_timm_model_with_its_hub_weights_names_imagenet_classes_in_json(hub, tmp_path, capsys):
    _, state, images = hub
    out = tmp_path / 'out'
    assert predict.main([*MODEL, '--images', *images, '--format', 'json', '--topk', '3', '--output-dir', str(out)]) == 0
    rows = json.loads((out / 'predictions.json').read_text())
    names = ImageNetInfo('imagenet-1k')
    assert [r['file'] for r in rows] == images and not (out / 'predictions.csv').exists()
    for row in rows:
        reference = reference_probs(state, row['file'])  # weights, head, mean/std and crop as timm's (CPU: no AMP)
        top = reference.argsort(descending=True)[:3].tolist()
        assert [t['name'] for t in row['top_k']] == [names.index_to_description(i) for i in top]
        assert [t['probability'] for t in row['top_k']] == pytest.approx(reference[top].tolist(), abs=1e-5)
        assert row['predicted'] == 'goldfish, Carassius auratus' == row['top_k'][0]['name']
    printed = capsys.readouterr().out
    assert f'{images[0]}: goldfish, Carassius auratus 0.' in printed and str(out / 'predictions.json') in printed


def test_a_file_of_another_class_count_keeps_its_head_and_a_method_applies(hub, tmp_path):
    from models.registry import method_name
    from utils.predictor import load_timm_for_inference
    torch.manual_seed(1)
    state = timm.create_model('vit_tiny_patch16_224', num_classes=10, **TINY).state_dict()
    torch.save({'model': state}, tmp_path / 'deit_style.pth')  # timm alone would start a 10-class head afresh
    model, meta = load_timm_for_inference('vit_tiny_patch16_224', str(tmp_path / 'deit_style.pth'), method='tome',
                                          method_settings=dict(r=2), model_kwargs=TINY)
    assert torch.equal(model.head.weight, state['head.weight']) and torch.equal(model.head.bias, state['head.bias'])
    assert meta['class_names'][:2] == ['class_0', 'class_1'] and len(meta['class_names']) == 10
    assert method_name(model) == 'tome' and meta['method_cfg']['r'] == 2
    assert meta['data_config']['input_size'] == (3, 32, 32) and meta['data_config']['mean'] == (0.5, 0.5, 0.5)


class Handler(SimpleHTTPRequestHandler):
    """Files of its folder; /slow answers only when the test is over (after the client's timeout); /cut sends
    less than the length it announces."""
    released = threading.Event()

    def do_GET(self):
        if self.path == '/slow':
            self.released.wait(10)
            return
        if self.path == '/cut':
            self.send_response(200)
            self.send_header('Content-Length', '1000')
            self.end_headers()
            self.wfile.write(b'\x89PNG')
            return
        super().do_GET()

    def log_message(self, *args):  # no access log on the test's stderr
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 in a thread, serving tmp_path/www, stopped when the test ends."""
    www = tmp_path / 'www'
    www.mkdir()
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(www)))
    httpd.daemon_threads = True
    httpd.handle_error = lambda *args: None  # a client that gave up on /slow is not an error here
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield www, f'http://127.0.0.1:{httpd.server_address[1]}'
    Handler.released.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)
    Handler.released.clear()


def test_image_urls_are_fetched_and_each_failure_is_one_warning(hub, server, tmp_path, capsys):
    _, state, images = hub
    www, url = server
    Image.open(images[1]).save(www / 'good.png')
    (www / 'notes.txt').write_text('not an image')
    urls = [f'{url}/good.png', f'{url}/missing.png', f'{url}/notes.txt', f'{url}/slow', f'{url}/cut']
    out = tmp_path / 'out'
    assert predict.main([*MODEL, '--images', images[0], *urls, '--url-timeout', '0.5', '--output-dir', str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith('skipping')]
    assert warnings == [f'skipping {url}/missing.png: HTTP 404 File not found',
                        f'skipping {url}/slow: no answer within 0.5 s (--url-timeout)',
                        f'skipping {url}/cut: the connection closed after 4 of 1000 bytes',
                        f'skipping {url}/notes.txt: not a readable image (UnidentifiedImageError)']
    assert f'{url}/good.png: goldfish' in captured.out and '2 images classified, 4 skipped' in captured.out
    table = pd.read_csv(out / 'predictions.csv', keep_default_na=False)
    assert list(table['file']) == [images[0], f'{url}/good.png']
    assert table.loc[1, 'confidence'] == pytest.approx(reference_probs(state, images[1]).max().item(), abs=1e-5)


def tiny_checkpoint(path, classes=('checker', 'stripes_h', 'stripes_v')):
    """A toolkit checkpoint of an untrained tiny ViT of ``classes``, written without a training run."""
    from datasets.transforms import data_config
    from models.checkpoint import make_checkpoint, save_atomic
    model = timm.create_model('vit_tiny_patch16_224', num_classes=len(classes), **TINY)
    meta = dict(model_name='vit_tiny_patch16_224', model_kwargs=KW, method='none', method_cfg={},
                num_classes=len(classes), class_names=list(classes), data_config=data_config(model, 32))
    save_atomic(make_checkpoint(meta, model.state_dict()), path)
    return path


def test_topk_sets_the_top_k_accuracy_of_a_labelled_folder(tmp_path):
    weights, data = tiny_checkpoint(tmp_path / 'best.pth'), make_image_folder(tmp_path / 'data', per_class=2)
    out = tmp_path / 'report'
    assert predict.main(['--weights', str(weights), '--data-root', str(data), '--topk', '2',
                         '--output-dir', str(out), '--workers', '0']) == 0
    assert json.loads((out / 'summary.json').read_text())['top_k'] == 2


@pytest.mark.parametrize('flags, message', [
    (['--images', 'x.png'], 'give either --weights (a checkpoint of train_gpu.py) or --model'),
    (['--weights', 'w.pth', *MODEL, '--images', 'x.png'], 'give either --weights'),
    (['--weights', 'w.pth', '--pretrained', '--images', 'x.png'], '--pretrained and --model-kwargs go with --model'),
    ([*MODEL, '--data-root', '.'], '--model classifies --images; a labelled --data-root is scored with --weights'),
    ([*MODEL, '--topk', '0', '--images', 'x.png'], '--topk must be at least 1 (got 0)'),
    ([*MODEL, '--pretrained', 'none', '--images', 'x.png'], '--model predicts with trained weights'),
    ([*MODEL, '--pretrained', 'features.pth', '--images', 'x.png'], "the weights in 'features.pth' have no classifier"),
    ([*MODEL, '--pretrained', 'best.pth', '--images', 'x.png'], "'best.pth' is a checkpoint of this toolkit; pass it "
                                                                "as --weights best.pth"),
    (['--weights', 'best.pth', '--data-root', 'x.png'], "--data-root 'x.png' is a file; it takes a folder of class "
                                                        "folders. To classify files, use --images x.png")])
def test_bad_sources_are_one_line(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new('RGB', (32, 32)).save('x.png')
    torch.save(timm.create_model('vit_tiny_patch16_224', num_classes=0, **TINY).state_dict(), 'features.pth')
    tiny_checkpoint(tmp_path / 'best.pth')
    assert predict.main(flags) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith('error:')][0].startswith(f'error: {message}')
    assert err.count('error:') == 1 and 'Traceback' not in err


def test_output_dir_is_replaced_whole_or_left_as_it_was(tmp_path, monkeypatch, capsys):
    weights, images = tiny_checkpoint(tmp_path / 'best.pth'), make_image_folder(tmp_path / 'img', per_class=1)
    out = tmp_path / 'out'
    flags = ['--weights', str(weights), '--images', str(images), '--workers', '0', '--output-dir', str(out)]
    out.mkdir()
    assert predict.main(flags) == 0                                   # an empty folder: nothing was replaced
    assert 'replaced the earlier one' not in capsys.readouterr().err
    (out / 'probabilities.npy').write_bytes(b'old')                   # an earlier run's --save-probs
    assert predict.main(flags) == 0
    assert f"(this output replaced the earlier one in '{out}')" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ['predictions.csv']  # not half old, half new
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.')) == []

    import utils.predictor
    written = utils.predictor.write_image_predictions

    def interrupted(*args, **kwargs):
        written(*args, **kwargs)
        raise KeyboardInterrupt                                       # Ctrl-C (or SIGTERM) mid-output
    monkeypatch.setattr(utils.predictor, 'write_image_predictions', interrupted)
    before = (out / 'predictions.csv').read_bytes()
    (out / 'predictions.csv').write_bytes(b'old')
    assert predict.main(flags + ['--save-probs']) == 130
    assert sorted(p.name for p in out.iterdir()) == ['predictions.csv']
    assert (out / 'predictions.csv').read_bytes() == b'old'
    assert not any(p.name.startswith('.') for p in tmp_path.iterdir()) and before != b'old'

    monkeypatch.undo()
    (tmp_path / 'link').symlink_to(out)                               # a link to the output folder stays one
    assert predict.main(flags[:-1] + [str(tmp_path / 'link')]) == 0
    assert (tmp_path / 'link').is_symlink() and (out / 'predictions.csv').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.')) == []
    (out / 'predictions.csv').write_bytes(b'old')
    (out / 'notes.txt').write_text('mine')                            # a folder that is not only an output
    for target, message in ((out, 'holds files other than an earlier output (notes.txt)'), (weights, 'is a file')):
        assert predict.main(flags[:-1] + [str(target)]) == 2
        assert f"error: --output-dir '{target}' {message}" in capsys.readouterr().err
    assert (out / 'notes.txt').read_text() == 'mine' and (out / 'predictions.csv').read_bytes() == b'old'


def test_an_output_dir_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    import utils.atomic_write
    from utils.atomic_write import replaced_folder
    from utils.errors import UserError

    def denied(path):
        raise PermissionError(13, 'Permission denied', str(path))
    (tmp_path / 'out').mkdir()
    monkeypatch.setattr(utils.atomic_write.os, 'listdir', denied)     # as a folder of another user, for non-root
    with pytest.raises(UserError, match=r"cannot read --output-dir '.*out' \(Permission denied\)"):
        with replaced_folder(tmp_path / 'out', (), '--output-dir'):
            pass


def test_an_existing_output_dir_stays_in_place(tmp_path):
    """A folder that exists (a container's mount point, a folder in a place the user may not write) is not moved:
    its earlier output and a killed run's staging folder are swapped for the new files inside it."""
    from utils.atomic_write import replaced_folder
    out = tmp_path / 'out'
    (out / '.partial-999').mkdir(parents=True)                        # left by a killed run
    (out / 'summary.json').write_text('old')
    inode = out.stat().st_ino
    with replaced_folder(out, ('summary.json', 'report.html'), '--output-dir') as staging:
        assert staging.parent == out
        (staging / 'report.html').write_text('new')
    assert out.stat().st_ino == inode and sorted(p.name for p in out.iterdir()) == ['report.html']
