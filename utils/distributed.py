"""Distributed helpers: one process per device under torchrun or torch.distributed.launch.

torchrun (and the legacy launcher with or without ``--use_env``) sets RANK, WORLD_SIZE and MASTER_*; the
legacy launcher without ``--use_env`` also passes ``--local-rank``, which the argument parser accepts.
NCCL on CUDA, gloo on the CPU. Collectives of the training step time out after ``--dist-timeout`` seconds
(torch's default without it); where processes wait on process 0's work of unknown length (the data scan, the run
folder, the demo data, the final report) they wait in a gloo group of ``WAIT_TIMEOUT``. Flags known on the host
(``any_process``: a batch that failed to load, a non-finite loss) go through a gloo group of their own, on the CPU:
asked every training step, they never wait for the GPU's queued work.
"""
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from utils.errors import UserError

log = logging.getLogger(__name__)
WAIT_TIMEOUT = timedelta(days=7)  # how long a process waits for process 0's work (a scan of any size)
_waiting_group = None  # the gloo group of those waits
_flag_group = None  # the gloo group of host-side flags (``any_process``), with the training step's timeout


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0, world_size: int = 1, cuda_available=None) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU.

    With several processes the launcher's local rank decides the GPU: an explicit ``cuda:N`` (also one
    restored from a resumed run's settings) would put every process on GPU N, so it gives a warning and
    the local rank's GPU is used.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == 'auto':
        return torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    device = torch.device(name)
    if device.type == 'cuda':
        if not cuda:
            raise UserError(f"--device {name} asked for, but PyTorch sees no CUDA device; use --device cpu")
        if device.index is not None and world_size > 1 and device.index != local_rank:
            if local_rank == 0:
                log.warning(f'--device {name} ignored under {world_size} processes: each process uses the GPU of '
                            f'its local rank (cuda:0, cuda:1, ...); choose GPUs with CUDA_VISIBLE_DEVICES')
            device = torch.device('cuda', local_rank)
        if device.index is None:
            device = torch.device('cuda', local_rank)
    return device


def init_distributed(device_name: str = 'auto', local_rank=None, timeout_s: Optional[float] = None) -> DistInfo:
    """Join the process group the launcher set up (if any), its collectives timing out after ``timeout_s``
    (torch's default when None), and pick this process's device."""
    global _waiting_group, _flag_group
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', local_rank if local_rank is not None else 0))
    device = pick_device(device_name, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank, world_size=world_size,
                                timeout=timeout)
        _waiting_group = dist.new_group(backend='gloo', timeout=WAIT_TIMEOUT)
        _flag_group = dist.new_group(backend='gloo', timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(values, device) -> torch.Tensor:
    """Sum a list of numbers over every process (unchanged in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (just ``flag`` in a single process). Reduced on the CPU in a gloo
    group, so that it syncs no device: under NCCL a device tensor's ``.item()`` would wait for the GPU every step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, group=_flag_group)
    return t.item() > 0


def gather_lists(items: list) -> list:
    """The lists ``items`` of every process, joined in rank order (``items`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` from process ``src`` on every process (over ``group``, the default group when None)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def on_main_process(fn, *args):
    """``fn(*args)`` run on process 0 only; its result, or the ``UserError`` it raised, on every process.

    So the other processes neither repeat the work (a data scan) nor wait forever when process 0 fails; they
    wait as long as it takes (``WAIT_TIMEOUT``), whatever ``--dist-timeout``.
    """
    outcome = None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        try:
            outcome = (fn(*args), None)
        except UserError as err:
            outcome = (None, err)
    result, err = broadcast_object(outcome, group=_waiting_group)
    if err is not None:
        raise err
    return result


def barrier() -> None:
    """Wait until every process is here, as long as it takes (``WAIT_TIMEOUT``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_waiting_group)


def cleanup() -> None:
    global _waiting_group, _flag_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _waiting_group = _flag_group = None
