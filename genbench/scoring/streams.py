"""A model's samples as batches: images 0..n-1 of a run seed, one seed per image, so the batch size
never changes an image; and the same samples as uint8, the only form scoring takes.

Every batch a family returns is checked here (shape [n, *spec.shape], finite, images within [-1, 1] up
to SAMPLE_TOL): a plug-in that breaks the contract fails its run with a ValueError that says how, and
the runner records the run as failed while the suite goes on. genbench.conformance uses the same checks."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable

import torch

from genbench.data import to_uint8
from genbench.fastpath import FastPath, autocast
from genbench.families.base import DataSpec, GenerativeModel
from genbench.rng import SeedRNG
from genbench.timing import SamplingTimer


SAMPLE_TOL = 1e-3    # float rounding above 1 or below -1 that is tolerated (one 8-bit level is 2/255)


def shape_problem(x, n: int, spec: DataSpec) -> str | None:
    """What is wrong with the shape of sample()'s result for n samples of `spec` ("returned ..."), or None."""
    want = [n, *spec.shape]
    if not torch.is_tensor(x):
        return f"returned a {type(x).__name__}, not a tensor {want}"
    if list(x.shape) != want:
        return f"returned shape {list(x.shape)} for {n} samples; expected {want}"
    if not x.is_floating_point():
        return f"returned {str(x.dtype).replace('torch.', '')} samples; expected floats"
    return None


def range_problem(x: torch.Tensor, spec: DataSpec) -> str | None:
    """Non-finite values, or images outside [-1, 1] (beyond SAMPLE_TOL), or None."""
    finite = torch.isfinite(x)
    if not finite.all():
        return f"returned {int((~finite).sum())} NaN/inf values"
    if spec.is_image and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - SAMPLE_TOL or hi > 1 + SAMPLE_TOL:
            return f"returned images in [{lo:.4g}, {hi:.4g}]; images must lie in [-1, 1]"
    return None


def check_samples(model: GenerativeModel, x, n: int) -> None:
    """ValueError naming the family's class when a batch breaks the sampling contract."""
    problem = shape_problem(x, n, model.spec) or range_problem(x, model.spec)
    if problem is not None:
        raise ValueError(f"{type(model).__name__}.sample() {problem}")


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """Label of image k is k mod C: depends on the image index only, so batching changes nothing."""
    return torch.arange(offset, offset + n) % num_classes


def sample_stream(model: GenerativeModel, n: int, seed: int, batch_size: int, sampler: dict,
                  timer: SamplingTimer | None = None, progress: Callable[[int], None] | None = None,
                  fast: FastPath | None = None, start: int = 0, labels: torch.Tensor | None = None):
    """Yield batches of samples (model output range, float32) for images start..start+n-1 of run seed
    `seed`. A conditional model gets `labels` (one per image) when given, else label k mod C for image k."""
    device = model.device
    fast = fast or FastPath()
    rng = SeedRNG.for_run(seed, n, device=device, offset=start)
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images")
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        y = None
        if model.conditional:
            y = (labels[i:j] if labels is not None else balanced_labels(j - i, model.spec.num_classes, start + i))
            y = y.to(device)
        with torch.no_grad(), autocast(device, fast), (timer.batch(j - i) if timer else nullcontext()):
            x = model.sample(rng[i:j], labels=y, **sampler)
        check_samples(model, x, j - i)
        x = x.float()
        if progress:
            progress(j - i)
        yield x


def uint8_batches(stream: Iterable[torch.Tensor], keep: int = 0, kept: list | None = None):
    """Float samples in [-1, 1] -> uint8 batches, refusing NaN/inf; the first `keep` images are copied to
    the host into `kept` (a list the caller passes) for the run's sample grid."""
    have = 0
    for x in stream:
        if not torch.isfinite(x).all():
            raise FloatingPointError("samples hold NaN/inf")
        u8 = to_uint8(x)
        if keep and kept is not None and have < keep:
            kept.append(u8[: keep - have].cpu())
            have += len(kept[-1])
        yield u8
