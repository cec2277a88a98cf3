"""One evaluation point of a model: sample n images (one seed per image), hand them to the scoring path
as uint8 batches, and time the sampler. Used by suite runs (main point and sweeps) and by
`genbench eval --run`; `genbench eval --samples` enters the same scoring path with files instead.

Under torchrun at world N > 1 a point is sharded (genbench/distributed.py): rank r samples and extracts
its contiguous block of the point's batches (each image in the batch it has at world 1, with its own
seed), the features (or 2-D points) are gathered in image order, rank 0 scores them with the same code
as one process and every rank returns rank 0's metrics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from genbench import distributed as gdist
from genbench.data import Data
from genbench.fastpath import FastPath
from genbench.families.base import GenerativeModel
from genbench.scoring import (Extractor, Reference, extract, sample_stream, score_features, score_images, score_points,
                              uint8_batches)
from genbench.timing import SamplingTimer


@dataclass(frozen=True)
class PointSettings:
    """How a point is evaluated: counts, batch size and the groups to compute (a suite's eval block)."""
    n_fake: int
    batch_size: int
    groups: tuple[str, ...]
    kid_subset_size: int = 1000


def evaluate_point(model: GenerativeModel, sampler: dict, seed: int, settings: PointSettings, ref: Data,
                   extractor: Extractor | None, reference: Reference | None, *, fast: FastPath | None = None,
                   progress: bool = False, keep: int = 0, timed: bool = True,
                   ) -> tuple[dict, dict, torch.Tensor | None]:
    """(metrics, sampling cost, the first `keep` samples as uint8 images or float points)."""
    if gdist.current() is not None:
        return _evaluate_sharded(model, sampler, seed, settings, ref, extractor, reference, fast=fast,
                                 progress=progress, keep=keep, timed=timed)
    fast = fast or FastPath()
    timer = SamplingTimer(model.device) if timed else None
    bar = tqdm(total=settings.n_fake, desc="sample", unit="img", disable=not progress, leave=False)
    stream = sample_stream(model, settings.n_fake, seed, settings.batch_size, sampler, timer, bar.update, fast)
    kept: list[torch.Tensor] = []
    if not ref.is_image:   # 2-D points: mode statistics against the mixture's known modes
        pts = torch.cat([x.float().cpu() for x in stream])
        metrics = score_points(pts, ref, settings.groups)
        grid = pts[:keep] if keep else None
    else:
        metrics = score_images(uint8_batches(stream, keep, kept), extractor=extractor, reference=reference,
                               groups=settings.groups, seed=seed, kid_subset_size=settings.kid_subset_size)
        grid = torch.cat(kept) if kept else None
    bar.close()
    sampling = {}
    if timer is not None:
        sampling = {**timer.summary(model.nfe(**sampler), settings.batch_size), "sampler": sampler,
                    "fast_path": fast.describe(model.device)}
    return metrics, sampling, grid


def _evaluate_sharded(model: GenerativeModel, sampler: dict, seed: int, settings: PointSettings, ref: Data,
                      extractor: Extractor | None, reference: Reference | None, *, fast: FastPath | None,
                      progress: bool, keep: int, timed: bool) -> tuple[dict, dict, torch.Tensor | None]:
    """evaluate_point at world N > 1: this rank's batches, gathered in image order; rank 0 scores (it
    alone needs `reference`), every rank gets its metrics and the kept samples."""
    d = gdist.current()
    fast = fast or FastPath()
    lo, hi = gdist.shard(settings.n_fake, settings.batch_size)
    timer = SamplingTimer(model.device) if timed else None
    bar = tqdm(total=hi - lo, desc="sample", unit="img", disable=not progress, leave=False)
    stream = sample_stream(model, hi - lo, seed, settings.batch_size, sampler, timer, bar.update, fast, start=lo)
    keep_here = max(0, min(keep, hi) - lo)   # the images with index < keep that this rank makes
    metrics: dict = {}
    if not ref.is_image:
        local = [x.float().cpu() for x in stream]
        pts = gdist.gather_rows(torch.cat(local) if local else None)
        if d.main:
            metrics = score_points(pts if pts is not None else torch.zeros(0, 2), ref, settings.groups)
        grid = pts[:keep] if keep and pts is not None else None
    else:
        kept: list[torch.Tensor] = []
        feats = extract(extractor, uint8_batches(stream, keep_here, kept), to_cpu=False) if hi > lo else None
        every = {layer: gdist.gather_rows(feats[layer] if feats is not None else None, extractor.device)
                 for layer in extractor.layers}
        shown = gdist.gather_rows(torch.cat(kept) if kept else None)
        if d.main:
            metrics = score_features(every, reference, extractor.spec, settings.groups, seed=seed,
                                     kid_subset_size=settings.kid_subset_size)
        grid = shown if keep else None
    bar.close()
    metrics = gdist.broadcast_object(metrics)
    sampling = {}
    if timer is not None:
        sampling = _world_summary(timer, model.nfe(**sampler), settings.batch_size, sampler, fast, model.device)
    return metrics, sampling, grid


def _world_summary(timer: SamplingTimer, nfe: int, batch_size: int, sampler: dict, fast: FastPath, device) -> dict:
    """The sampling cost of the whole job: the ranks sample at once, so the rate is every rank's timed
    images over the slowest rank's timed seconds (each rank leaves out its own first batch); peak
    memory is the largest rank's; each rank's own rate is kept in per_rank_img_per_s."""
    own = timer.summary(nfe, batch_size)
    timed = timer.times[1:] if len(timer.times) > 1 else timer.times
    ranks = gdist.all_gather_object({"n": own["timed_images"], "s": sum(t for _, t in timed),
                                     "mem": own["peak_mem_mb"], "rate": own["img_per_s"],
                                     "warmup": own["warmup_batches"]})
    n, s = sum(r["n"] for r in ranks), max(r["s"] for r in ranks)
    return {**own, "img_per_s": n / s if s > 0 else None, "ms_per_img": 1000 * s / n if n else None,
            "peak_mem_mb": max(r["mem"] for r in ranks), "timed_images": n,
            "warmup_batches": sum(r["warmup"] for r in ranks), "world_size": len(ranks),
            "per_rank_img_per_s": [r["rate"] for r in ranks], "sampler": sampler, "fast_path": fast.describe(device)}
