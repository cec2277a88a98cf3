"""One evaluation point of a model: sample n images (one seed per image), hand them to the scoring path
as uint8 batches, and time the sampler. Used by suite runs (main point and sweeps) and by
`genbench eval --run`; `genbench eval --samples` enters the same scoring path with files instead."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from genbench.data import Data
from genbench.fastpath import FastPath
from genbench.families.base import GenerativeModel
from genbench.scoring import Extractor, Reference, sample_stream, score_images, score_points, uint8_batches
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
