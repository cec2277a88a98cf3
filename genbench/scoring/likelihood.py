"""Held-out metrics of a model: bits/dim where the family has a likelihood, and its declared extras.

Every number here is independent of the evaluation batch size: image k of the held-out set gets its
own random stream (seed HELD_OUT_SEED, index k) in `Batch.rng`, so a family that draws timesteps or
noise for its estimate gives each image the same draws in any batch; per-image values (a family's
nll_bpd may return one per image) are averaged exactly. A family's extra metrics are computed on the
whole held-out set at once: some (codebook perplexity) are not means over images.
"""
from __future__ import annotations

import torch

from genbench.data import Data
from genbench.families.base import Batch, GenerativeModel
from genbench.rng import SeedRNG

HELD_OUT_SEED = 0x4E4C4C   # the streams of held-out estimates; fixed, so one model gives one number


def held_out_batch(model: GenerativeModel, test: Data, i: int, j: int) -> Batch:
    """Images i..j-1 of the held-out set as a Batch on the model's device, with their own streams."""
    y = test.y[i:j].to(model.device) if test.y is not None else None
    rng = SeedRNG.for_run(HELD_OUT_SEED, j - i, device=model.device, offset=i)
    return Batch(test.model_input(slice(i, j)).to(model.device), y, rng)


@torch.no_grad()
def likelihood_metrics(model: GenerativeModel, test: Data, groups, max_n: int = 1000,
                       batch_size: int = 250) -> dict[str, float]:
    """nll_bpd (where the family has one, when "nll" is requested) and the family's extra metrics on the
    first `max_n` held-out images."""
    n = min(max_n, len(test))
    out: dict[str, float] = {}
    if n == 0:
        return out
    extra = model.extra_metrics(held_out_batch(model, test, 0, n))
    for k, v in dict(extra).items():
        if v is not None:
            out[k] = float(v.double().mean()) if isinstance(v, torch.Tensor) else float(v)
    if "nll" in groups:
        total, seen = 0.0, 0
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            nll = model.nll_bpd(held_out_batch(model, test, i, j))
            if nll is None:
                break
            if isinstance(nll, torch.Tensor) and nll.numel() == j - i and nll.dim() == 1:
                total += float(nll.double().sum())        # one value per image: an exact mean
            else:
                total += float(nll) * (j - i)             # a batch mean
            seen += j - i
        if seen:
            out["nll_bpd"] = total / seen
    return out
