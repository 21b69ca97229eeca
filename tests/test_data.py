"""Folder scanning, splits and samplers."""
import torch

from conftest import make_image_folder
from datasets.folder import make_split
from utils.data import BalancedSampler, ShardSampler, class_weights


def test_stratified_split_is_seeded_and_disjoint(tmp_path):
    root = make_image_folder(tmp_path / 'd', per_class=10)
    a, b = make_split(root, 0.2, seed=1), make_split(root, 0.2, seed=1)
    assert a.train == b.train and a.val == b.val
    assert not set(a.train) & set(a.val) and len(a.train) + len(a.val) == 30
    assert sorted(t for _, t in a.val) == [0, 0, 1, 1, 2, 2]  # 20 % of every class
    assert make_split(root, 0.2, seed=2).val != a.val


def test_train_val_folders_are_used_as_given(tmp_path):
    make_image_folder(tmp_path / 'd' / 'train', per_class=4)
    make_image_folder(tmp_path / 'd' / 'val', per_class=2, seed=1)
    split = make_split(tmp_path / 'd')
    assert len(split.train) == 12 and len(split.val) == 6
    assert all('/val/' in p for p, _ in split.val)


def test_shard_sampler_covers_each_index_once():
    shards = [list(ShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_balanced_sampler_and_weights_even_out_skewed_classes():
    targets = [0] * 90 + [1] * 10
    drawn = torch.tensor(list(BalancedSampler(targets, rank=0, world_size=1, seed=0)))
    share_minor = (torch.tensor(targets)[drawn] == 1).float().mean().item()
    assert 0.35 < share_minor < 0.65
    w = class_weights(targets, 2)
    assert w[1] / w[0] == 9 and torch.isclose((w[torch.tensor(targets)]).mean(), torch.tensor(1.0))
