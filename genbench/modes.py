"""Mode-collapse measures: how many modes of the data a generator reaches, and how evenly.

Two sources of "which mode is this sample in":
  * 2-D mixtures (ring8, grid25): the nearest mixture centre, as in VEEGAN (Srivastava et al. 2017)
    and PacGAN (Lin et al. 2018);
  * images (digits, fashion, stacked-*): a domain classifier's softmax.
Both return the same keys (MODE_KEYS), so the report treats them alike. KL values are in nats.
"""
from __future__ import annotations

import math

import torch

MODE_KEYS = ("modes_covered", "modes_total", "high_quality_frac", "mode_kl")
HIGHER_IS_BETTER = {"modes_covered": True, "modes_total": None, "high_quality_frac": True, "mode_kl": False}

# 2-D mixtures: a sample is high quality within 3 std of its nearest centre (VEEGAN/PacGAN), and a
# mode counts as covered once it holds at least 0.8 % of all samples as high-quality ones: 20 of
# 2,500, the sample size and threshold of PacGAN's 2-D experiments, scaled with n.
HQ_STDS = 3.0
MIXTURE_MIN_FRAC = 20 / 2500
# Classifier modes: a class counts as covered once it is predicted for at least 10 % of the samples a
# uniform generator would give it (ceil, at least 1): 10 of 1,000 samples over 10 classes; 1 of
# 10,000 over Stacked's 1,000 modes, which is VEEGAN/PacGAN's "at least one sample" rule there.
CLASSIFIER_MIN_SHARE = 0.1


def _kl_to_uniform(counts: torch.Tensor) -> float:
    """KL(p || U_k) = sum_i p_i log(k p_i) with p = counts / counts.sum(), 0 log 0 = 0; in nats,
    from 0 (perfectly even) to log k (everything in one mode). With no counts at all it is log k:
    nothing was placed in any mode, which we score like total collapse rather than leave undefined."""
    k = counts.numel()
    total = counts.sum()
    if total <= 0:
        return math.log(k)
    p = counts.double() / total
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] * k)).sum())


def mixture_mode_stats(points: torch.Tensor, centers: torch.Tensor, std: float, *,
                       min_count: int | None = None) -> dict:
    """Mode statistics of generated 2-D points against a Gaussian mixture with equal weights.

    points [n, 2], centers [k, 2], std the (shared) component std.
      * each sample is assigned to its nearest centre; it is *high quality* when it lies within
        3 * std of that centre (Euclidean distance);
      * high_quality_frac = high-quality samples / n;
      * modes_covered = modes holding at least `min_count` high-quality samples; by default
        max(1, ceil(0.008 * n)), i.e. 20 when n = 2,500 (PacGAN's setting);
      * mode_kl = KL(p || uniform over the k modes) in nats, where p is the histogram of the
        *high-quality* samples over modes, normalised to sum 1 (log k when there are none).
    """
    points = torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
    centers = torch.as_tensor(centers, dtype=torch.float64).reshape(-1, 2)
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    n, k = points.shape[0], centers.shape[0]
    if min_count is None:
        min_count = max(1, math.ceil(MIXTURE_MIN_FRAC * n))
    if n == 0:
        return {"modes_covered": 0, "modes_total": k, "high_quality_frac": 0.0, "mode_kl": math.log(k)}
    finite = torch.isfinite(points).all(dim=1)                      # NaN samples are never high quality
    dist = torch.cdist(torch.nan_to_num(points, nan=1e30, posinf=1e30, neginf=-1e30), centers)  # [n, k]
    d_min, nearest = dist.min(dim=1)                                # [n], [n]
    hq = finite & (d_min <= HQ_STDS * std)
    counts = torch.bincount(nearest[hq], minlength=k)               # [k]
    return {
        "modes_covered": int((counts >= min_count).sum()),
        "modes_total": k,
        "high_quality_frac": float(hq.double().mean()),
        "mode_kl": _kl_to_uniform(counts),
    }


def classifier_mode_stats(probs: torch.Tensor, confidence: float = 0.5, *,
                          min_count: int | None = None) -> dict:
    """Mode statistics from a domain classifier's class probabilities, probs [n, k] (rows sum to 1).

    For Stacked datasets pass the joint over the three channels, [n, 1000] (see `stack_probs`).
      * each sample's mode is its arg-max class;
      * modes_covered = classes predicted for at least `min_count` samples; by default
        max(1, ceil(0.1 * n / k)), a tenth of a uniform generator's share (10 for n=1000, k=10);
      * high_quality_frac = share of samples whose top probability is >= `confidence`;
      * mode_kl = KL(p || uniform over k) in nats, p the histogram of arg-max classes over *all*
        samples, as VEEGAN/PacGAN report for Stacked MNIST.
    """
    probs = torch.as_tensor(probs).double()
    if probs.dim() != 2:
        raise ValueError(f"probs must be [n, k], got shape {tuple(probs.shape)}")
    n, k = probs.shape
    if min_count is None:
        min_count = max(1, math.ceil(CLASSIFIER_MIN_SHARE * n / k))
    if n == 0:
        return {"modes_covered": 0, "modes_total": k, "high_quality_frac": 0.0, "mode_kl": math.log(k)}
    top, pred = probs.max(dim=1)                                    # [n], [n]
    counts = torch.bincount(pred, minlength=k)                      # [k]
    return {
        "modes_covered": int((counts >= min_count).sum()),
        "modes_total": k,
        "high_quality_frac": float((top >= confidence).double().mean()),
        "mode_kl": _kl_to_uniform(counts),
    }


def stack_probs(*per_channel: torch.Tensor) -> torch.Tensor:
    """Joint class probabilities of a Stacked image from per-channel ones, treating channels as
    independent: three [n, 10] -> [n, 1000] with mode index a*100 + b*10 + c (data.py's order)."""
    joint = per_channel[0].double()
    for p in per_channel[1:]:
        joint = (joint[:, :, None] * p.double()[:, None, :]).flatten(1)   # [n, K*k]
    return joint
