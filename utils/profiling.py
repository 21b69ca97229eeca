"""Cost of a model: MACs (torchprofile), throughput and latency (median of timed runs), peak memory.

MACs come from tracing one image at a time, so methods whose work depends on the image (DGE's routing)
are counted for the routing each image actually took; ops torchprofile has no handler for are returned,
so a figure never hides what it left out.
"""
import os
import resource
import statistics
import time
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torchprofile import profile_macs


# ops torchprofile has no handler for that do no multiply-accumulate work (views, indexing, sorting)
NO_MAC_OPS = {'aten::unbind', 'aten::sort', 'aten::argsort', 'aten::topk', 'aten::gather', 'aten::scatter',
              'aten::scatter_add', 'aten::scatter_reduce', 'aten::index_select', 'aten::masked_fill',
              'aten::where', 'aten::argmax', 'aten::max', 'aten::amax', 'aten::full', 'aten::ones_like',
              'aten::fill_', 'aten::new_ones', 'aten::new_zeros', 'aten::eye', 'aten::__and__', 'aten::bitwise_not',
              'aten::diagonal', 'aten::maximum', 'aten::repeat', 'aten::scatter_', 'aten::clamp_min',
              'aten::zeros_like', 'aten::expand_as', 'aten::repeat_interleave', 'aten::log', 'aten::sqrt'}


def count_macs(model: nn.Module, images: Iterable[torch.Tensor]) -> Tuple[float, List[str]]:
    """Mean MACs per image over ``images`` (each [3, H, W]) and the ops torchprofile skipped that may
    hold MACs (those in ``NO_MAC_OPS`` are known to hold none)."""
    model.eval()
    totals, skipped = [], set()
    for image in images:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter('always')
            totals.append(profile_macs(model, image[None]))
        skipped.update(str(w.message).split('"')[1] for w in caught if 'No handlers found' in str(w.message))
    return sum(totals) / len(totals), sorted(skipped - NO_MAC_OPS)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == 'cuda':
        torch.cuda.synchronize(device)


def images_per_second(step, images: int, runs: int = 10, warmup: int = 3, device=None) -> float:
    """Median images/s of ``runs`` timed calls of ``step()`` (each handling ``images``) after ``warmup``."""
    times = []
    for i in range(warmup + runs):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def time_forward(model: nn.Module, batch: torch.Tensor, runs: int = 10, warmup: int = 3,
                 amp_dtype=None, train: bool = False) -> float:
    """Median images/s of ``runs`` timed calls after ``warmup``; forward only, or forward + backward."""
    device = batch.device
    model.train(train)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def step():
        if train:
            with autocast:
                out = model(batch)
            out.float().logsumexp(dim=1).mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast:
                model(batch)
    return images_per_second(step, batch.shape[0], runs, warmup, device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's max-allocated counter, or the process's peak RSS (Linux clear_refs)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max allocated, or the process's peak resident memory since ``reset_peak_memory``."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_description(device: torch.device) -> str:
    """What the figures were measured on: GPU name, or CPU model and threads."""
    import platform
    import timm
    if device.type == 'cuda':
        where = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
        except (OSError, StopIteration):
            pass
        where = f'{model}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)'
    return f'{where}; torch {torch.__version__}, timm {timm.__version__}'
