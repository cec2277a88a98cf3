"""Suites and model cards: YAML files loaded into frozen dataclasses, every value checked when loaded.

An unknown key, a value of the wrong type or out of range, or a name with path syntax is an error
naming the key and the file, so a typo never falls back to a default and a bad value never reaches
training. Suites and cards are found by name on a search path: the folders in $GENBENCH_PATH (each
may hold `suites/` and `models/`), then the ones genbench ships (the repository's top-level `models/`
and `suites/`, carried into the wheel as genbench/shipped/). A path to a YAML file works anywhere a
name does; a suite's card entries may be paths relative to the suite file's folder.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from genbench import metrics as registry
from genbench.errors import UserError

# torch.compile modes the fast path accepts (genbench/fastpath.py says what "tuned" is); here, without
# torch, so the CLI can offer them without importing torch.
TUNED = "tuned"
COMPILE_MODES = ("off", "default", "reduce-overhead", TUNED, "max-autotune", "max-autotune-no-cudagraphs")

ROOT = Path(__file__).resolve().parent.parent
PATH_ENV = "GENBENCH_PATH"
SPLITS = ("train", "test")
MAX_INT = 2**31 - 1


def shipped_dir(kind: str) -> Path:
    """The shipped `models` or `suites` folder: inside an installed wheel genbench/shipped/KIND, in a
    checkout (or an editable install) the repository's top-level KIND/."""
    packaged = Path(__file__).resolve().parent / "shipped" / kind
    return packaged if packaged.is_dir() else ROOT / kind


def search_dirs(kind: str) -> list[Path]:
    """Where names of this kind are looked up, first match wins: $GENBENCH_PATH's folders, then shipped."""
    user = [Path(p) / kind for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    return [*user, shipped_dir(kind)]


# Kept as names for callers that list the shipped folders.
CARDS_DIR = shipped_dir("models")
SUITES_DIR = shipped_dir("suites")


def metric_groups() -> tuple[str, ...]:
    """Metric groups a suite may ask for (the registry's selectable groups)."""
    return registry.selectable_groups()


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
    # What the card is, for claims that select runs by kind rather than by card name:
    # e.g. {architecture: adm, schedule: cosine, variance: learned, conditioning: classifier-free}.
    traits: dict = field(default_factory=dict)
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

    @property
    def cheap_groups(self) -> tuple[str, ...]:
        """The groups a cheap evaluation during training computes."""
        return tuple(g for g in self.metrics if g in ("fid", "modes"))


@dataclass(frozen=True)
class Sweep:
    """An evaluation sweep over one trained model: `param` takes each of `values`, on top of the
    card's sampler and `sampler` here. Each point becomes its own row in the results."""
    name: str
    param: str
    values: tuple
    cards: tuple[str, ...] = ()   # empty: every card whose family accepts `param`
    sampler: dict = field(default_factory=dict)
    # Samples per point when not the suite's n_fake (e.g. a 1000-step ancestral point timed on a modest n);
    # such a point computes the metric groups that n allows, and its provenance records its n_fake.
    n_fake: int | None = None


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
    tolerances: dict = field(default_factory=dict)  # metric -> absolute floor under the gate's band
    jobs: int = 1              # runs at once (worker processes); for suites of many small CPU runs
    cluster: dict = field(default_factory=dict)   # executor resources: Slurm partition, GPUs/CPUs per run, ...
    path: str = ""


# --------------------------------------------------------------------------- value checks


def _fail(where: str, key: str, msg: str):
    raise UserError(f"{where}: {key!r} {msg}")


def check_int(where: str, key: str, v: Any, lo: int = 1, hi: int = MAX_INT, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, key, f"must be a whole number, got {v!r}")
    if not lo <= v <= hi:
        _fail(where, key, f"must be in [{lo}, {hi}], got {v}")
    return v


def check_float(where: str, key: str, v: Any, *, positive: bool = False, lo: float | None = None,
                hi_open: float | None = None, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(where, key, f"must be a finite number, got {v!r}")
    if positive and not v > 0:
        _fail(where, key, f"must be positive, got {v}")
    if lo is not None and v < lo:
        _fail(where, key, f"must be at least {lo}, got {v}")
    if hi_open is not None and not v < hi_open:
        _fail(where, key, f"must be below {hi_open}, got {v}")
    return float(v)


def check_str(where: str, key: str, v: Any, *, empty: bool = False) -> str:
    if not isinstance(v, str) or (not empty and not v.strip()):
        _fail(where, key, f"must be a{'' if empty else ' non-empty'} string, got {v!r}")
    return v


def check_map(where: str, key: str, v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        _fail(where, key, f"must be a mapping, got {type(v).__name__}")
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        _fail(where, key, f"has a key that is not a string: {bad[0]!r}")
    return v


def check_list(where: str, key: str, v: Any, *, nonempty: bool = True) -> list:
    if isinstance(v, (str, dict)) or not isinstance(v, (list, tuple)):
        _fail(where, key, f"must be a list, got {v!r}")
    if nonempty and not v:
        _fail(where, key, "must not be empty")
    return list(v)


def check_name(where: str, key: str, v: Any) -> str:
    from genbench.store import check_name as plain

    check_str(where, key, v)
    try:
        return plain(v, key)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown or "path" in data:
        raise UserError(f"{where}: unknown key {(unknown or ['path'])[0]!r} "
                        f"(valid: {', '.join(sorted(names - {'path'}))})")
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
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------- finding files


def _is_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml"))


def _resolve(name_or_path: str, kind_dir: str, kind: str, relative_to: Path | None = None) -> Path:
    """A YAML path (as given, or relative to `relative_to` for a suite's card entries, and then never
    outside that folder) or a plain name looked up on the search path."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError(f"{kind} name must be a non-empty string, got {name_or_path!r}")
    if _is_path(name_or_path):
        p = Path(name_or_path)
        if relative_to is not None and not p.is_absolute():
            base = relative_to.resolve()
            p = (base / p).resolve()
            if not p.is_relative_to(base):
                raise UserError(f"{kind} file {name_or_path!r} lies outside the suite's folder {base}")
        if not p.is_file():
            raise UserError(f"{kind} file {p} not found")
        return p
    from genbench.store import check_name as plain

    plain(name_or_path, kind)
    for d in search_dirs(kind_dir):
        p = d / f"{name_or_path}.yaml"
        if p.is_file():
            return p
    raise UserError(f"unknown {kind} {name_or_path!r}; choose one of: {', '.join(list_names(kind_dir))}")


def list_names(kind_dir: str | Path) -> list[str]:
    """Names of every suite ('suites') or card ('models') on the search path; a folder lists its own."""
    if isinstance(kind_dir, Path):
        return sorted(p.stem for p in kind_dir.glob("*.yaml"))
    return sorted({p.stem for d in search_dirs(kind_dir) for p in d.glob("*.yaml")})


def find_suite(name: str) -> Path:
    return _resolve(name, "suites", "suite")


def find_card(name: str, relative_to: Path | None = None) -> Path:
    return _resolve(name, "models", "model card", relative_to)


# --------------------------------------------------------------------------- cards


def card_from_dict(data: dict, where: str) -> Card:
    _build(Card, data, where)
    d = dict(data)
    check_name(where, "name", d["name"])
    check_str(where, "family", d["family"])
    check_str(where, "description", d.get("description", ""), empty=True)
    for key in ("params", "sampler", "traits"):
        d[key] = dict(check_map(where, key, d.get(key, {})))
    for k, v in d["traits"].items():
        if not isinstance(v, (str, int, float, bool)) or isinstance(v, float) and not math.isfinite(v):
            _fail(where, f"traits.{k}", f"must be a string, number or boolean, got {v!r}")
    d["batch_size"] = check_int(where, "batch_size", d.get("batch_size", 64), 1, 1 << 20)
    if d.get("ema") is not None:
        check_float(where, "ema", d["ema"], lo=0.0, hi_open=1.0)
    return Card(**{**d, "path": where})


def load_card(name_or_path: str, overrides: dict | None = None, relative_to: Path | None = None) -> Card:
    path = find_card(name_or_path, relative_to)
    data = _read_yaml(path)
    if overrides:
        data = merge(data, check_map(str(path), "overrides", overrides))
    card = card_from_dict(data, str(path))
    _check_family(card)
    return card


def _check_family(card: Card) -> None:
    from genbench.families import resolve_family

    resolve_family(card.family, where=card.path)


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------- suites


def _dataset(x: Any, where: str) -> DatasetRef:
    d = _build(DatasetRef, {"name": x} if isinstance(x, str) else x, f"{where}: datasets")
    check_str(where, "datasets.name", d["name"])
    check_int(where, "datasets.image_size", d.get("image_size"), 1, 4096, optional=True)
    check_int(where, "datasets.size", d.get("size"), 1, optional=True)
    return DatasetRef(**d)


def _eval(ev: Any, where: str) -> EvalConfig:
    ev = dict(_build(EvalConfig, ev or {}, f"{where}: eval"))
    w = f"{where}: eval"
    check_str(w, "extractor", ev.get("extractor", "auto"))
    if "metrics" in ev:
        groups = [check_str(w, "metrics", m) for m in check_list(w, "metrics", ev["metrics"])]
        known = metric_groups()
        bad = [m for m in groups if m not in known]
        if bad:
            raise UserError(f"{where}: unknown metric {bad[0]!r}; choose from: {', '.join(known)}")
        if len(set(groups)) != len(groups):
            _fail(w, "metrics", f"names a group twice: {groups}")
        ev["metrics"] = tuple(groups)
    for key in ("n_fake", "batch_size", "cheap_n_fake", "n_likelihood"):
        if key in ev:
            check_int(w, key, ev[key], 1)
    check_int(w, "kid_subset_size", ev.get("kid_subset_size", 1000), 2)
    check_int(w, "n_real", ev.get("n_real"), 1, optional=True)
    if ev.get("ref_split", "test") not in SPLITS:
        _fail(w, "ref_split", f"must be one of {', '.join(SPLITS)}, got {ev['ref_split']!r}")
    check_float(w, "every_kimg", ev.get("every_kimg"), positive=True, optional=True)
    out = EvalConfig(**ev)
    check_counts(out, w)
    return out


def check_counts(ev: EvalConfig, where: str) -> None:
    """n_fake (and n_real, cheap_n_fake) at least what each requested metric group needs."""
    for name in ev.metrics:
        need = registry.GROUPS[name].needs(ev)
        if ev.n_fake < need:
            raise UserError(f"{where}: n_fake {ev.n_fake} is fewer than metric {name!r} needs ({need})")
        if ev.n_real is not None and ev.n_real < need:
            raise UserError(f"{where}: n_real {ev.n_real} is fewer than metric {name!r} needs ({need})")
    if ev.every_kimg is not None:
        for name in ev.cheap_groups:
            need = registry.GROUPS[name].needs(ev)
            if ev.cheap_n_fake < need:
                raise UserError(f"{where}: cheap_n_fake {ev.cheap_n_fake} is fewer than metric {name!r} needs ({need})")


def _sweep(s: Any, where: str) -> Sweep:
    d = _build(Sweep, s, f"{where}: sweeps")
    w = f"{where}: sweeps"
    check_name(w, "name", d["name"])
    check_str(w, "param", d["param"])
    values = check_list(w, f"{d['name']}.values", d["values"])
    for v in values:
        if isinstance(v, (dict, list)) or v is None:
            _fail(w, f"{d['name']}.values", f"must hold plain values, got {v!r}")
    cards = [check_str(w, f"{d['name']}.cards", c) for c in check_list(w, f"{d['name']}.cards", d.get("cards", []),
                                                                        nonempty=False)]
    return Sweep(name=d["name"], param=d["param"], values=tuple(values), cards=tuple(cards),
                 sampler=dict(check_map(w, f"{d['name']}.sampler", d.get("sampler", {}))),
                 n_fake=check_int(w, f"{d['name']}.n_fake", d.get("n_fake"), 2, optional=True))


def _tolerances(tol: Any, where: str) -> dict:
    tol = check_map(where, "tolerances", tol)
    if tol:
        from genbench.families import builtin_families

        builtin_families()   # registers the metrics the families declare
    for k, v in tol.items():
        if registry.get(k) is None:
            _fail(where, "tolerances", f"names unknown metric {k!r}")
        check_float(where, f"tolerances.{k}", v, lo=0.0)
    return dict(tol)


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    data = _read_yaml(path)
    where = str(path)
    _build(Suite, data, where)
    d = dict(data)
    check_name(where, "name", d["name"])
    check_int(where, "version", d["version"], 1)
    check_str(where, "description", d.get("description", ""), empty=True)
    ds = d.pop("datasets")
    datasets = tuple(_dataset(x, where) for x in check_list(where, "datasets", ds if isinstance(ds, list) else [ds]))
    names = [x.name for x in datasets]
    if len(set(names)) != len(names):
        _fail(where, "datasets", f"names a dataset twice: {names}")
    ev = _eval(d.pop("eval", {}), where)
    sweeps = tuple(_sweep(s, where) for s in check_list(where, "sweeps", d.pop("sweeps", None) or [], nonempty=False))
    if len({s.name for s in sweeps}) != len(sweeps):
        _fail(where, "sweeps", "has two sweeps of one name")
    for key in ("seeds", "jobs"):
        check_int(where, key, d.get(key, 1), 1, 100_000)
    d["budget_kimg"] = check_float(where, "budget_kimg", d.get("budget_kimg", 10.0), positive=True)
    overrides = check_map(where, "overrides", d.pop("overrides", None))
    cards = tuple(check_str(where, "cards", c) for c in check_list(where, "cards", d.pop("cards")))
    if len(set(cards)) != len(cards):
        _fail(where, "cards", f"names a card twice: {list(cards)}")
    unknown_over = sorted(set(overrides) - set(cards))
    if unknown_over:
        raise UserError(f"{where}: overrides name card {unknown_over[0]!r}, which is not in cards")
    for c, o in overrides.items():
        check_map(where, f"overrides.{c}", o)
    d["tolerances"] = _tolerances(d.get("tolerances"), where)
    from genbench.executors import check_cluster   # the keys live with the executors

    d["cluster"] = check_cluster(d.get("cluster"), where)
    suite = Suite(datasets=datasets, eval=ev, sweeps=sweeps, overrides=overrides, cards=cards, path=where, **d)
    loaded = [load_card(c, overrides.get(c), relative_to=path.parent) for c in cards]  # fail before anything runs
    card_names = [c.name for c in loaded]
    if len(set(card_names)) != len(card_names):
        _fail(where, "cards", f"two entries are cards of one name: {card_names}")
    for sw in sweeps:
        bad = [c for c in sw.cards if c not in cards and c not in card_names]
        if bad:
            _fail(where, f"sweeps.{sw.name}.cards", f"names card {bad[0]!r}, which is not in cards")
    return suite


def suite_cards(suite: Suite, only: tuple[str, ...] = ()) -> list[Card]:
    base = Path(suite.path).parent if suite.path else None
    cards = [(ref, load_card(ref, suite.overrides.get(ref), relative_to=base)) for ref in suite.cards]
    if only:
        names = {ref for ref, _ in cards} | {c.name for _, c in cards}
        bad = [c for c in only if c not in names]
        if bad:
            raise UserError(f"--only: card {bad[0]!r} is not in suite {suite.name!r} "
                            f"(its cards: {', '.join(c.name for _, c in cards)})")
    return [c for ref, c in cards if not only or ref in only or c.name in only]


def to_dict(obj) -> Any:
    """Dataclass -> plain JSON-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
