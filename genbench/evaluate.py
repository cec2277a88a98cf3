"""The evaluation harness: samples -> uint8 -> features -> FID, IS, KID, precision/recall.

Samples stream from the sampler straight into the feature extractor (no image files); FID, IS,
KID and precision/recall all come from that one feature pass. Reference features are cached on disk,
keyed by dataset, split, image size, count and the extractor's weights hash (a thread writes the file
while the caller goes on), and live on the extractor's device with their FID statistics computed once
per run (`Reference`). IS is torch-fidelity's own function, given the features on their device; FID, KID
and precision/recall are torch-fidelity's formulas computed on that device (`device_metrics`; its own are
host numpy or copy every distance block to the host), checked against its functions in tests.
"""
from __future__ import annotations

import math
import platform
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL
from torch_fidelity.utils import create_feature_extractor

from genbench import evaluators
from genbench.data import Data, to_uint8
from genbench.device_metrics import (METRIC_CODE, ReferenceStats, fid_statistics, frechet_distance,
                                     full_fp32_matmul, kid, precision_recall, reference_statistics)
from genbench.evaluators.classifier import file_sha256
from genbench.evaluators.inception import FORWARD_CODE, MatmulResizeInception
from genbench.fastpath import FastPath, autocast, cudnn_autotune
from genbench.families.base import Batch, GenerativeModel
from genbench.modes import classifier_mode_stats, mixture_mode_stats
from genbench.rng import SeedRNG
from genbench.store import atomic_torch_save
from genbench.timing import SamplingTimer

# metrics.json key <- torch-fidelity key
FIDELITY_KEYS = {"fid": KEY_METRIC_FID, "is_mean": KEY_METRIC_ISC_MEAN, "is_std": KEY_METRIC_ISC_STD,
                 "kid_mean": KEY_METRIC_KID_MEAN, "kid_std": KEY_METRIC_KID_STD,
                 "precision": KEY_METRIC_PRECISION, "recall": KEY_METRIC_RECALL, "f_score": KEY_METRIC_F_SCORE}


@dataclass
class Extractor:
    spec: evaluators.ExtractorSpec
    module: torch.nn.Module
    sha256: str | None
    device: torch.device
    compiled: bool = False
    forward_code: str | None = None   # set where genbench's forward replaces torch-fidelity's (provenance)
    # cuDNN timing its convolution algorithms on each new shape: off, since the timing falls on a cold
    # evaluation's first batch and the extractor is no faster for it (bench/extractor_first_batch.py)
    cudnn_autotune: bool = False
    # A compiled extractor pads every smaller batch to the first batch's size: one graph, and no
    # recompilation for a run's last, partial batch (the networks are per-image in eval mode).
    _batch: int = field(default=0, repr=False)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([self.spec.fid_layer, self.spec.isc_layer]))

    @torch.no_grad()
    def __call__(self, x_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        x, n = x_uint8.to(self.device), len(x_uint8)
        if self.compiled:
            self._batch = self._batch or n
            if n < self._batch:
                x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        # the Inception's resize is a matmul: TF32 would round the pixels
        with full_fp32_matmul(), cudnn_autotune(self.cudnn_autotune):
            feats = self.module(x)
        return {k: v[:n].float() for k, v in zip(self.layers, feats)}


def build_extractor(name: str, device: torch.device, *, inception_weights=None, download=False,
                    compile: bool = False) -> Extractor:
    """torch-fidelity's extractor `name` on `device`; the Inception with genbench's forward (its input resize
    as two matmuls, `evaluators.inception`). On CUDA: channels_last, and with `compile`
    torch.compile, compiled on the first batch (H200, 50,000 Inception images at batch 500: 5.2 s instead
    of 8.5 s once compiled, for about 35 s of compilation in a machine's first process and about 9 s of
    importing and loading in a later one; bench/results/h200-eval-run4*.json)."""
    weights = evaluators.check_extractor(name, inception_weights=inception_weights, download=download)
    spec = evaluators.EXTRACTORS[name]
    layers = list(dict.fromkeys([spec.fid_layer, spec.isc_layer]))
    kwargs = {"feature_extractor_weights_path": weights} if name == evaluators.INCEPTION else {}
    module = create_feature_extractor(spec.fidelity_name, layers, cuda=False, verbose=False, **kwargs).to(device)
    forward_code = None
    if name == evaluators.INCEPTION:   # its layers and weights, its input resize as two matmuls
        module, forward_code = MatmulResizeInception(module), FORWARD_CODE
    compiled = compile and device.type == "cuda"
    if device.type == "cuda":   # NHWC convolutions: faster on tensor-core GPUs, same math
        module = module.to(memory_format=torch.channels_last)
    if compiled:
        module = torch.compile(module, dynamic=False)
    return Extractor(spec, module, file_sha256(Path(weights)) if weights else None, device, compiled, forward_code)


def extract(extractor: Extractor, batches: Iterable[torch.Tensor], to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """uint8 batches -> {layer: float32 [N, D]}, on the CPU or left on the extractor's device."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in extractor.layers}
    for xb in batches:
        for k, v in extractor(xb).items():
            out[k].append(v.cpu() if to_cpu else v)
    return {k: torch.cat(v) for k, v in out.items()}


# Reference-cache files being written by a background thread, by path.
_cache_writes: dict[Path, threading.Thread] = {}


def reference_features(extractor: Extractor, data: Data, n_real: int | None, cache_dir: Path | None,
                       batch_size: int = 500, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: float32 [N, D]} of the first `n_real` images of `data`, on the extractor's device.

    Read from the disk cache when it has them; else extracted, and the cache file written by a thread
    while the caller goes on (50,000 Inception features are 611 MB: about 2.5 s of writing and fsync on
    the 2-core CPU, work a cold evaluation no longer waits for)."""
    n = len(data) if n_real is None else min(n_real, len(data))
    key = (f"{data.name}-{data.split}-{tuple(data.x.shape[1:])}-{n}-{extractor.spec.name}-"
           f"{(extractor.sha256 or 'nohash')[:16]}.pt").replace(" ", "").replace("/", "_")
    path = Path(cache_dir) / key if cache_dir else None
    if path is not None and path in _cache_writes:   # written by this process a moment ago
        _cache_writes.pop(path).join()
    if path is not None and path.is_file():
        return torch.load(path, map_location=extractor.device, weights_only=True)
    # Inception on a CPU extracts a few images a second: 50,000 reference images take hours, so show it
    bar = tqdm(total=n, desc=f"reference features ({data.name} {data.split})", unit="img", disable=not progress,
               leave=False)

    def counted_batches():   # tqdm's update() returns True when it redraws: never chain on its value
        for i in range(0, n, batch_size):
            xb = data.x[i:min(i + batch_size, n)]
            yield xb
            bar.update(len(xb))

    feats = extract(extractor, counted_batches(), to_cpu=False)
    bar.close()
    if path is not None:
        host = {k: v.cpu() for k, v in feats.items()}   # one copy now: the thread never touches the device
        thread = threading.Thread(target=_write_cache, args=(path, host), name=f"genbench cache {key}")
        thread.start()   # not a daemon: the interpreter waits for it before exiting
        _cache_writes[path] = thread
    return feats


def _write_cache(path: Path, feats: dict[str, torch.Tensor]) -> None:
    try:
        atomic_torch_save(path, feats)
    except OSError as e:   # a cache: the run goes on without it, and the next run extracts again
        print(f"genbench: warning: reference features not cached at {path}: {e}", file=sys.stderr)


def wait_for_cache_writes() -> None:
    """Block until every reference-cache file this process started writing is on disk."""
    while _cache_writes:
        _cache_writes.pop(next(iter(_cache_writes))).join()


@dataclass
class Reference:
    """Reference features on one device, with the FID statistics of each layer (mean, covariance and the
    covariance's square root) computed once.

    An evaluation point used to recompute the reference mean and covariance from its features every
    time: 5 s of the 16 s FID stage for 50,000 x 2048 features on the 2-core CPU, with torch-fidelity's
    functions (bench/results/cpu-metric-cost-50k-torch-fidelity-prc.json); a run scores many points."""
    feats: dict[str, torch.Tensor]
    _fid_stats: dict[str, ReferenceStats] = field(default_factory=dict, repr=False)

    @classmethod
    def on(cls, device: torch.device, feats: dict[str, torch.Tensor]) -> "Reference":
        return cls({k: v.to(device) for k, v in feats.items()})

    def __getitem__(self, layer: str) -> torch.Tensor:
        return self.feats[layer]

    def fid_stats(self, layer: str) -> ReferenceStats:
        if layer not in self._fid_stats:
            self._fid_stats[layer] = reference_statistics(self.feats[layer])
        return self._fid_stats[layer]


def fidelity_metrics(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | Reference, spec, groups,
                     kid_subset_size: int = 1000, seed: int = 2020) -> dict[str, float]:
    """FID / IS / KID / precision-recall from features, all on the fake features' device: IS with
    torch-fidelity's own function, the others with its formulas in torch (`device_metrics`).

    Pass a `Reference` to reuse its FID statistics across calls; a plain dict is scored from scratch."""
    out: dict = {}
    ref = real if isinstance(real, Reference) else Reference(real)
    ff, fr = fake[spec.fid_layer], ref[spec.fid_layer]
    if "fid" in groups:
        out[KEY_METRIC_FID] = frechet_distance(fid_statistics(ff), ref.fid_stats(spec.fid_layer))
    if "isc" in groups:
        out.update(isc_features_to_metric(fake[spec.isc_layer], splits=10, rng_seed=seed))
    if "kid" in groups:
        subset = min(kid_subset_size, len(ff), len(fr))
        out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD] = kid(ff, fr, subset, seed)
    if "prc" in groups:
        p, r = precision_recall(ff, fr)
        out.update({KEY_METRIC_PRECISION: p, KEY_METRIC_RECALL: r,
                    KEY_METRIC_F_SCORE: 2 * p * r / max(1e-5, p + r)})   # torch-fidelity's F-score
    return {ours: float(out[theirs]) for ours, theirs in FIDELITY_KEYS.items() if theirs in out}


def balanced_labels(n: int, num_classes: int, offset: int = 0) -> torch.Tensor:
    """Label of image k is k mod C: depends on the image index only, so batching changes nothing."""
    return torch.arange(offset, offset + n) % num_classes


def sample_stream(model: GenerativeModel, n: int, seed: int, batch_size: int, sampler: dict,
                  timer: SamplingTimer | None = None, progress: Callable[[int], None] | None = None,
                  fast: FastPath | None = None):
    """Yield batches of samples (model output range, float32) for images 0..n-1 of run seed `seed`."""
    device = model.device
    fast = fast or FastPath()
    rng = SeedRNG.for_run(seed, n, device=device)
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        labels = (balanced_labels(j - i, model.spec.num_classes, i).to(device)
                  if model.conditional else None)
        with torch.no_grad(), autocast(device, fast), (timer.batch(j - i) if timer else nullcontext()):
            x = model.sample(rng[i:j], labels=labels, **sampler).float()
        if progress:
            progress(j - i)
        yield x


def evaluate_samples(model: GenerativeModel, *, seed: int, n_fake: int, sampler: dict, groups,
                     ref: Data, extractor: Extractor | None, real_feats: dict | Reference | None,
                     batch_size: int = 250, kid_subset_size: int = 1000, timer: SamplingTimer | None = None,
                     keep: int = 0, progress=None, fast: FastPath | None = None) -> tuple[dict, torch.Tensor | None]:
    """Sample n_fake images and score them. Returns (metrics, first `keep` samples for a grid)."""
    kept: list[torch.Tensor] = []
    metrics: dict[str, float] = {}
    stream = sample_stream(model, n_fake, seed, batch_size, sampler, timer, progress, fast)
    if not ref.is_image:   # 2-D points: mode statistics against the mixture's known modes
        pts = torch.cat([x.float().cpu() for x in stream])
        if "modes" in groups:
            metrics.update(mixture_mode_stats(pts, ref.mode_centers, ref.mode_std))
        return metrics, pts[:keep] if keep else None

    def uint8_batches():
        for x in stream:
            if not torch.isfinite(x).all():
                raise FloatingPointError("samples hold NaN/inf")
            u8 = to_uint8(x)
            if keep and sum(len(k) for k in kept) < keep:
                kept.append(u8[: keep - sum(len(k) for k in kept)].cpu())
            yield u8

    fake = extract(extractor, uint8_batches(), to_cpu=False)
    metrics.update(fidelity_metrics(fake, real_feats, extractor.spec, groups, kid_subset_size, seed))
    if "modes" in groups and extractor.spec.num_modes:
        probs = F.softmax(fake[extractor.spec.isc_layer].double(), dim=1)
        metrics.update(classifier_mode_stats(probs))
    return metrics, (torch.cat(kept) if kept else None)


@torch.no_grad()
def likelihood_metrics(model: GenerativeModel, test: Data, groups, max_n: int = 1000,
                       batch_size: int = 250) -> dict[str, float]:
    """nll_bpd (where the family has one) and the family's extra metrics on held-out data."""
    n = min(max_n, len(test))
    out: dict[str, float] = {}
    sums: dict[str, float] = {}
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        y = test.y[i:j].to(model.device) if test.y is not None else None
        batch = Batch(test.model_input(slice(i, j)).to(model.device), y)
        vals = dict(model.extra_metrics(batch))
        if "nll" in groups:
            nll = model.nll_bpd(batch)
            if nll is not None:
                vals["nll_bpd"] = nll
        for k, v in vals.items():
            if v is not None:
                sums[k] = sums.get(k, 0.0) + float(v) * (j - i)
    for k, v in sums.items():
        out[k] = v / n
    return out


def provenance(extractor: Extractor | None, *, n_real: int | None, n_fake: int, ref_split: str,
               image_size, device, seed: int) -> dict:
    import torch_fidelity

    import genbench

    return {
        "extractor": extractor.spec.name if extractor else "mixture-modes",
        "extractor_sha256": extractor.sha256 if extractor else None,
        "extractor_compiled": extractor.compiled if extractor else None,   # compiled kernels round differently
        "extractor_forward": extractor.forward_code if extractor else None,
        "prc_features": extractor.spec.fid_layer if extractor else None,
        "metric_code": METRIC_CODE if extractor else None,
        "n_real": n_real, "n_fake": n_fake, "ref_split": ref_split, "image_size": image_size,
        "versions": {"genbench": genbench.__version__, "torch": torch.__version__,
                     "torch_fidelity": torch_fidelity.__version__, "python": platform.python_version()},
        "device": str(device) if str(device) == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "seed": seed,
    }


def finite(d: dict) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in d.values())
