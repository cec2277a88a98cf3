"""Features -> metrics: every feature-space metric group registered in genbench.metrics is computed here
from one feature pass, on the features' device.

IS is torch-fidelity's own function, given the features on their device; FID, KID and precision/recall
are torch-fidelity's formulas computed on that device (`device_metrics`), checked against its functions
in tests. A registered group's `compute` receives a `FeatureContext` and returns {key: value}; the
scorer knows no metric by name, so a new group is one registration (genbench/metrics.py) plus its
function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from genbench import metrics as registry
from genbench.data import Data
from genbench.device_metrics import fid_statistics, frechet_distance, kid, precision_recall
from genbench.modes import classifier_mode_stats, mixture_mode_stats
from genbench.scoring.extractor import Extractor, extract
from genbench.scoring.reference import Reference


@dataclass
class FeatureContext:
    """What a feature-space metric group is computed from."""
    fake: dict[str, torch.Tensor]     # {layer: [n, d]} of the samples, on the extractor's device
    ref: Reference                    # the reference's features (and FID statistics)
    spec: object                      # the extractor's ExtractorSpec: which layer feeds what
    seed: int                         # seeds the random subsets/splits of KID and IS
    kid_subset_size: int = 1000
    labels: torch.Tensor | None = None   # the samples' class labels, where known

    @property
    def fid_features(self) -> torch.Tensor:
        return self.fake[self.spec.fid_layer]

    @property
    def logits(self) -> torch.Tensor:
        return self.fake[self.spec.isc_layer]


def fid_group(ctx: FeatureContext) -> dict[str, float]:
    return {"fid": frechet_distance(fid_statistics(ctx.fid_features), ctx.ref.fid_stats(ctx.spec.fid_layer))}


def isc_group(ctx: FeatureContext) -> dict[str, float]:
    out = isc_features_to_metric(ctx.logits, splits=10, rng_seed=ctx.seed)
    return {"is_mean": float(out[KEY_METRIC_ISC_MEAN]), "is_std": float(out[KEY_METRIC_ISC_STD])}


def kid_group(ctx: FeatureContext) -> dict[str, float]:
    ff, fr = ctx.fid_features, ctx.ref[ctx.spec.fid_layer]
    mean, std = kid(ff, fr, min(ctx.kid_subset_size, len(ff), len(fr)), ctx.seed)
    return {"kid_mean": float(mean), "kid_std": float(std)}


def prc_group(ctx: FeatureContext) -> dict[str, float]:
    p, r = precision_recall(ctx.fid_features, ctx.ref[ctx.spec.fid_layer])
    return {"precision": float(p), "recall": float(r),
            "f_score": float(2 * p * r / max(1e-5, p + r))}   # torch-fidelity's F-score


def modes_group(ctx: FeatureContext) -> dict[str, float]:
    """Mode statistics from a domain classifier's logits; nothing for an extractor whose logits are not
    modes of the data (the Inception's 1008 ImageNet classes).

    A sample counts toward a mode only when the classifier is confident on it and its features (the FID
    layer) lie inside some reference image's k-NN ball (`modes.manifold_membership`, precision's test
    per sample): the classifier is confident on noise too. For fashion-stacked the logits are already
    the joint log-probabilities of the 1000 modes and the features the three channels' side by side
    (384-d), so both are used as they are: the joint ball test rejects an image with one noise channel
    (bench/mode_robustness.py)."""
    if not ctx.spec.num_modes:
        return {}
    from genbench.modes import manifold_membership

    probs = F.softmax(ctx.logits.double(), dim=1)
    if probs.shape[1] != ctx.spec.num_modes:
        raise ValueError(f"extractor {ctx.spec.name!r} gives {probs.shape[1]} logits for "
                         f"{ctx.spec.num_modes} modes")
    member = manifold_membership(ctx.fid_features, ctx.ref[ctx.spec.fid_layer])
    return classifier_mode_stats(probs, on_manifold=member)


def score_features(fake: dict[str, torch.Tensor], ref: Reference | dict, spec, groups: Iterable[str], *,
                   seed: int, kid_subset_size: int = 1000, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Every requested feature-space group of the registry, from one set of features."""
    ctx = FeatureContext(fake, ref if isinstance(ref, Reference) else Reference(ref), spec, seed, kid_subset_size,
                         labels)
    out: dict[str, float] = {}
    for name in groups:
        g = registry.GROUPS.get(name)
        if g is None:
            raise KeyError(f"unknown metric group {name!r}")
        if g.source != registry.FEATURES:
            continue
        fn = g.function()
        if fn is not None:
            out.update({k: float(v) for k, v in fn(ctx).items()})
    return out


def fidelity_metrics(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | Reference, spec, groups,
                     kid_subset_size: int = 1000, seed: int = 2020) -> dict[str, float]:
    """FID / IS / KID / precision-recall from features (the groups of `groups` among those four)."""
    return score_features(fake, real, spec, [g for g in groups if g in ("fid", "isc", "kid", "prc")], seed=seed,
                          kid_subset_size=kid_subset_size)


def score_images(batches: Iterable[torch.Tensor], *, extractor: Extractor, reference: Reference, groups,
                 seed: int, kid_subset_size: int = 1000, labels: torch.Tensor | None = None) -> dict[str, float]:
    """uint8 [B, C, H, W] batches -> features -> the requested metric groups. The one scoring path of a
    suite run, `eval --samples` and `eval --run`."""
    fake = extract(extractor, batches, to_cpu=False)
    return score_features(fake, reference, extractor.spec, groups, seed=seed, kid_subset_size=kid_subset_size,
                          labels=labels)


def score_points(points: torch.Tensor, ref: Data, groups) -> dict[str, float]:
    """2-D samples [n, 2] -> mode statistics against the mixture's known modes."""
    if "modes" not in groups:
        return {}
    return mixture_mode_stats(points, ref.mode_centers, ref.mode_std)
