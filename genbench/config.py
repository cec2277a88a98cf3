"""Suites and model cards: YAML files loaded into frozen dataclasses. An unknown key is an error
naming the key and the file, so a typo never silently falls back to a default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genbench.errors import UserError

# torch.compile modes the fast path accepts (genbench/fastpath.py says what "tuned" is); here, without
# torch, so the CLI can offer them without importing torch.
TUNED = "tuned"
COMPILE_MODES = ("off", "default", "reduce-overhead", TUNED, "max-autotune", "max-autotune-no-cudagraphs")

ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = ROOT / "models"
SUITES_DIR = ROOT / "suites"

# Metric groups a suite may ask for. fid/isc/kid/prc come from torch-fidelity on one feature pass.
METRIC_GROUPS = ("fid", "isc", "kid", "prc", "modes", "nll")


@dataclass(frozen=True)
class Card:
    """One model variant: a family plus its hyper-parameters."""
    name: str
    family: str
    description: str = ""
    params: dict = field(default_factory=dict)    # -> Family(spec, **params)
    sampler: dict = field(default_factory=dict)   # default sampler kwargs for the main evaluation
    batch_size: int = 64
    ema: float | None = None                      # EMA decay of the sampling weights; None = off
    path: str = ""


@dataclass(frozen=True)
class DatasetRef:
    name: str
    image_size: int | None = None
    size: int | None = None       # number of training examples (synthetic and stacked sets)


@dataclass(frozen=True)
class EvalConfig:
    extractor: str = "auto"       # auto: the dataset's domain classifier, else inception-v3-compat
    metrics: tuple[str, ...] = ("fid", "isc", "kid", "prc", "modes", "nll")
    n_fake: int = 1000
    n_real: int | None = None     # None: the whole reference split
    ref_split: str = "test"
    batch_size: int = 250
    every_kimg: float | None = None   # cheap evaluation interval for quality-vs-kimg curves
    cheap_n_fake: int = 256
    kid_subset_size: int = 1000
    n_likelihood: int = 1000          # held-out images for nll_bpd and the family's extra metrics


@dataclass(frozen=True)
class Sweep:
    """An evaluation sweep over one trained model: `param` takes each of `values`, on top of the
    card's sampler and `sampler` here. Each point becomes its own row in the results."""
    name: str
    param: str
    values: tuple
    cards: tuple[str, ...] = ()   # empty: every card whose family accepts `param`
    sampler: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    version: int
    datasets: tuple[DatasetRef, ...]
    cards: tuple[str, ...]
    description: str = ""
    seeds: int = 1
    budget_kimg: float = 10.0
    eval: EvalConfig = field(default_factory=EvalConfig)
    overrides: dict = field(default_factory=dict)   # card name -> Card fields to replace/merge
    sweeps: tuple[Sweep, ...] = ()
    tolerances: dict = field(default_factory=dict)  # metric -> absolute tolerance for `compare`
    jobs: int = 1              # runs at once (worker processes); for suites of many small CPU runs
    path: str = ""


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(names - {'path'}))})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{where}: missing key {missing[0]!r}")
    return data


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def _resolve(name_or_path: str, folder: Path, kind: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"{kind} file {p} not found")
        return p
    p = folder / f"{name_or_path}.yaml"
    if not p.is_file():
        raise UserError(f"unknown {kind} {name_or_path!r}; choose one of: {', '.join(list_names(folder))}")
    return p


def list_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def card_from_dict(data: dict, where: str) -> Card:
    _build(Card, data, where)
    d = dict(data)
    for key in ("params", "sampler"):
        if not isinstance(d.get(key, {}), dict):
            raise UserError(f"{where}: {key!r} must be a mapping")
    return Card(**{**d, "path": where})


def load_card(name_or_path: str, overrides: dict | None = None) -> Card:
    path = _resolve(name_or_path, CARDS_DIR, "model card")
    data = _read_yaml(path)
    if overrides:
        data = merge(data, overrides)
    card = card_from_dict(data, str(path))
    _check_family(card)
    return card


def _check_family(card: Card) -> None:
    from genbench.families import families

    known = families()
    if card.family not in known:
        raise UserError(f"{card.path}: unknown family {card.family!r}; known: {', '.join(sorted(known))}")


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_suite(name_or_path: str) -> Suite:
    path = _resolve(name_or_path, SUITES_DIR, "suite")
    data = _read_yaml(path)
    where = str(path)
    _build(Suite, data, where)
    d = dict(data)
    ds = d.pop("datasets")
    ds = ds if isinstance(ds, list) else [ds]
    datasets = tuple(DatasetRef(**_build(DatasetRef, {"name": x} if isinstance(x, str) else x,
                                         f"{where}: datasets")) for x in ds)
    ev = d.pop("eval", {}) or {}
    ev = _build(EvalConfig, ev, f"{where}: eval")
    if "metrics" in ev:
        bad = [m for m in ev["metrics"] if m not in METRIC_GROUPS]
        if bad:
            raise UserError(f"{where}: unknown metric {bad[0]!r}; choose from: {', '.join(METRIC_GROUPS)}")
        ev = {**ev, "metrics": tuple(ev["metrics"])}
    sweeps = tuple(Sweep(**{**_build(Sweep, s, f"{where}: sweeps"), "values": tuple(s["values"]),
                            "cards": tuple(s.get("cards", ()))}) for s in d.pop("sweeps", []) or [])
    for key in ("seeds", "jobs"):
        v = d.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{where}: {key!r} must be a whole number of at least 1, got {v!r}")
    overrides = d.pop("overrides", {}) or {}
    cards = tuple(d.pop("cards"))
    unknown_over = sorted(set(overrides) - set(cards))
    if unknown_over:
        raise UserError(f"{where}: overrides name card {unknown_over[0]!r}, which is not in cards")
    suite = Suite(datasets=datasets, eval=EvalConfig(**ev), sweeps=sweeps, overrides=overrides,
                  cards=cards, path=where, **d)
    for c in cards:  # fail on a bad card before anything runs
        load_card(c, overrides.get(c))
    return suite


def suite_cards(suite: Suite, only: tuple[str, ...] = ()) -> list[Card]:
    if only:
        bad = [c for c in only if c not in suite.cards]
        if bad:
            raise UserError(f"--only: card {bad[0]!r} is not in suite {suite.name!r} "
                            f"(its cards: {', '.join(suite.cards)})")
    return [load_card(c, suite.overrides.get(c)) for c in suite.cards if not only or c in only]


def to_dict(obj) -> Any:
    """Dataclass -> plain JSON-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
