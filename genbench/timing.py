"""Sampling cost: img/s, ms/img, NFE and peak memory, timed with device synchronisation.

The first batch of a timed pass is a warm-up (kernel selection, allocator growth, lazy init) and is
left out of the rate whenever there is more than one batch.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """CUDA: peak allocated by torch since the last reset. CPU: the process's peak resident set
    (a whole-process figure, so it includes the data and the extractor)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class SamplingTimer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.times: list[tuple[int, float]] = []   # (images, seconds) per batch
        reset_peak_memory(self.device)

    @contextmanager
    def batch(self, n: int):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.times.append((n, time.perf_counter() - t0))

    def summary(self, nfe: int, batch_size: int) -> dict:
        timed = self.times[1:] if len(self.times) > 1 else self.times
        n = sum(k for k, _ in timed)
        s = sum(t for _, t in timed)
        return {"img_per_s": n / s if s > 0 else None, "ms_per_img": 1000 * s / n if n else None,
                "nfe": nfe, "peak_mem_mb": peak_memory_mb(self.device), "batch_size": batch_size,
                "device": str(self.device), "timed_images": n, "warmup_batches": len(self.times) - len(timed)}

