"""Our ToMe, GTP, ToE, EViT (MTViT without multi-scale, fusion 'fuse') and MTViT give the official code's logits
(tests/fixtures/oracle_*.pt, written by tools/oracles/run.py --save-fixture from the official repositories) on the
same seeded tiny ViT and inputs (each oracle's ``CASE``, by default ``TINY_CASE``); EfficientTrain's crop and stage
schedule equal the official ones (tests/fixtures/oracle_efficienttrain.pt, from tools/oracles/efficienttrain_oracle.py).
"""
import functools
import importlib

import pytest
import torch

from tools.oracles.common import FIXTURES, TINY_CASE, our_model, tiny_case
from tools.oracles.efficienttrain_oracle import max_relative, our_schedule
from utils.curriculum import freq_crop

CASES = [(method, i) for method in ('tome', 'gtp', 'toe', 'evit', 'mtvit')
         for i in range(len(torch.load(FIXTURES / f'oracle_{method}.pt', weights_only=True)))]


@functools.lru_cache
def case(method):
    return tiny_case(getattr(importlib.import_module(f'tools.oracles.{method}_oracle'), 'CASE', TINY_CASE))


@pytest.mark.parametrize('method, index', CASES)
def test_logits_equal_the_official_code(method, index):
    dense, images = case(method)
    saved = torch.load(FIXTURES / f'oracle_{method}.pt', weights_only=True)[index]
    cfg = {k: v for k, v in saved.items() if k != 'logits'}
    oracle = importlib.import_module(f'tools.oracles.{method}_oracle')
    model = our_model(dense, getattr(oracle, 'METHOD', method), cfg, oracle.TRAINING)
    with torch.no_grad():
        logits = model(images)
    official = saved['logits']
    assert logits.argmax(-1).tolist() == official.argmax(-1).tolist()
    relative = (logits - official).abs().amax(-1) / official.abs().amax(-1)
    assert relative.max().item() <= 1e-5, f'{method} {cfg}: {relative.tolist()}'


def test_efficienttrain_crop_and_schedule_equal_the_official_code():
    saved = torch.load(FIXTURES / 'oracle_efficienttrain.pt', weights_only=True)
    for case in saved['crops']:
        assert max_relative(freq_crop(case['images'], case['band']), case['official']) <= 1e-5
    for epochs, schedule in saved['schedules'].items():
        assert our_schedule(epochs) == [tuple(row) for row in schedule.tolist()], epochs
