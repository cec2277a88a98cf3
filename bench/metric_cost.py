"""Cost of the metric stage alone: features -> FID / IS / KID / precision-recall as genbench computes them,
beside torch-fidelity's own functions for the same numbers.

No feature extractor runs: the features are seeded Gaussians of the Inception's shapes (2048-d pool
features, 1008-d logits), so this runs on a CPU at CIFAR-10's 50,000 x 50,000 scale. For each stage it
reports wall seconds and the extra peak memory (host RSS above the stage's start; on CUDA also the
device's peak allocation). Rows:
  fid_first / fid_cached   reference statistics computed, then reused (genbench's `Reference`)
  fid_recomputed           both statistics from the features, as every call did before `Reference`
  fid_torch_fidelity       torch-fidelity's statistics + eigvals(S1 S2) on host numpy, both sets (what genbench
                           computed before `device_metrics`: compare with fid_recomputed)
  isc, kid                 genbench's (IS: torch-fidelity's function on --device; KID: its formula on --device)
  kid_torch_fidelity       torch-fidelity's KID (numpy on the host whatever the device)
  fid_isc_kid_in_turn / _in_threads   the three groups as genbench computes them (one after the other),
                           and each in its own thread: whether the host's cores are left idle
  prc_genbench             genbench's precision/recall (torch-fidelity's distance blocks, reduced on --device)
  prc_torch_fidelity_blocked  with --tf-blocked: torch-fidelity's blocked mode (save_cpu_ram, its default
                           blocks; every block copied to the host, the fake-real distances computed twice)
  prc_torch_fidelity       torch-fidelity's default (full distance matrices on the host, peak about four
                           n x n float32 matrices); skipped with --skip-full or above --max-full-gb
  cache_write / cache_read the reference-cache file of n-real Inception features (pool + logits) written
                           as genbench writes it (temp file, fsync, rename; a background thread in a run)
                           and read back to --device

    python bench/metric_cost.py --n-fake 10000 --n-real 10000 --tf-blocked \
        --out bench/results/cpu-metric-cost-10k.json
    python bench/metric_cost.py --n-fake 50000 --n-real 50000 --device cuda --out results/metric_cost.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


class PeakRSS:
    """Host resident memory high-water mark over a `with` block, sampled every 5 ms from /proc."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    @property
    def extra_gb(self) -> float:
        return (self.peak - self.start) / 1e9


def timed(dev: torch.device, fn):
    from genbench.timing import peak_memory_mb, reset_peak_memory, sync

    sync(dev)
    reset_peak_memory(dev)
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        sync(dev)
        s = time.perf_counter() - t
    row = {"wall_s": s, "host_extra_gb": mem.extra_gb}
    if dev.type == "cuda":
        row["device_peak_gb"] = peak_memory_mb(dev) * 2 ** 20 / 1e9
    return out, row


def tf_full_prc_peak_bytes(n_fake: int, n_real: int) -> int:
    """torch-fidelity's full-matrix precision/recall peaked at about four n x n float32 matrices on the host
    (+1.60 GB at 10,000 x 10,000, bench/results/cpu-metric-cost-10k.json): about 40 GB at 50,000."""
    return 4 * 4 * max(n_fake, n_real) ** 2


def prc_rows(a, stage, fake, real, ref, spec) -> None:
    from torch_fidelity.metric_prc import prc_features_to_metric

    from genbench.scoring import fidelity_metrics

    stage("prc_genbench", lambda: fidelity_metrics(fake, ref, spec, ["prc"]))
    if a.tf_blocked:
        stage("prc_torch_fidelity_blocked", lambda: prc_features_to_metric(fake["pool"], real["pool"],
                                                                           save_cpu_ram=True, verbose=False))
    full_gb = tf_full_prc_peak_bytes(a.n_fake, a.n_real) / 1e9
    if a.skip_full or full_gb > a.max_full_gb:
        print(f"prc_torch_fidelity: skipped (estimated peak {full_gb:.1f} GB)", flush=True)
    else:
        stage("prc_torch_fidelity", lambda: prc_features_to_metric(fake["pool"], real["pool"], save_cpu_ram=False,
                                                                   verbose=False))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="where the features live (auto, cpu or cuda)")
    ap.add_argument("--n-fake", type=int, default=10_000, help="generated feature vectors")
    ap.add_argument("--n-real", type=int, default=10_000, help="reference feature vectors")
    ap.add_argument("--dim", type=int, default=2048, help="feature width (Inception pool: 2048)")
    ap.add_argument("--skip-full", action="store_true", help="skip torch-fidelity's full-matrix precision/recall")
    ap.add_argument("--skip-prc", action="store_true", help="skip every precision/recall row")
    ap.add_argument("--max-full-gb", type=float, default=8.0,
                    help="skip the full-matrix precision/recall when its estimated peak exceeds this")
    ap.add_argument("--tf-blocked", action="store_true",
                    help="also time torch-fidelity's blocked precision/recall (save_cpu_ram, its default blocks)")
    ap.add_argument("--out", type=Path, default=Path("results/metric_cost.json"), help="JSON written at the end")
    a = ap.parse_args()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    from genbench import evaluators
    from genbench.errors import UserError
    from genbench.scoring import Reference, fidelity_metrics
    from genbench.runner import resolve_device
    from genbench.store import atomic_torch_save

    try:
        if min(a.n_fake, a.n_real, a.dim) < 4:
            raise UserError("--n-fake, --n-real and --dim must be at least 4 (precision/recall uses 3 neighbours)")
        dev = resolve_device(a.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    fake = {"pool": torch.randn(a.n_fake, a.dim, generator=g).to(dev),
            "logits": torch.randn(a.n_fake, 1008, generator=g).to(dev)}
    real = {"pool": (torch.randn(a.n_real, a.dim, generator=g) + 0.02).to(dev)}
    spec = evaluators.ExtractorSpec("bench", "bench", "pool", "logits", None, None)
    ref = Reference.on(dev, real)
    rows, values = {}, {}

    def stage(name, fn):
        out, rows[name] = timed(dev, fn)
        values[name] = out
        print(f"{name}: {rows[name]['wall_s']:.2f} s, +{rows[name]['host_extra_gb']:.2f} GB host", flush=True)

    stage("fid_first", lambda: fidelity_metrics(fake, ref, spec, ["fid"]))
    stage("fid_cached", lambda: fidelity_metrics(fake, ref, spec, ["fid"]))
    stage("fid_recomputed", lambda: fidelity_metrics(fake, real, spec, ["fid"]))   # a plain dict: no reuse
    stage("fid_torch_fidelity", lambda: fid_statistics_to_metric(
        fid_features_to_statistics(fake["pool"].cpu()), fid_features_to_statistics(real["pool"].cpu()), False))
    stage("isc", lambda: fidelity_metrics(fake, ref, spec, ["isc"]))
    stage("kid", lambda: fidelity_metrics(fake, ref, spec, ["kid"]))
    stage("kid_torch_fidelity", lambda: kid_features_to_metric(fake["pool"], real["pool"], verbose=False,
                                                               kid_subset_size=min(1000, a.n_fake, a.n_real)))
    trio = ["fid", "isc", "kid"]
    stage("fid_isc_kid_in_turn", lambda: fidelity_metrics(fake, ref, spec, trio))

    def in_threads() -> dict:   # the three groups at once (torch's and LAPACK's kernels release the GIL)
        with ThreadPoolExecutor(len(trio)) as pool:
            parts = list(pool.map(lambda group: fidelity_metrics(fake, ref, spec, [group]), trio))
        return {k: v for part in parts for k, v in part.items()}

    stage("fid_isc_kid_in_threads", in_threads)
    host = {"pool": real["pool"].cpu(), "logits": torch.randn(a.n_real, 1008, generator=g)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "reference.pt"

        def read_back() -> dict:
            feats = {k: v.to(dev) for k, v in torch.load(cache, weights_only=True).items()}
            return {"bytes": sum(v.numel() * v.element_size() for v in feats.values())}

        stage("cache_write", lambda: atomic_torch_save(cache, host) or {})
        stage("cache_read", read_back)
    if a.skip_prc:
        print("prc: skipped (--skip-prc)", flush=True)
    else:
        prc_rows(a, stage, fake, real, ref, spec)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "n_fake": a.n_fake, "n_real": a.n_real, "dim": a.dim,
            "prc_tf_full_peak_estimate_gb": tf_full_prc_peak_bytes(a.n_fake, a.n_real) / 1e9,
            "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "rows": rows, "values": values}, indent=2, default=float))
    print(f"\n{meta['device']} ({meta['threads']} threads), {a.n_fake} fake vs {a.n_real} real, {a.dim}-d features")
    print("| stage | wall s | extra host GB | result |")
    print("|---|---:|---:|---|")
    for k, r in rows.items():
        v = values[k]
        shown = ", ".join(f"{kk} {float(vv):.6g}" for kk, vv in v.items() if kk in
                          ("fid", "frechet_inception_distance", "is_mean", "kid_mean",
                           "kernel_inception_distance_mean", "precision", "recall"))
        print(f"| {k} | {r['wall_s']:.2f} | {r['host_extra_gb']:.2f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
