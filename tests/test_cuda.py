"""The GPU path, marked ``cuda`` and skipped without a CUDA GPU (tools/gpu_check.sh runs them and prints a table).

Every method's training forward and backward under AMP bf16 and fp16 (and its evaluation forward), under
channels_last (the same logits as contiguous), and under torch.compile with inductor (the eager logits); train_gpu.py
with --compile --channels-last --model-ema under AMP; a 2-GPU torchrun run over NCCL (skipped below 2 GPUs); and
benchmark.py --device cuda, eager and compiled.
"""
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import benchmark
import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from test_benchmark import TINY_BENCH
from test_method_contract import METHODS, ON, tiny
from test_train import REPO, _free_port, read_log

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

ALL = ['none', *METHODS]
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def cuda_model(method):
    """The method's tiny model (reducing tokens: ``ON``'s settings, 64 px) on the GPU."""
    return tiny('vit_tiny_patch16_224', method, ON.get(method)).cuda()


def images(memory_format=torch.contiguous_format):
    return torch.randn(4, 3, 64, 64, device='cuda').contiguous(memory_format=memory_format)


def train_step(model, x, dtype=None) -> torch.Tensor:
    """One training forward and backward (under autocast with ``dtype``); the logits, after checking that every
    gradient is finite and the head's is not all zero."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(len(x), device='cuda') % logits.shape[1])
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if 'head' in name)
    return logits


@pytest.mark.parametrize('precision', DTYPES)
@pytest.mark.parametrize('method', ALL)
def test_amp_forward_and_backward(method, precision):
    dtype = DTYPES[precision]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bf16')
    model = cuda_model(method)
    x = images()
    assert torch.isfinite(train_step(model, x, dtype)).all()
    model.eval()
    with torch.no_grad(), torch.autocast('cuda', dtype=dtype):
        logits = model(x)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize('method', ALL)
def test_channels_last_gives_the_contiguous_logits(method, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # both sides in full fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    model = cuda_model(method).eval()
    x = images()
    with torch.no_grad():
        contiguous = model(x)
        model.to(memory_format=torch.channels_last)
        last = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(last, contiguous, atol=1e-4, rtol=1e-4)
    train_step(model, images(torch.channels_last))


@pytest.mark.parametrize('method', ALL)
def test_inductor_gives_the_eager_logits_and_trains(method):
    torch._dynamo.reset()  # a fresh cache: earlier tests' entries would count towards dynamo's recompile limit
    model = cuda_model(method).eval()
    counter = CompileCounterWithBackend('inductor')
    compiled = torch.compile(model, backend=counter)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    assert counter.frame_count >= 1  # it compiled, rather than fell back to eager
    assert torch.isfinite(train_step(compiled, x)).all()


def test_train_gpu_compiled_channels_last_amp(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=8)
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(data), '--output-dir', str(run), '--epochs', '2', '--device', 'cuda',
                           '--compile', '--channels-last', '--model-ema', *TINY_FLAGS]) == 0
    rows = read_log(run)
    assert len(rows) == 2 and all(float(r['train_images_per_s']) > 0 for r in rows)
    ckpt = torch.load(run / 'last.pth', map_location='cpu', weights_only=True)
    assert not [k for k in ckpt['model'] if k.startswith('_orig_mod')]
    assert ckpt['val']['val_images'] == 5  # the stratified 20 % of 24 images, each once


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs')
def test_two_gpu_torchrun_over_nccl(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=15)  # 9 val images: odd, so padding would show
    run = tmp_path / 'run'
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                             f'--master_port={_free_port()}', str(REPO / 'train_gpu.py'), '--data-root', str(data),
                             '--output-dir', str(run), '--epochs', '1', '--device', 'cuda', *TINY_FLAGS],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'on cuda:0, world size 2' in (run / 'train.log').read_text()
    ckpt = torch.load(run / 'last.pth', map_location='cpu', weights_only=True)
    assert ckpt['val']['val_images'] == 9 and len(ckpt['rng']) == 2


@pytest.mark.parametrize('compiled', [False, True], ids=['eager', 'compiled'])
def test_benchmark_on_cuda(compiled, tmp_path):
    methods = ALL if not compiled else ['none', 'tome']
    assert benchmark.main([*TINY_BENCH, '--device', 'cuda', '--methods', *methods, '--warmup', '1', '--output-dir',
                           str(tmp_path), *(['--compile'] if compiled else [])]) == 0
    table = pd.read_csv(tmp_path / 'benchmark.csv')
    assert list(table['method']) == methods
    assert (table['images_per_s'] > 0).all() and (table['peak_mem_mib'] > 0).all()
    assert 'AMP' in (tmp_path / 'benchmark.md').read_text()
