"""Our ToMe, GTP, ToE and EViT (MTViT without multi-scale, fusion 'fuse') give the official code's logits (tests/fixtures/oracle_*.pt, written by
tools/oracles/run.py --save-fixture from the official repositories) on the same seeded tiny ViT and inputs."""
import copy
import importlib

import pytest
import torch

from models.registry import apply_method
from tools.oracles.common import FIXTURES, tiny_case

CASES = [(method, i) for method in ('tome', 'gtp', 'toe', 'evit')
         for i in range(len(torch.load(FIXTURES / f'oracle_{method}.pt', weights_only=True)))]


@pytest.fixture(scope='module')
def case():
    return tiny_case()


@pytest.mark.parametrize('method, index', CASES)
def test_logits_equal_the_official_code(method, index, case):
    dense, images = case
    saved = torch.load(FIXTURES / f'oracle_{method}.pt', weights_only=True)[index]
    cfg = {k: v for k, v in saved.items() if k != 'logits'}
    oracle = importlib.import_module(f'tools.oracles.{method}_oracle')
    model = apply_method(copy.deepcopy(dense), getattr(oracle, 'METHOD', method), cfg).train(oracle.TRAINING)
    with torch.no_grad():
        logits = model(images)
    official = saved['logits']
    assert logits.argmax(-1).tolist() == official.argmax(-1).tolist()
    relative = (logits - official).abs().amax(-1) / official.abs().amax(-1)
    assert relative.max().item() <= 1e-5, f'{method} {cfg}: {relative.tolist()}'
