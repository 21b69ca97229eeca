"""export.py: ONNX / TorchScript files of dense and token-reduced checkpoints give predict.py's probabilities."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, make_image_folder
from models.factory import build_model

pytest.importorskip('onnxruntime')
KW = dict(patch_size=8, depth=4, embed_dim=64, num_heads=2)
METHOD_CFG = {'none': None, 'tome': dict(r=3), 'gtp': dict(num_prop=3), 'mtvit': dict(keep_rate=0.7), 'toe': None}
METHOD_FLAGS = {'none': [], 'tome': ['--tome-r', '3'], 'gtp': ['--gtp-num-prop', '3'],
                'mtvit': ['--mtvit-keep-rate', '0.7'], 'toe': []}
# a batch of 4 (12 images: 3 batches); ToMe with any batch size (torch.export with a free batch takes twice as long)
BATCH = {'none': 4, 'tome': None, 'gtp': 4, 'mtvit': 4, 'toe': 4}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A dense toolkit checkpoint of a tiny ViT (random weights, a trained-looking head) and labelled images."""
    from datasets.transforms import data_config
    from models.checkpoint import make_checkpoint, save_atomic
    root = tmp_path_factory.mktemp('export')
    torch.manual_seed(0)
    model = build_model('vit_tiny_patch16_224', num_classes=3, **TINY)
    with torch.no_grad():
        model.head.weight.mul_(20)  # confident, distinct probabilities: a 1e-3 check that means something
    meta = dict(model_name='vit_tiny_patch16_224', model_kwargs=KW, method='none', method_cfg={}, num_classes=3,
                class_names=['checker', 'stripes_h', 'stripes_v'], data_config=data_config(model, 32))
    save_atomic(make_checkpoint(meta, model.state_dict()), root / 'best.pth')
    return root / 'best.pth', make_image_folder(root / 'images', per_class=4)


@pytest.mark.parametrize('method', list(METHOD_FLAGS))
def test_onnx_gives_predicts_probabilities(method, checkpoint, tmp_path, capsys):
    import onnxruntime as ort
    from datasets.folder import image_files
    from models.factory import load_for_inference
    from utils.export import input_batch
    from utils.predictor import predict
    import export
    weights, images = checkpoint
    out = tmp_path / f'{method}.onnx'
    flags = [] if method == 'none' else ['--method', method, *METHOD_FLAGS[method]]
    batch = BATCH[method]
    shape = ['--batch-size', str(batch)] if batch else ['--dynamic-batch']
    assert export.main(['--weights', str(weights), '--output', str(out), *shape,
                        '--check-images', str(images), *flags]) == 0
    assert 'top-1 agreement 100.0%' in capsys.readouterr().out
    # predict.py's probabilities on the same files, with the same method override
    model, meta = load_for_inference(weights, 'cpu', None if method == 'none' else method, METHOD_CFG[method])
    files = image_files([str(images)])
    ours = predict(model, [(f, 0) for f in files], meta['data_config'], 'cpu', progress=False)
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    inputs = input_batch(files, meta['data_config'], len(files)).numpy()
    logits = np.concatenate([session.run(None, {'images': part})[0]
                             for part in np.split(inputs, len(files) // (batch or len(files)))])
    theirs = torch.from_numpy(logits).softmax(1).numpy()
    assert np.abs(theirs - ours.probs).max() < 1e-3
    assert (theirs.argmax(1) == ours.probs.argmax(1)).all()
    info = json.loads(out.with_name(out.name + '.json').read_text())
    assert info['method'] == method and info['input_size'] == [3, 32, 32] and info['batch_size'] == (batch or 'dynamic')
    assert info['classes'] == ['checker', 'stripes_h', 'stripes_v'] and info['opset'] == 18
    assert set(info) >= {'mean', 'std', 'interpolation', 'crop_pct', 'torch', 'timm', 'method_cfg', 'model'}
    assert info['check']['images'] == len(files) and info['check']['max_prob_diff'] < 1e-3
    if method == 'tome':
        assert info['method_cfg']['r'] == 3


def test_torchscript_at_a_fixed_batch_and_another_size(checkpoint, tmp_path, capsys):
    import export
    weights, _ = checkpoint
    out = tmp_path / 'model.pt'
    assert export.main(['--weights', str(weights), '--format', 'torchscript', '--output', str(out),
                        '--batch-size', '4', '--img-size', '48', '--method', 'tome', '--tome-r', '4']) == 0
    module = torch.jit.load(str(out))
    assert module(torch.randn(4, 3, 48, 48)).shape == (4, 3)
    info = json.loads((tmp_path / 'model.pt.json').read_text())
    assert info['batch_size'] == 4 and info['input_size'] == [3, 48, 48] and info['opset'] is None
    assert info['check']['max_prob_diff'] < 1e-3


def test_dge_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    import export
    weights, _ = checkpoint
    assert export.main(['--weights', str(weights), '--method', 'dge', '--output', str(tmp_path / 'd.onnx')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: a DGE model cannot be exported') and '\n' not in err
    assert not (tmp_path / 'd.onnx').exists()


def test_missing_onnx_and_bad_output(checkpoint, tmp_path, capsys, monkeypatch):
    import sys
    import export
    weights, _ = checkpoint
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # as if it were not installed
    assert export.main(['--weights', str(weights), '--output', str(tmp_path / 'm.onnx')]) == 2
    assert 'pip install -r requirements-export.txt' in capsys.readouterr().err
    monkeypatch.undo()
    assert export.main(['--weights', str(weights), '--output', str(weights)]) == 2
    assert 'is the checkpoint itself' in capsys.readouterr().err
    assert export.main(['--weights', str(weights), '--tome-r', '4']) == 2
    assert 'add --method' in capsys.readouterr().err


def test_benchmark_rows_in_onnxruntime(tmp_path):
    import pandas as pd
    import benchmark
    out = tmp_path / 'bench'
    assert benchmark.main(['--model', 'vit_tiny_patch16_224', '--img-size', '32', '--model-kwargs', 'patch_size=8',
                           'depth=4', 'embed_dim=64', 'num_heads=2', '--batch-size', '4', '--runs', '2',
                           '--warmup', '1', '--methods', 'dge', '--runtime', 'torch', 'onnxruntime',
                           '--output-dir', str(out)]) == 0
    table = pd.read_csv(out / 'benchmark.csv')
    assert list(table['method']) == ['none', 'dge']  # each method's ONNX export is tested above
    assert table.loc[0, 'ort_images_per_s'] > 0 and np.isnan(table.loc[1, 'ort_images_per_s'])
    assert table.loc[0, 'ort_speedup'] == 1.0


def test_an_existing_file_is_replaced_only_by_a_checked_one(checkpoint, tmp_path, capsys, monkeypatch):
    import export
    import utils.export
    weights, _ = checkpoint
    out = tmp_path / 'model.pt'
    flags = ['--weights', str(weights), '--format', 'torchscript', '--output', str(out)]
    out.write_bytes(b'served model')
    (tmp_path / 'model.pt.json').write_text('{"method": "none"}')
    written = utils.export.export_model

    def stopped(model, example, path, fmt, dynamic):
        written(model, example, path, fmt, dynamic)
        raise KeyboardInterrupt                                       # Ctrl-C (or SIGTERM) after the file is written
    monkeypatch.setattr(utils.export, 'export_model', stopped)
    assert export.main([*flags, '--method', 'tome', '--tome-r', '4']) == 130
    monkeypatch.undo()
    monkeypatch.setattr(utils.export, 'compare', lambda *a: utils.export.Agreement(8, 0.5, 0.5))
    assert export.main([*flags, '--method', 'tome', '--tome-r', '4']) == 2  # a file that fails its check
    assert 'does not reproduce the PyTorch model' in capsys.readouterr().err
    assert out.read_bytes() == b'served model' and (tmp_path / 'model.pt.json').read_text() == '{"method": "none"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt', 'model.pt.json']  # no temporary file left
    assert export.main([*flags[:-1], str(tmp_path)]) == 2
    assert f"error: --output '{tmp_path}' is a folder" in capsys.readouterr().err
