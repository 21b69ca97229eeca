"""What every token-reduction method owes (../shared/DESIGN.md): one test, many methods and backbones.

Switched off, a method gives the dense logits; switched on, it runs with batch size 1, under gradient
checkpointing (same outputs and gradients), keeps its settings changeable between forwards, and trains.
"""
import pytest
import torch

from conftest import TINY
from models import build_model
from models.registry import available_methods

# settings that switch each method off (at build time, then at run time), and settings that make it reduce
# tokens on the tiny models
OFF = {'tome': (dict(r=0), {}), 'gtp': (dict(num_prop=0), {}), 'mtvit': (dict(keep_rate=1.0, multi_scale=False), {}),
       'toe': (dict(stage=2), {}), 'dge': ({}, dict(force_split='finest'))}
ON = {'tome': dict(r=2), 'gtp': dict(num_prop=2), 'mtvit': dict(keep_rate=0.5), 'toe': dict(stage=0),
      'dge': dict(budget=0.5)}
BACKBONES = {
    'plain': ('vit_tiny_patch16_224', {}),
    'layerscale': ('vit_tiny_patch16_224', dict(init_values=0.1)),
    'qk_norm': ('vit_tiny_patch16_224', dict(qk_norm=True)),
    'registers': ('vit_tiny_patch16_224', dict(reg_tokens=2)),
    'distilled': ('deit_tiny_distilled_patch16_224', {}),
    'avg_pool': ('vit_tiny_patch16_224', dict(global_pool='avg', class_token=False)),
}
METHODS = [m for m in available_methods() if m in OFF]


def tiny(name, method='none', cfg=None, **kw):
    return build_model(name, method, cfg, num_classes=5, **{**TINY, 'img_size': 64, **kw})


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('method', METHODS)
def test_switched_off_equals_dense(method, backbone):
    name, kw = BACKBONES[backbone]
    dense = tiny(name, **kw).eval()
    reduced = tiny(name, method, OFF[method][0], **kw).eval()
    reduced.configure(**OFF[method][1])
    missing, unexpected = reduced.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (dense(x) - reduced(x)).abs().max().item() <= 1e-5


@pytest.mark.timm_floor
@pytest.mark.parametrize('method', METHODS)
def test_batch_of_one_and_gradient_checkpointing(method):
    torch.manual_seed(0)
    model = tiny('vit_tiny_patch16_224', method, ON[method]).train()
    x = torch.randn(1, 3, 64, 64)
    outputs, grads = [], []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(x)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append(model.blocks[-1].mlp.fc2.weight.grad.clone())
        model.zero_grad()
    assert outputs[0].shape == (1, 5)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize('method', METHODS)
def test_loss_falls_on_a_learnable_task(method):
    torch.manual_seed(0)
    model = tiny('vit_tiny_patch16_224', method, ON[method]).train()
    x = torch.randn(16, 3, 64, 64)
    y = torch.arange(16) % 5
    x[:, 0] += y[:, None, None] * 0.5  # the class shows in the red channel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_registry_answers_for_every_method():
    from models.registry import new_param_lr_scale, token_maps_in_training
    for method in METHODS:
        model = tiny('vit_tiny_patch16_224', method, ON[method])
        assert token_maps_in_training(model) == (method == 'toe')
        assert new_param_lr_scale(model) >= 1.0
    assert new_param_lr_scale(tiny('vit_tiny_patch16_224')) == 1.0
