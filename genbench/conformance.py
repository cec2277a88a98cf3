"""Conformance: what genbench expects of every family, checked one way for its own families
(tests/test_conformance.py) and for anyone's (`genbench check-family TARGET`).

A family is checked on one data shape (images [C, H, W] or 2-D points [2]) with one configuration:
a card file's params and sampler, or, for a family name or import path, the tiny configuration the
class declares (else its defaults). The checks, in order (`CHECKS`):

  builds           Family(spec, **params) constructs; its phases are Phase objects with distinct names and
                   positive shares that sum to 1 (the kimg budget is split by them)
  plan             it builds the way `genbench run` plans a card: on the meta device (the CPU where the
                   constructor needs real numbers), and nfe(**sampler) accepts the base sampler
  train[PHASE]     one training step per phase (start_phase, configure_optimizers, train_step) returns
                   non-empty logs, all finite, and leaves every parameter finite
  nfe              nfe(**sampler) is a positive int
  sample-shape     sample(rng of n) returns a tensor [n, *shape]
  sample-range     finite, and images within [-1, 1] (up to streams.SAMPLE_TOL, as sample_stream enforces)
  same-seeds       the same seeds give the same samples
  batch-split      the same seeds give the same samples whatever the batch split (n at once vs 1 + n-1)
  seeds-differ     other seeds give other samples
  reload           the state_dict survives torch.save / torch.load(weights_only=True) and, loaded into a
                   freshly built model (and a deepcopy, as the EMA is made), gives the same samples
  held-out         nll_bpd is None or finite (a number or one per image); extra_metrics returns finite
                   numbers under keys the class declares (declared_metrics)
  unknown-option   an option outside sampler_options is refused (a ValueError or TypeError from nfe); with
                   sampler_options declared the harness refuses it already
  sampler[OPTS]    every declared sampler option, at its example values (below): nfe gives a positive
                   int and sample returns [n, *shape] in range; an option with no example fails

Hooks (class attributes; each optional, each a value or a function of the DataSpec returning one,
looked up along the class's bases, so a subclass of a built-in family inherits its configuration):
  conformance_params   constructor params for a small, fast model (merged over the class's defaults);
                       used when the target is a family name or an import path, never for a card file
  conformance_sampler  the base sampler kwargs for the checks (e.g. {"steps": 5}); a card file's
                       `sampler:` takes its place
  sampler_examples     values each sampler option is tried at, on top of the base sampler: a mapping
                       {option: value or [values]} (one trial per value), or a list of sampler dicts
                       (one trial each, for options that only mean something together). An option with
                       no example is tried at the default its sample()/nfe() signature spells, if any.
With a card file a trial the card's model refuses with a ValueError or TypeError is "n/a" (the card
may not support it, e.g. guidance without label dropout; refusing in one line is the contract);
with the class's own conformance configuration every example must be accepted.

Genbench's own families declare theirs in their class bodies, as a plug-in does.
"""
from __future__ import annotations

import copy
import inspect
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from genbench.errors import UserError
from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase
from genbench.rng import SeedRNG

SPLIT_ATOL = 1e-4        # batch-split and reload comparisons: batched kernels may reorder sums
DEFAULT_SHAPE = (1, 16, 16)   # digits at 16x16, the smoke suite's data
DEFAULT_CLASSES = 10
N_SAMPLES = 4
N_TRAIN = 8
UNKNOWN_OPTION = "genbench_conformance_no_such_option"
HOOKS = ("conformance_params", "conformance_sampler", "sampler_examples")

PASS, FAIL, NA = "pass", "FAIL", "n/a"


# ------------------------------------------------------------------------------------------ hooks


def hook(cls: type, name: str, spec: DataSpec, default=None):
    """The value of hook `name` for `cls` on `spec`: the first class along its bases that declares it as a
    class attribute, called with the spec if callable."""
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__get__(None, cls)
            break
    else:
        return default
    return value(spec) if callable(value) else value


def declares_config(cls: type) -> bool:
    """Whether `cls` has a conformance configuration (its own or inherited)."""
    probe = DataSpec(DEFAULT_SHAPE, DEFAULT_CLASSES)
    return hook(cls, "conformance_params", probe) is not None


def sampler_trials(cls: type, spec: DataSpec, options: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """(the sampler dicts to try, the declared options no trial covers)."""
    ex = hook(cls, "sampler_examples", spec, default={}) or {}
    trials: list[dict] = []
    if isinstance(ex, dict):
        for opt, values in ex.items():
            for v in (values if isinstance(values, (list, tuple)) else [values]):
                trials.append({opt: v})
    elif isinstance(ex, (list, tuple)) and all(isinstance(d, dict) for d in ex):
        trials = [dict(d) for d in ex]
    else:
        raise ValueError(f"sampler_examples must be a mapping or a list of sampler dicts, got {ex!r}")
    covered = {k for t in trials for k in t}
    defaults = _signature_defaults(cls)
    for opt in options:
        if opt not in covered and opt in defaults:
            trials.append({opt: defaults[opt]})
            covered.add(opt)
    return trials, [o for o in options if o not in covered]


def _signature_defaults(cls: type) -> dict:
    out = {}
    for fn in (cls.sample, cls.nfe):
        for k, p in inspect.signature(fn).parameters.items():
            if k not in ("self", "rng", "labels") and p.default is not inspect.Parameter.empty:
                out.setdefault(k, p.default)
    return out


# ------------------------------------------------------------------------------------------ report


@dataclass
class Check:
    name: str
    result: str            # PASS, FAIL or NA
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    target: str
    cls: type | None
    spec: DataSpec
    params: dict
    sampler: dict
    source: str                                   # where the configuration came from
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.result == FAIL]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failed

    def table(self) -> str:
        cls = f"{self.cls.__module__}:{self.cls.__qualname__}" if self.cls is not None else "?"
        fam = getattr(self.cls, "family", "") if self.cls is not None else ""
        fam = (f"family {fam!r} in records and claims" if fam else
               "no declared family: records carry the card's family string")
        head = [f"check-family {self.target}: class {cls}; {fam}",
                f"  data {'x'.join(map(str, self.spec.shape))}, {self.spec.num_classes} classes; "
                f"params ({self.source}) {_short(self.params)}; sampler {_short(self.sampler)}", ""]
        w = max([len("check")] + [len(c.name) for c in self.checks])
        rows = [f"{'check':{w}}  result  {'s':>6}  detail", f"{'-' * w}  ------  {'-' * 6}  ------"]
        rows += [f"{c.name:{w}}  {c.result:6}  {c.seconds:6.2f}  {c.detail}" for c in self.checks]
        n_pass = sum(c.result == PASS for c in self.checks)
        tail = (f"all {n_pass} checks pass" + (f" ({len(self.checks) - n_pass} n/a)" if n_pass < len(self.checks)
                                              else "")) if self.ok else \
            f"FAILED: {', '.join(self.failed)} ({len(self.failed)} of {len(self.checks)} checks)"
        return "\n".join(head + rows + ["", tail])


def _short(obj, n: int = 160) -> str:
    try:
        s = json.dumps(obj, default=repr, sort_keys=True)
    except (TypeError, ValueError):
        s = repr(obj)
    return s if len(s) <= n else s[: n - 3] + "..."


def _line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return f"{type(e).__name__}: {s[:300]}" if s else type(e).__name__


# ------------------------------------------------------------------------------------------ the checks


class _Runner:
    def __init__(self, report: Report):
        self.report = report

    def check(self, name: str, fn: Callable[[], str | None], passthrough: tuple = ()) -> bool:
        """Run one check: fn returns a detail (pass) or (result, detail), or raises AssertionError (FAIL with
        its message) or any other exception (FAIL naming it; those in `passthrough` propagate)."""
        t0 = time.perf_counter()
        try:
            out = fn()
            result, detail = out if isinstance(out, tuple) else (PASS, out or "")
        except passthrough:
            raise
        except AssertionError as e:
            detail, result = " ".join(str(e).split()) or "assertion failed", FAIL
        except Exception as e:  # noqa: BLE001 - any crash of the family is a failed check, named
            detail, result = _line(e), FAIL
        self.report.checks.append(Check(name, result, detail, time.perf_counter() - t0))
        return result != FAIL

    def na(self, name: str, why: str) -> None:
        self.report.checks.append(Check(name, NA, why))

    def fail(self, name: str, why: str) -> None:
        self.report.checks.append(Check(name, FAIL, why))


def _train_batch(spec: DataSpec, device) -> Batch:
    g = torch.Generator().manual_seed(1234)
    if spec.is_image:
        x = torch.rand(N_TRAIN, *spec.shape, generator=g) * 2 - 1
        x = torch.round((x + 1) * 127.5) / 127.5 - 1                 # 8-bit values, as the loader gives
    else:
        x = torch.randn(N_TRAIN, *spec.shape, generator=g) * 2
    y = (torch.arange(N_TRAIN) % spec.num_classes) if spec.num_classes > 0 else None
    return Batch(x.to(device), None if y is None else y.to(device))


def _labels(model: GenerativeModel, n: int, offset: int = 0):
    if not model.conditional or model.spec.num_classes < 1:
        return None
    return ((torch.arange(n) + offset) % model.spec.num_classes).to(model.device)


def _sample(model: GenerativeModel, seed: int, n: int, sampler: dict, lo: int = 0, hi: int | None = None):
    """Samples lo..hi-1 of seed `seed`'s n streams, in eval mode without gradients, on the host."""
    hi = n if hi is None else hi
    rng = SeedRNG.for_run(seed, n, device=model.device)[lo:hi]
    labels = _labels(model, n)
    labels = None if labels is None else labels[lo:hi]
    model.eval()
    with torch.no_grad():
        x = model.sample(rng, labels=labels, **sampler)
    return x.detach().float().cpu() if torch.is_tensor(x) else x


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return torch.allclose(a, b, atol=SPLIT_ATOL, rtol=SPLIT_ATOL), diff


def family_ref(cls: type) -> str:
    """The string a card would name `cls` by: its registered name, else its import path."""
    from genbench.families import FAMILIES

    name = next((n for n, c in FAMILIES.items() if c is cls), None)
    return name or f"{cls.__module__}:{cls.__qualname__}"


def run_checks(cls: type[GenerativeModel], spec: DataSpec, *, params: dict | None = None, sampler: dict | None = None,
               strict: bool = True, device: str | torch.device = "cpu", target: str | None = None,
               source: str = "", family: str | None = None) -> Report:
    """Every conformance check of `cls` on `spec`. params/sampler None: the class's conformance hooks.
    strict: every sampler example must be accepted (False for a card's own configuration). family: the
    string the runner resolves (a card's `family:`; default: family_ref(cls))."""
    from genbench.scoring.streams import range_problem, shape_problem

    device = torch.device(device)
    if params is None:
        params = dict(hook(cls, "conformance_params", spec, default={}) or {})
        source = source or ("conformance_params" if declares_config(cls) else "the family's defaults")
    if sampler is None:
        sampler = dict(hook(cls, "conformance_sampler", spec, default={}) or {})
    rep = Report(target or f"{cls.__module__}:{cls.__qualname__}", cls, spec, dict(params), dict(sampler),
                 source or "given")
    r = _Runner(rep)
    state: dict[str, Any] = {}

    def build(seed: int = 0) -> GenerativeModel:
        torch.manual_seed(seed)
        return cls(spec, **params).to(device)

    def builds():
        try:
            inspect.signature(cls).bind(spec, **params)
        except TypeError as e:
            if not strict:      # a card's params the family does not take: the card's mistake, as in `run`
                raise UserError(f"{rep.target}: params: {e} (family {family or family_ref(cls)!r})") from None
            raise AssertionError(f"conformance_params do not fit the constructor: {e}") from None
        try:
            m = build()
        except UserError as e:
            raise UserError(f"{rep.target}: params: {e}") from None
        assert isinstance(m, GenerativeModel), f"{cls.__name__}(spec, **params) is not a GenerativeModel"
        phases = m.phases()
        assert phases and all(isinstance(p, Phase) for p in phases), f"phases() must be a list of Phase, got {phases!r}"
        names = [p.name for p in phases]
        assert len(set(names)) == len(names), f"phase names repeat: {names}"
        shares = [float(p.share) for p in phases]
        assert all(s > 0 for s in shares) and abs(sum(shares) - 1) < 1e-6, \
            f"phase shares must be positive and sum to 1, got {dict(zip(names, shares))}"
        state["model"] = m
        n_par = sum(p.numel() for p in m.parameters())
        return f"{n_par / 1e3:.1f} k parameters; phases {', '.join(f'{n} ({s:g})' for n, s in zip(names, shares))}" \
               + ("; conditional" if m.conditional else "")

    # A UserError while building (a card's `network:` that cannot be built, diffusers missing) is bad
    # input, reported in one line with exit 2 like `genbench run` does; any other failure is this check's.
    if not r.check("builds", builds, passthrough=(UserError,)):
        return rep
    model: GenerativeModel = state["model"]

    def plan():
        from genbench.config import Card
        from genbench.runner import _meta_model

        card = Card(name="conformance", family=family or family_ref(cls), params=dict(params),
                    sampler=dict(sampler), path=rep.target)
        try:
            m = _meta_model(card, spec)
        except UserError as e:
            raise AssertionError(f"the runner's plan refuses it: {e}") from None
        where = next((p.device.type for p in m.parameters()), "meta")
        m.nfe(**sampler)
        return f"built on {where}" + ("" if where == "meta" else " (the constructor needs real numbers)")

    r.check("plan", plan)

    batch = _train_batch(spec, device)
    for phase in model.phases():
        def train(phase=phase):
            model.start_phase(phase)
            opts = model.configure_optimizers(phase)
            model.train()
            logs = model.train_step(batch, phase, opts)
            assert isinstance(logs, dict) and logs, f"train_step returned {logs!r}, not a non-empty dict of logs"
            vals = {k: float(v) for k, v in logs.items()}
            bad = {k: v for k, v in vals.items() if not math.isfinite(v)}
            assert not bad, f"non-finite logs {bad}"
            bad_p = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            assert not bad_p, f"non-finite parameters after the step: {', '.join(bad_p[:3])}"
            return ", ".join(f"{k} {v:.4g}" for k, v in list(vals.items())[:4])
        r.check(f"train[{phase.name}]", train)

    def nfe():
        k = model.nfe(**sampler)
        assert isinstance(k, int) and not isinstance(k, bool) and k >= 1, \
            f"nfe(**{_short(sampler)}) returned {k!r}, not a positive int"
        return f"{k} per sample"

    r.check("nfe", nfe)

    n = N_SAMPLES

    def shape():
        x = _sample(model, 7, n, sampler)
        problem = shape_problem(x, n, spec)
        assert problem is None, f"sample() {problem}"
        state["whole"] = x
        return f"[{', '.join(map(str, x.shape))}] {str(x.dtype).replace('torch.', '')}"

    if not r.check("sample-shape", shape):
        for name in ("sample-range", "same-seeds", "batch-split", "seeds-differ", "reload"):
            r.na(name, "needs samples of the right shape")
    else:
        whole = state["whole"]

        def rng_check():
            problem = range_problem(whole, spec)
            assert problem is None, f"sample() {problem}"
            return f"min {whole.min().item():.4g}, max {whole.max().item():.4g}"

        def same():
            again = _sample(model, 7, n, sampler)
            assert torch.equal(whole, again), \
                f"the same seeds gave other samples (max |diff| {(whole - again).abs().max().item():.3g})"
            return "identical"

        def split():
            parts = torch.cat([_sample(model, 7, n, sampler, 0, 1), _sample(model, 7, n, sampler, 1, n)])
            ok, diff = _close(whole, parts)
            assert ok, f"samples depend on the batch: {n} at once vs 1 + {n - 1} differ by up to {diff:.3g} " \
                       "(draw all randomness from rng, one stream per sample; no batch statistics)"
            return f"1 + {n - 1} vs {n}: max |diff| {diff:.2g}"

        def differ():
            other = _sample(model, 8, n, sampler)
            assert other.shape == whole.shape and not torch.allclose(whole, other), \
                "seeds 7 and 8 gave the same samples (draw the randomness from rng)"
            return f"max |diff| {(whole - other).abs().max().item():.3g}"

        def reload():
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            buf.seek(0)
            state_dict = torch.load(buf, map_location=device, weights_only=True)
            fresh = build(seed=1)
            fresh.load_state_dict(state_dict)
            ok, diff = _close(whole, _sample(fresh, 7, n, sampler))
            assert ok, f"a fresh model with the loaded state_dict samples differently (max |diff| {diff:.3g}): " \
                       "keep every piece of state in parameters or buffers"
            ok, diff = _close(whole, _sample(copy.deepcopy(model), 7, n, sampler))
            assert ok, f"a deepcopy samples differently (max |diff| {diff:.3g})"
            return f"{len(state_dict)} tensors; same samples"

        r.check("sample-range", rng_check)
        r.check("same-seeds", same)
        r.check("batch-split", split)
        r.check("seeds-differ", differ)
        r.check("reload", reload)

    def held_out():
        model.eval()
        b = Batch(batch.x, batch.y, rng=SeedRNG.for_run(0, N_TRAIN, device=device))
        parts = []
        nll = model.nll_bpd(b)
        if nll is not None:
            t = torch.as_tensor(nll, dtype=torch.float64)
            assert t.dim() == 0 or tuple(t.shape) == (N_TRAIN,), \
                f"nll_bpd returned shape {list(t.shape)}; want a number or one per image [{N_TRAIN}]"
            assert torch.isfinite(t).all(), f"nll_bpd is not finite: {t.tolist()}"
            parts.append(f"nll_bpd {t.mean().item():.4g}")
        else:
            parts.append("no likelihood")
        extra = model.extra_metrics(b) or {}
        declared = {m.key for m in getattr(cls, "declared_metrics", ())}
        undeclared = sorted(set(extra) - declared)
        assert not undeclared, f"extra_metrics returned undeclared {undeclared} (declare them in declared_metrics)"
        bad = {k: v for k, v in extra.items() if not math.isfinite(float(v))}
        assert not bad, f"extra_metrics not finite: {bad}"
        if extra:
            parts.append(", ".join(f"{k} {float(v):.4g}" for k, v in extra.items()))
        return "; ".join(parts)

    r.check("held-out", held_out)

    options = tuple(getattr(cls, "sampler_options", ()) or ())

    def unknown():
        try:
            model.nfe(**{**sampler, UNKNOWN_OPTION: 1})
        except (ValueError, TypeError) as e:
            return f"refused: {_line(e)[:80]}"
        if options:
            return "nfe accepts it, the harness refuses options outside sampler_options"
        raise AssertionError(f"nfe({UNKNOWN_OPTION}=1) accepted an unknown option and sampler_options is empty: "
                             "refuse unknown options in nfe (the harness validates sampler settings with it)")

    r.check("unknown-option", unknown)

    if not options:
        r.na("sampler[...]", "no sampler options declared")
        return rep
    try:
        trials, missing = sampler_trials(cls, spec, options)
    except ValueError as e:
        r.fail("sampler-examples", str(e))
        return rep
    if missing:
        r.fail("sampler-examples", f"no example value for {', '.join(missing)}: declare sampler_examples "
                                   "(or a default in sample()'s signature)")
    for trial in trials:
        undeclared = sorted(set(trial) - set(options))
        name = "sampler[" + ",".join(f"{k}={v}" for k, v in trial.items()) + "]"

        def one(trial=trial, undeclared=undeclared):
            assert not undeclared, f"example names {undeclared}, not in sampler_options {list(options)}"
            s = {**sampler, **trial}
            try:
                k = model.nfe(**s)
            except (ValueError, TypeError) as e:
                if strict:
                    raise AssertionError(f"refused: {_line(e)}") from None
                return NA, f"this configuration refuses it: {_line(e)[:120]}"
            assert isinstance(k, int) and not isinstance(k, bool) and k >= 1, f"nfe returned {k!r}"
            x = _sample(model, 3, 2, s)
            problem = shape_problem(x, 2, spec) or range_problem(x, spec)
            assert problem is None, f"sample() {problem}"
            return f"nfe {k}"
        r.check(name, one)
    return rep


# ------------------------------------------------------------------------------------------ targets


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x16x16' -> (1, 16, 16); '2' -> (2,) (2-D points)."""
    try:
        dims = tuple(int(p) for p in str(text).lower().replace(",", "x").split("x"))
    except ValueError:
        raise UserError(f"--shape {text!r}: write CxHxW (e.g. 1x16x16) or 2 for 2-D points") from None
    if len(dims) not in (1, 3) or min(dims) < 1 or (len(dims) == 1 and dims != (2,)):
        raise UserError(f"--shape {text!r}: write CxHxW (e.g. 1x16x16) or 2 for 2-D points")
    return dims


def target_spec(shape: str | None, classes: int | None, dataset: str | None, data_root=None) -> DataSpec:
    if dataset is not None:
        if shape is not None:
            raise UserError("--dataset and --shape both give the data shape: pass one")
        from genbench import data as gdata
        from genbench.bench import data_spec

        gdata.check_name(dataset)
        spec = data_spec(dataset, None, data_root)
        return spec if classes is None else DataSpec(spec.shape, classes)
    if classes is not None and (isinstance(classes, bool) or classes < 0):
        raise UserError(f"--classes must be at least 0, got {classes}")
    return DataSpec(parse_shape(shape) if shape else DEFAULT_SHAPE,
                    DEFAULT_CLASSES if classes is None else classes)


def resolve_target(target: str):
    """(class, card or None) for a family name, an entry point, an import path, or a card (file or name)."""
    from genbench.config import _is_path, load_card
    from genbench.families import FamilyError, resolve_family

    if not isinstance(target, str) or not target.strip():
        raise UserError("check-family needs a TARGET: a family name, an import path package.module:Class, "
                        "or a card file")
    if _is_path(target):
        card = load_card(target)                     # a missing file, bad YAML or a family that does not import
        return resolve_family(card.family, where=card.path), card
    try:
        return resolve_family(target), None
    except FamilyError as e:
        if ":" in target:
            raise
        family_error = e
    try:
        card = load_card(target)                     # a card by name on the search path
    except UserError:
        raise family_error from None
    return resolve_family(card.family, where=card.path), card


def check_target(target: str, *, shape: str | None = None, classes: int | None = None, dataset: str | None = None,
                 device: str = "cpu", sampler: dict | None = None) -> Report:
    """`genbench check-family TARGET`: UserError (exit 2) for a target that does not resolve."""
    from genbench.runner import resolve_device

    dev = resolve_device(device)
    cls, card = resolve_target(target)
    spec = target_spec(shape, classes, dataset)
    if card is not None:
        rep = run_checks(cls, spec, params=dict(card.params), sampler={**card.sampler, **(sampler or {})},
                         strict=False, device=dev, target=target, source=f"card {card.name}", family=card.family)
    else:
        base = None if not sampler else {**(hook(cls, "conformance_sampler", spec, default={}) or {}), **sampler}
        rep = run_checks(cls, spec, sampler=base, device=dev, target=target, family=target)
    return rep
