"""ToE: the selector, token counts in training, stages from the schedule, dense evaluation."""
import pytest
import torch

from conftest import TINY
from models import build_model
from models.toe import expansion_counts, seed_indices, select_tokens

SIXTY_FOUR = {**TINY, 'img_size': 64}


def test_training_at_keep_half_uses_half_the_tokens_after_block_one():
    model = build_model('vit_tiny_patch16_224', 'toe', dict(stage=0), num_classes=3, **SIXTY_FOUR).train()
    counts = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, i, o: counts.append(o.shape[1]))
    model(torch.randn(2, 3, 64, 64))
    assert counts == [1 + 64, 1 + 32, 1 + 32, 1 + 32]
    counts.clear()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert counts == [65] * 4


def test_last_stage_in_training_is_the_dense_model():
    dense = build_model('vit_tiny_patch16_224', num_classes=3, **SIXTY_FOUR).train()
    model = build_model('vit_tiny_patch16_224', 'toe', dict(stage=2), num_classes=3, **SIXTY_FOUR).train()
    model.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert (model(x) - dense(x)).abs().max() <= 1e-5


def test_selector_seeds_at_the_official_stride_then_adds_the_least_similar():
    tokens = torch.zeros(1, 8, 2)
    tokens[0, :, 0] = 1.0
    tokens[0, 5] = torch.tensor([0.0, 1.0])  # the odd one out
    seeds = seed_indices(8, 0.25, 'cpu')
    assert seeds.tolist() == [0, 4]  # every int(1 // 0.25) = 4th token, int(8 * 0.25) = 2 of them
    assert select_tokens(tokens, seeds, [1]).tolist() == [[0, 4, 5]]


def test_expansion_sub_steps_follow_the_official_selector():
    assert len(seed_indices(196, 0.25, 'cpu')) == 49
    assert expansion_counts(196, [0.5, 0.75, 1.0], 0.25, stage=0, substeps=2) == [24, 25]
    assert expansion_counts(196, [0.5, 0.75, 1.0], 0.25, stage=1, substeps=2) == [24, 25, 24, 25]
    # per-increment int, not round: int(196 * 0.3) = 58 seeds, then int(196 * (0.6 - 0.3)) = 58 tokens
    assert len(seed_indices(196, 0.3, 'cpu')) == 58
    assert expansion_counts(196, [0.6, 0.8, 0.9], 0.3, stage=2, substeps=1) == [58, 39, 20]


@pytest.mark.parametrize('epoch, stage', [(0, 0), (9.9, 0), (10, 1), (19.9, 1), (20.2, 2), (29, 2)])
def test_stage_follows_fractions_of_training(epoch, stage):
    model = build_model('vit_tiny_patch16_224', 'toe', dict(steps=(0, 1 / 3, 2 / 3)), num_classes=3, **TINY).train()
    model.update_schedule(epoch, 30)
    assert model.method_stats() == dict(stage=stage, keep_rate=[0.5, 0.75, 1.0][stage])


@pytest.mark.parametrize('cfg, message', [(dict(keep_rate=(0.5, 1.0)), 'one value per stage'),
                                          (dict(steps=(0, 0.7, 0.5)), 'increase'),
                                          (dict(init_keep_rate=0.9), 'init_keep_rate')])
def test_bad_schedules_are_clear(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model('vit_tiny_patch16_224', 'toe', cfg, num_classes=3, **TINY)
