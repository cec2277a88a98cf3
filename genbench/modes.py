"""Mode-collapse measures: how many modes of the data a generator reaches, and how evenly.

Two sources of "which mode is this sample in":
  * 2-D mixtures (ring8, grid25): the nearest mixture centre, as in VEEGAN (Srivastava et al. 2017)
    and PacGAN (Lin et al. 2018);
  * images (digits, fashion, stacked-*): a domain classifier's softmax.
Both return the same keys (MODE_KEYS), so the report treats them alike. KL values are in nats.

A classifier is confident on images that are no images of the data at all (uniform noise: the
digits classifier is >= 0.5 sure of 98 % of them), so an image counts toward a mode only when it is
also on the data manifold (`manifold_membership`): inside the k-NN ball (k = 3) of some reference
image in the classifier's feature space, improved precision's membership test (Kynkaanniemi et al.
2019) made per sample. bench/mode_robustness.py measures the rule on noise, blurred, held-out and
two-class images.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch_fidelity.defaults import DEFAULTS

from genbench.device_metrics import _knn_radii, full_fp32_matmul

MODE_KEYS = ("modes_covered", "modes_total", "high_quality_frac", "mode_kl")
# Recorded with every number (provenance "modes_code"): bump when a change here can move a value.
MODES_CODE = "genbench.modes/2: classifier modes count confident samples inside the reference's 3-NN balls"
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
                          min_count: int | None = None, on_manifold: torch.Tensor | None = None) -> dict:
    """Mode statistics from a domain classifier's class probabilities, probs [n, k] (rows sum to 1).

    For Stacked datasets pass the joint over the three channels, [n, 1000] (see `stack_probs`).
      * each sample's mode is its arg-max class;
      * a sample is *high quality* when its top probability is >= `confidence` and, where
        `on_manifold` (bool [n], see `manifold_membership`) is given, it is on the data manifold;
      * high_quality_frac = high-quality samples / n;
      * modes_covered = classes predicted for at least `min_count` high-quality samples; by default
        max(1, ceil(0.1 * n / k)), a tenth of a uniform generator's share (10 for n=1000, k=10);
      * mode_kl = KL(p || uniform over k) in nats, p the histogram of the high-quality samples'
        arg-max classes (log k when there are none), as for the 2-D mixtures.
    VEEGAN/PacGAN count every sample's arg-max on Stacked MNIST; with a classifier that is confident
    on noise that counted modes for a generator of pure noise (a wgan-gp run on stacked-fashion: 2
    modes, a high-quality share of 0.999), hence the manifold filter.
    """
    probs = torch.as_tensor(probs).double()
    if probs.dim() != 2:
        raise ValueError(f"probs must be [n, k], got shape {tuple(probs.shape)}")
    n, k = probs.shape
    if min_count is None:
        min_count = max(1, math.ceil(CLASSIFIER_MIN_SHARE * n / k))
    if n == 0:
        return {"modes_covered": 0, "modes_total": k, "high_quality_frac": 0.0, "mode_kl": math.log(k)}
    top, pred = probs.max(dim=1)                                    # [n], [n]; NaN rows: top NaN
    hq = top >= confidence                                          # NaN >= c is False
    if on_manifold is not None:
        on_manifold = torch.as_tensor(on_manifold, dtype=torch.bool, device=hq.device).reshape(-1)
        if on_manifold.numel() != n:
            raise ValueError(f"on_manifold has {on_manifold.numel()} entries for {n} samples")
        hq &= on_manifold
    counts = torch.bincount(pred[hq], minlength=k)                  # [k]
    return {
        "modes_covered": int((counts >= min_count).sum()),
        "modes_total": k,
        "high_quality_frac": float(hq.double().mean()),
        "mode_kl": _kl_to_uniform(counts),
    }


# The reference's k-NN radii, kept for the last reference tensor seen: a run scores many evaluation
# points against one reference, and the radii are its n_real x n_real distances.
_radii_cache: tuple[weakref.ref, int, int, torch.Tensor] | None = None


def reference_radii(real: torch.Tensor, k: int = DEFAULTS["prc_neighborhood"],
                    block: int = DEFAULTS["prc_batch_size"]) -> torch.Tensor:
    """Distance of each reference row to its k-th nearest other row: improved precision's radii
    (device_metrics' blocked computation, TF32 off), computed once per reference tensor."""
    global _radii_cache
    c = _radii_cache
    if c is not None and c[0]() is real and c[1] == k and c[2] == block:
        return c[3]
    with full_fp32_matmul():
        radii = _knn_radii(real, k, block)
    _radii_cache = (weakref.ref(real), k, block, radii)
    return radii


def manifold_membership(fake: torch.Tensor, real: torch.Tensor, k: int = DEFAULTS["prc_neighborhood"],
                        block: int = DEFAULTS["prc_batch_size"]) -> torch.Tensor:
    """bool [n_fake] on fake's device: row i lies within the k-NN radius of at least one real row,
    distances in the features' space. Its mean is improved precision: the same distance blocks and
    comparisons as `device_metrics.precision_recall`, so the mean equals its precision exactly.
    Memory is one block of distances, never n_fake x n_real. Non-finite rows are never on it."""
    real = real.to(fake.device)
    if len(real) <= k:
        raise ValueError(f"the k-NN manifold test needs more than k = {k} reference images, got {len(real)}")
    r_real = reference_radii(real, k, block)
    finite = torch.isfinite(fake).all(dim=1)
    f = torch.where(finite[:, None], fake, torch.zeros((), dtype=fake.dtype, device=fake.device))
    hit = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    with full_fp32_matmul():
        for i, rb in enumerate(real.split(block)):
            rr = r_real[i * block: i * block + len(rb), None]
            for j, fb in enumerate(f.split(block)):
                cols = slice(j * block, j * block + len(fb))
                hit[cols] |= (torch.cdist(rb, fb) <= rr).any(0)     # [real block, fake block], as precision
    return hit & finite


def stack_probs(*per_channel: torch.Tensor) -> torch.Tensor:
    """Joint class probabilities of a Stacked image from per-channel ones, treating channels as
    independent: three [n, 10] -> [n, 1000] with mode index a*100 + b*10 + c (data.py's order)."""
    joint = per_channel[0].double()
    for p in per_channel[1:]:
        joint = (joint[:, :, None] * p.double()[:, None, :]).flatten(1)   # [n, K*k]
    return joint
