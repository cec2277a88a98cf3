"""The one metric registry: every number genbench reports is registered here once, with its key, its
group (what a suite's `eval.metrics` names to turn it on), whether higher or lower is better, its
label, what it is computed from and how the CI gate treats it. Config, scoring, the store, report,
claims, compare and `genbench list` all read this table; none keeps a list of its own.

A new metric is one registration plus its computation: `register_group(MetricGroup(...), metrics=[...])`
with a `compute` function that takes the scoring context (features of the samples and of the reference,
see genbench/scoring/score.py) and returns {key: value}. A family declares the extra metrics it reports
on held-out data in its `declared_metrics` (families/base.py); registering the family registers them.

No torch here: the CLI and config read the registry without importing the scoring code, which the
built-in groups name as "module:function" and which loads on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

# What a number is computed from.
FEATURES = "features"      # extractor features of the samples against the reference's
POINTS = "points"          # 2-D samples against a mixture's known modes
HELD_OUT = "held-out"      # the model on held-out data (likelihood, reconstruction, ...)
SAMPLING = "sampling"      # timing of the sampler
SOURCES = (FEATURES, POINTS, HELD_OUT, SAMPLING)

# How the CI gate treats a metric.
BAND = "band"      # gated within a band from the baseline's seed spread
EXACT = "exact"    # deterministic: any change fails (NFE)
INFO = "info"      # machine-dependent: reported, never gated (img/s, memory)
NONE = "none"      # no direction (a count, a std across splits): reported nowhere as a quality
GATES = (BAND, EXACT, INFO, NONE)


@dataclass(frozen=True)
class Metric:
    key: str                          # the key in metrics.json
    group: str                        # the group that computes it
    higher_is_better: bool | None     # None: no direction; never gated, never a claim's quality
    label: str                        # table and plot label
    source: str                       # one of SOURCES
    description: str = ""
    gate: str = BAND
    integer: bool = False             # takes whole values only (a count of modes): the gate's band is at least 1

    def __post_init__(self):
        if not self.key or not isinstance(self.key, str):
            raise ValueError(f"metric key must be a non-empty string, got {self.key!r}")
        if self.source not in SOURCES:
            raise ValueError(f"metric {self.key!r}: source {self.source!r} is not one of {SOURCES}")
        if self.gate not in GATES:
            raise ValueError(f"metric {self.key!r}: gate {self.gate!r} is not one of {GATES}")
        if self.higher_is_better is None and self.gate in (BAND, EXACT) and self.key != "nfe":
            object.__setattr__(self, "gate", NONE)

    @property
    def feature_space(self) -> bool:
        """Computed in an extractor's feature space: never two extractors in one column or claim."""
        return self.source == FEATURES

    @property
    def device_bound(self) -> bool:
        """Measured on one device: never two devices in one column."""
        return self.gate == INFO

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MetricGroup:
    name: str
    source: str
    description: str = ""
    # "module:function" or a function(ctx) -> {key: value}; None for groups computed elsewhere
    # (held-out metrics come from the family's nll_bpd / extra_metrics; sampling from the timer).
    compute: Callable[[Any], dict] | str | None = None
    # The fewest images (generated and reference) the group can be computed from, given the
    # evaluation settings (an EvalConfig or anything with the same attributes).
    min_images: Callable[[Any], int] | int = 1
    selectable: bool = True           # may appear in a suite's eval.metrics
    metrics: tuple[str, ...] = field(default=())

    def needs(self, ev) -> int:
        return self.min_images(ev) if callable(self.min_images) else int(self.min_images)

    def function(self) -> Callable[[Any], dict] | None:
        if self.compute is None or callable(self.compute):
            return self.compute
        mod, _, name = self.compute.partition(":")
        return getattr(importlib.import_module(mod), name)


METRICS: dict[str, Metric] = {}
GROUPS: dict[str, MetricGroup] = {}


def register_metric(m: Metric) -> Metric:
    """Add a metric; registering the same definition twice is a no-op, a different one an error."""
    old = METRICS.get(m.key)
    if old is not None and old != m:
        raise ValueError(f"metric {m.key!r} is already registered differently ({old})")
    METRICS[m.key] = m
    if m.group in GROUPS and m.key not in GROUPS[m.group].metrics:
        g = GROUPS[m.group]
        GROUPS[m.group] = MetricGroup(**{**g.__dict__, "metrics": (*g.metrics, m.key)})
    return m


def register_group(g: MetricGroup, metrics: Iterable[Metric] = ()) -> MetricGroup:
    """Add a metric group and the metrics it computes (the one place a new metric is declared)."""
    if g.source not in SOURCES:
        raise ValueError(f"metric group {g.name!r}: source {g.source!r} is not one of {SOURCES}")
    ms = list(metrics)
    old = GROUPS.get(g.name)
    keys = tuple(dict.fromkeys([*(old.metrics if old else ()), *g.metrics, *(m.key for m in ms)]))
    GROUPS[g.name] = MetricGroup(**{**g.__dict__, "metrics": keys})
    for m in ms:
        if m.group != g.name:
            raise ValueError(f"metric {m.key!r} names group {m.group!r}, registered under {g.name!r}")
        register_metric(m)
    return GROUPS[g.name]


def unregister(key_or_group: str) -> None:
    """Remove a metric or a group and its metrics (tests that register a dummy metric clean up)."""
    g = GROUPS.pop(key_or_group, None)
    for k in (g.metrics if g else (key_or_group,)):
        METRICS.pop(k, None)


def get(key: str) -> Metric | None:
    return METRICS.get(key)


def direction(key: str) -> bool | None:
    """True if higher is better, False if lower is better, None when the metric has no direction."""
    m = METRICS.get(key)
    return None if m is None else m.higher_is_better


def label(key: str) -> str:
    m = METRICS.get(key)
    return m.label if m else key


def selectable_groups() -> tuple[str, ...]:
    return tuple(n for n, g in GROUPS.items() if g.selectable)


def quality_metrics() -> list[str]:
    """Every metric with a direction that is not a timing, in registration order (report columns)."""
    return [k for k, m in METRICS.items() if m.higher_is_better is not None and m.source != SAMPLING]


def sampling_metrics() -> list[str]:
    return [k for k, m in METRICS.items() if m.source == SAMPLING]


def adopt(declared: dict[str, dict] | None) -> None:
    """Register metrics a stored record declares (a family's extras) that this process does not know,
    so a report or a gate over a tree whose family is not installed here still sees them."""
    for key, d in (declared or {}).items():
        if key in METRICS or not isinstance(d, dict):
            continue
        try:
            m = Metric(**{k: d[k] for k in ("key", "group", "higher_is_better", "label", "source") if k in d},
                       **{k: d[k] for k in ("description", "gate", "integer") if k in d})
        except (TypeError, ValueError):
            continue
        if m.group not in GROUPS:
            register_group(MetricGroup(m.group, m.source, "declared by a family", selectable=False))
        register_metric(m)


# --------------------------------------------------------------------------- the built-in metrics

_SCORE = "genbench.scoring.score"


def _kid_min(ev) -> int:
    return int(getattr(ev, "kid_subset_size", 1000))


register_group(MetricGroup("fid", FEATURES, "Fréchet distance of the features (FID with the Inception)",
                           f"{_SCORE}:fid_group", min_images=2), [
    Metric("fid", "fid", False, "FID", FEATURES, "Fréchet distance between Gaussians fit to the features")])
register_group(MetricGroup("isc", FEATURES, "Inception Score from the extractor's logits",
                           f"{_SCORE}:isc_group", min_images=10), [
    Metric("is_mean", "isc", True, "IS", FEATURES, "exp E KL(p(y|x) || p(y)), mean over 10 splits"),
    Metric("is_std", "isc", None, "IS std", FEATURES, "std of IS over the 10 splits")])
register_group(MetricGroup("kid", FEATURES, "Kernel Inception Distance (unbiased MMD, cubic kernel)",
                           f"{_SCORE}:kid_group", min_images=_kid_min), [
    Metric("kid_mean", "kid", False, "KID", FEATURES, "mean over random subsets of kid_subset_size"),
    Metric("kid_std", "kid", None, "KID std", FEATURES, "std over the subsets")])
register_group(MetricGroup("prc", FEATURES, "improved precision and recall (Kynkäänniemi et al. 2019, k=3)",
                           f"{_SCORE}:prc_group", min_images=4), [
    Metric("precision", "prc", True, "precision", FEATURES, "share of samples inside the real data's k-NN balls"),
    Metric("recall", "prc", True, "recall", FEATURES, "share of real images inside the samples' k-NN balls"),
    Metric("f_score", "prc", True, "F-score", FEATURES, "harmonic mean of precision and recall")])
register_group(MetricGroup("modes", FEATURES, "mode coverage: classes of a domain classifier, or a mixture's "
                           "components for 2-D points", f"{_SCORE}:modes_group", min_images=4), [
    Metric("modes_covered", "modes", True, "modes covered", FEATURES, "modes holding enough samples", integer=True),
    Metric("modes_total", "modes", None, "modes total", FEATURES, "modes of the data"),
    Metric("high_quality_frac", "modes", True, "high-quality share", FEATURES,
           "share of samples confidently in a mode and, for classifiers, inside the real data's k-NN balls"),
    Metric("mode_kl", "modes", False, "mode KL", FEATURES, "KL of the mode histogram to uniform, nats")])
register_group(MetricGroup("nll", HELD_OUT, "negative log-likelihood (or its bound) of held-out data"), [
    Metric("nll_bpd", "nll", False, "NLL bits/dim", HELD_OUT, "bits per dimension on held-out 8-bit data")])
register_group(MetricGroup("sampling", SAMPLING, "sampling cost", selectable=False), [
    Metric("nfe", "sampling", False, "NFE", SAMPLING, "network evaluations per sample", gate=EXACT),
    Metric("img_per_s", "sampling", True, "img/s", SAMPLING, "images per second, warm-up batch left out", gate=INFO),
    Metric("ms_per_img", "sampling", False, "ms/img", SAMPLING, "milliseconds per image", gate=INFO),
    Metric("peak_mem_mb", "sampling", False, "peak MB", SAMPLING, "peak memory while sampling", gate=INFO)])
# Families' extra metrics on held-out data land in group "family"; each family declares its own.
register_group(MetricGroup("family", HELD_OUT, "numbers a family reports on held-out data", selectable=False))
