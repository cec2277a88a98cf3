"""FID, KID and precision/recall with torch-fidelity's formulas, computed in torch on the features' device.

torch-fidelity computes FID and KID on the host in numpy whatever the device: FID takes the eigenvalues
of the non-symmetric product sigma_fake @ sigma_real (LAPACK geev), KID loops over 100 random subsets
with float32 matmuls. For 50,000 x 2048 Inception features that was 1.5 s and 2.9 s of the H200 host's
evaluation, and 4.9 s (eigenvalues alone) and 11-14 s on the 2-core CPU, while a GPU sat idle. Its
precision/recall copies every distance block to the host (see `precision_recall`).

The quantities are the same; only where and how they are computed differs:
- FID: tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2, which has the
  eigenvalues of the symmetric R S1 R with R = sqrt(S2) (similar matrices: S1 R R ~ R S1 R). R is
  computed once per reference (`ReferenceStats`), so each FID is two matmuls and one symmetric
  eigenvalue solve (eigvalsh) in float64. Eigenvalues that rounding leaves slightly negative count as
  zero, as torch-fidelity's complex square root gives them no real part.
- KID: torch-fidelity's polynomial kernel, unbiased MMD^2 estimate and subsets, drawn from the same
  numpy RandomState in the same order, so the subsets are identical; float32 kernels as theirs, with
  full-precision float32 matmuls (TF32 off) because the estimate subtracts large kernel sums.
- Precision/recall: the same distance blocks as torch-fidelity's full mode, reduced on the device.
tests/test_metrics.py checks each against torch-fidelity's own functions (DESIGN.md says to use those;
these exist because the speed issue asks for its numbers faster than it computes them).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.defaults import DEFAULTS

# Recorded with every number (provenance "metric_code"): bump when a change here can move a value.
METRIC_CODE = "genbench.device_metrics/1: FID, KID, precision/recall; IS by torch-fidelity"


@dataclass
class FidStats:
    mu: torch.Tensor      # [d] float64, on the features' device
    sigma: torch.Tensor   # [d, d] float64


@dataclass
class ReferenceStats(FidStats):
    sqrt_sigma: torch.Tensor   # [d, d] float64: the symmetric square root of sigma


def fid_statistics(f: torch.Tensor) -> FidStats:
    """Mean and unbiased covariance in float64 (numpy's cov, as torch-fidelity), on f's device."""
    xc = f.to(torch.float64, copy=True)   # centred in place below: never the caller's tensor
    mu = xc.mean(0)
    xc -= mu
    return FidStats(mu, _gram(xc) / (len(xc) - 1))


def _gram(xc: torch.Tensor) -> torch.Tensor:
    """xc.T @ xc. On the CPU numpy's matmul sees the transpose and runs a symmetric rank-k update, half the
    work: 3.2 s against torch's 6.0 s for 50,000 x 2048 in float64 on 2 cores. On a GPU torch's matmul.
    (Not for KID's 1000 x 1000 kernels: there numpy inside the torch loop was slower, 13-14 s against 10-11 s.)"""
    if xc.device.type == "cpu":
        x = xc.numpy()
        return torch.from_numpy(x.T @ x)
    return xc.T @ xc


def reference_statistics(f: torch.Tensor) -> ReferenceStats:
    s = fid_statistics(f)
    w, v = torch.linalg.eigh(s.sigma)
    return ReferenceStats(s.mu, s.sigma, (v * w.clamp(min=0).sqrt()) @ v.T)


def frechet_distance(fake: FidStats, ref: ReferenceStats) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with the trace from eigvalsh(R S1 R)."""
    diff = fake.mu - ref.mu
    inner = ref.sqrt_sigma @ fake.sigma @ ref.sqrt_sigma
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(diff @ diff + fake.sigma.trace() + ref.sigma.trace() - 2 * tr_covmean)


@contextmanager
def full_fp32_matmul():
    """TF32 off for the block: a user's `set_float32_matmul_precision('high')` would cost KID 1e-3, and
    move distances that precision/recall compare with radii (cdist is a matmul)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gamma = DEFAULTS["kid_kernel_poly_gamma"] or 1.0 / x.shape[1]
    return (x @ y.T * gamma + DEFAULTS["kid_kernel_poly_coef0"]) ** DEFAULTS["kid_kernel_poly_degree"]


def kid(fake: torch.Tensor, real: torch.Tensor, subset_size: int, seed: int,
        subsets: int = DEFAULTS["kid_subsets"]) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets, as torch-fidelity's KID."""
    real = real.to(fake.device)
    rng = np.random.RandomState(seed)
    m = subset_size
    # The same draws in the same order as torch-fidelity (fake subset, then real subset), all drawn before
    # the loop and copied in one go: a copy inside the loop would make the host wait for the device's
    # previous subset each time, and each draw (a permutation of n) costs the host about 1.3 ms at 50,000.
    idx = torch.from_numpy(np.stack([np.stack([rng.choice(len(fake), m, replace=False),
                                               rng.choice(len(real), m, replace=False)])
                                     for _ in range(subsets)])).to(fake.device)   # [subsets, 2, m]
    mmds = torch.empty(subsets, dtype=torch.float64, device=fake.device)
    with full_fp32_matmul():
        for i in range(subsets):
            x, y = fake[idx[i, 0]], real[idx[i, 1]]
            k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
            off_diag = (k_xx.sum(dtype=torch.float64) - k_xx.diagonal().sum(dtype=torch.float64)
                        + k_yy.sum(dtype=torch.float64) - k_yy.diagonal().sum(dtype=torch.float64))
            mmds[i] = off_diag / (m * (m - 1)) - 2 * k_xy.sum(dtype=torch.float64) / (m * m)
    mmds = mmds.cpu()
    return float(mmds.mean()), float(mmds.std(unbiased=False))


def _knn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest neighbour in x (the row itself is the 0th): the
    (k+1)-th smallest entry of each row of cdist(x, x), kept as a running top-(k+1) over column blocks."""
    radii = []
    for a in x.split(block):
        best = None
        for b in x.split(block):
            near = torch.cdist(a, b).topk(k + 1, dim=1, largest=False).values
            best = near if best is None else torch.cat([best, near], 1).topk(k + 1, dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = DEFAULTS["prc_neighborhood"],
                     block: int = DEFAULTS["prc_batch_size"]) -> tuple[float, float]:
    """(precision, recall) as torch-fidelity's, on the features' device, one distance block at a time.

    Precision: share of fake rows inside some real row's k-NN ball; recall: share of real rows inside
    some fake row's ball. torch-fidelity copies every distance block to the host (its full mode then
    holds about four n x n matrices there, 40 GB at 50,000; its blocked mode computes the fake-real
    distances twice). Here every block stays on the device and is reduced at once, so memory is one
    block; the blocks and their cdist calls are those of torch-fidelity's full mode, so the distances,
    and with them the results, are the same (tests/test_metrics.py asserts equality)."""
    real = real.to(fake.device)
    fake_hit = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_hit = torch.zeros(len(real), dtype=torch.bool, device=fake.device)
    with full_fp32_matmul():
        r_fake, r_real = _knn_radii(fake, k, block), _knn_radii(real, k, block)
        for i, rb in enumerate(real.split(block)):
            rows = slice(i * block, i * block + len(rb))
            for j, fb in enumerate(fake.split(block)):
                cols = slice(j * block, j * block + len(fb))
                d = torch.cdist(rb, fb)                             # [real block, fake block], as theirs
                real_hit[rows] |= (d <= r_fake[cols]).any(1)
                fake_hit[cols] |= (d <= r_real[rows, None]).any(0)
    return fake_hit.float().mean().item(), real_hit.float().mean().item()
