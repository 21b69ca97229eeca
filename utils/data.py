"""Data loaders for training: distributed sharding, class balancing, and a val side without padding."""
import math
from typing import List, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datasets.folder import SafeImageDataset, Sample, collate_skipping
from utils.stop_signals import ignore_in_worker


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: every index on exactly one process, no padding (for evaluation)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class BalancedSampler(Sampler):
    """Draws each class equally often (sample weight 1 / class count), with replacement, per process.

    Each process draws len(dataset) / world_size indices from its own seeded generator; ``set_epoch``
    changes the draw like ``DistributedSampler.set_epoch``.
    """

    def __init__(self, targets: Sequence[int], rank: int, world_size: int, seed: int = 0):
        counts = torch.bincount(torch.tensor(targets))
        self.weights = 1.0 / counts[torch.tensor(targets)].double()
        self.num_samples = math.ceil(len(targets) / world_size)
        self.rank, self.seed, self.epoch = rank, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self):
        return self.num_samples


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Loss weights inversely proportional to class frequency, averaging 1 over the samples."""
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float().clamp(min=1)
    return len(targets) / (num_classes * counts)


def train_loader(samples: List[Sample], transform, batch_size: int, workers: int, rank: int,
                 world_size: int, seed: int, balance: str = 'none', pin_memory: bool = False) -> DataLoader:
    dataset = SafeImageDataset(samples, transform)
    if balance == 'sampler':
        sampler = BalancedSampler([t for _, t in samples], rank, world_size, seed)
    else:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    # drop the ragged last batch (Mixup needs an even batch), unless the data is smaller than a batch
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping, pin_memory=pin_memory,
                      drop_last=len(dataset) // world_size > batch_size, persistent_workers=workers > 0,
                      worker_init_fn=ignore_in_worker)


def eval_loader(samples: List[Sample], transform, batch_size: int, workers: int, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    dataset = SafeImageDataset(samples, transform)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, collate_fn=collate_skipping, pin_memory=pin_memory,
                      persistent_workers=workers > 0, worker_init_fn=ignore_in_worker)
