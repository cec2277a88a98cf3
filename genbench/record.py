"""The run record: what a run folder's metrics.json holds, as one versioned type.

Only the store writes and reads it (store.write_record / store.read_record); report, claims and
compare read records through the store. Records written before the type existed (no
"record_version") load as version 1: the same keys, without traits, model hash or gate settings.

A record has a main evaluation point (top-level "metrics" and "sampling", kept there so version-1
readers and the README's layout stay valid) and further points in "sweeps": a suite's sweep points
and the points `genbench eval --run` adds later, all of one schema (EvalPoint).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RECORD_VERSION = 2
KINDS = ("suite", "external")          # trained by a suite / samples made elsewhere (eval --samples)
FINAL_STATUSES = ("complete", "diverged")
STATUSES = FINAL_STATUSES + ("failed",)


class RecordError(ValueError):
    """A metrics.json that is not a run record (malformed JSON is the store's to report)."""


@dataclass
class EvalPoint:
    """One evaluation of a run's samples: the main one, a sweep point, or one added by eval --run."""
    name: str = "main"
    param: str | None = None              # the swept sampler option (None for the main point)
    value: Any = None                     # its value at this point
    sampler: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    # Set where this point differs from the run's provenance (another extractor, n_fake, seed offset).
    provenance: dict | None = None

    def identity(self) -> tuple:
        """What makes two points the same evaluation: a point with this identity is never redone."""
        prov = self.provenance or {}
        return (self.name, _canon(self.sampler), prov.get("extractor_sha256"), prov.get("extractor"),
                prov.get("n_fake"), prov.get("seed"))

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["provenance"] is None:
            del d["provenance"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalPoint":
        if not isinstance(d, dict):
            raise RecordError("an evaluation point is not a mapping")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RunRecord:
    status: str
    suite: str
    dataset: str
    card: str
    seed: int
    family: str | None = None
    kind: str = "suite"
    suite_version: int | None = None
    traits: dict = field(default_factory=dict)       # what the card is (schedule, variance, architecture, ...)
    metrics: dict = field(default_factory=dict)      # the main point's metrics
    sampling: dict = field(default_factory=dict)     # the main point's sampling cost
    sampler: dict = field(default_factory=dict)      # the main point's sampler options
    training: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    sweeps: list = field(default_factory=list)       # [EvalPoint]
    model: dict | None = None                        # {"file", "sha256", "bytes"} of model.pt
    samples: dict | None = None                      # external sample sets: {"path", "kind", "count", "sha256"}
    gate: dict = field(default_factory=dict)         # what compare needs from the suite: {"tolerances": {...}}
    settings: dict = field(default_factory=dict)     # what the run was made with (budget, suite version, card,
                                                     # dataset, eval): a rerun with other settings is named
    declared_metrics: dict = field(default_factory=dict)   # key -> Metric fields, for metrics a family adds
    error: str | None = None
    traceback: str | None = None
    record_version: int = RECORD_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise RecordError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.kind not in KINDS:
            raise RecordError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        self.sweeps = [p if isinstance(p, EvalPoint) else EvalPoint.from_dict(p) for p in self.sweeps]

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def main_point(self) -> EvalPoint:
        return EvalPoint("main", None, None, self.sampler or self.sampling.get("sampler") or {},
                         self.metrics, self.sampling)

    def points(self) -> list[EvalPoint]:
        return [self.main_point(), *self.sweeps]

    def has_point(self, point: EvalPoint) -> bool:
        return any(p.identity() == point.identity() for p in self.points())

    def add_point(self, point: EvalPoint) -> bool:
        """Append a point unless one with its identity is there already; True when added."""
        if self.has_point(point):
            return False
        self.sweeps.append(point)
        return True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sweeps"] = [p.to_dict() for p in self.sweeps]
        for k in ("model", "samples", "error", "traceback"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "RunRecord":
        """A record from its JSON form, any version so far; RecordError when it is not one."""
        if not isinstance(d, dict):
            raise RecordError("not a JSON object")
        version = d.get("record_version", 1)
        if not isinstance(version, int) or version < 1 or version > RECORD_VERSION:
            raise RecordError(f"record_version {version!r} is not supported (1..{RECORD_VERSION})")
        for key in ("status",):
            if key not in d:
                raise RecordError(f"no {key!r}")
        for key in ("metrics", "sampling", "training", "provenance"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise RecordError(f"{key!r} is not a mapping")
        if d.get("sweeps") is not None and not isinstance(d["sweeps"], list):
            raise RecordError("'sweeps' is not a list")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        try:
            kw["seed"] = int(kw.get("seed", 0))
        except (TypeError, ValueError):
            raise RecordError(f"seed {d.get('seed')!r} is not an integer") from None
        for key in ("suite", "dataset", "card"):
            kw[key] = str(kw.get(key, ""))
        if version == 1:   # the main sampler lived inside "sampling"
            kw.setdefault("sampler", (kw.get("sampling") or {}).get("sampler") or {})
        kw["record_version"] = RECORD_VERSION
        try:
            return cls(**kw)
        except TypeError as e:
            raise RecordError(str(e)) from None


def _canon(obj: Any) -> Any:
    """A hashable canonical form of a sampler dict (50 and 50.0 are one value)."""
    if isinstance(obj, dict):
        return tuple(sorted((str(k), _canon(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_canon(v) for v in obj)
    if isinstance(obj, float) and math.isfinite(obj) and obj.is_integer():
        return int(obj)
    return obj
