"""Running a suite: for each dataset x card x seed, train -> evaluate -> sweeps -> store.

Everything that can fail on user input is checked by `plan` before the first training step, and by
`--dry-run` the same way: every value of the suite and its cards, each card's params bound against its
family (the model is built on the meta device), every sampler option and value (steps <= T), the data,
the extractor weights and the results folder; missing inputs are reported all at once. A finished run
is skipped (its model.pt checked against the size and hash in its record; a run whose settings differ
from the plan is named, and redone with --rerun); a diverged run is recorded and the suite goes on; a
crashed run is recorded as `failed` (with its error) and retried on the next invocation.

Under torchrun at world N > 1 (genbench/distributed.py) the N ranks run each run together, one run at a
time: rank 0 alone takes leases, decides what to skip, reads checkpoints and writes every file, and
hands its decisions to the other ranks; training and every evaluation point are sharded. A crash on any
rank is recorded once by rank 0 as `failed` and ends the job on every rank (JobAborted).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from genbench import data as gdata
from genbench import distributed as gdist
from genbench import metrics as metric_registry
from genbench import store
from genbench.config import Card, Suite, suite_cards, to_dict
from genbench.errors import UserError
from genbench.evaluation import PointSettings, evaluate_point
from genbench.evaluators import auto_extractor, check_extractor
from genbench.families import get_family
from genbench.families.base import DataSpec, GenerativeModel
from genbench.fastpath import FastPath, prepare
from genbench.record import EvalPoint, RunRecord
from genbench.scoring import Extractor, Reference, build_extractor, likelihood_metrics, provenance, reference_features
from genbench.train import TrainFastPath, train


@dataclass(frozen=True)
class RunOptions:
    results_dir: Path = Path("results")
    data_root: Path | None = None
    device: str = "auto"
    seeds: int | None = None          # overrides the suite's seed count
    first_seed: int = 0               # seeds first_seed .. first_seed + seeds - 1
    only: tuple[str, ...] = ()
    inception_weights: str | None = None
    download: bool = False
    extractor: str | None = None      # overrides the suite's extractor
    progress: bool = True
    budget_kimg: float | None = None  # overrides the suite's budget (quick looks, tests)
    jobs: int | None = None           # runs at once in worker processes; None: the suite's `jobs`
    fast: FastPath = FastPath()       # sampling fast path (bf16, channels_last on CUDA; compile opt-in)
    train_bf16: bool = True           # bf16 autocast in the training steps (CUDA only)
    feature_cache: bool = True        # reference features cached under results_dir/.cache
    rerun: bool = False               # redo finished runs whose settings differ from this plan
    executor: str = "local"           # local | submitit | ray (genbench/executors/)
    cluster: dict = dataclasses.field(default_factory=dict)   # executor resources/options over the suite's `cluster:`
    wait: bool = True                 # submitit: wait for the jobs; False: submit and return (a later run collects)
    lease_stale_s: float | None = None       # a silent lease is stale after this; None: $GENBENCH_LEASE_STALE_S or 600
    checkpoint_every_s: float | None = None  # training checkpoint interval; None: $GENBENCH_CHECKPOINT_EVERY_S or 60
    train_fast: TrainFastPath = TrainFastPath()   # training fast path (CUDA parts; compile opt-in)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@dataclass
class Plan:
    suite: Suite
    cards: list[Card]
    seeds: list[int]
    device: torch.device
    extractors: dict[str, str | None]   # dataset name -> extractor name (None for point sets)
    opts: RunOptions
    specs: dict[str, DataSpec] = dataclasses.field(default_factory=dict)   # dataset name -> what models are built for

    def runs(self):
        for ds in self.suite.datasets:
            for card in self.cards:
                for seed in self.seeds:
                    yield ds, card, seed

    def run_dir(self, ds, card: Card, seed: int) -> Path:
        return store.run_dir(self.opts.results_dir, self.suite.name, ds.name, card.name, seed)

    @property
    def budget_kimg(self) -> float:
        return self.opts.budget_kimg if self.opts.budget_kimg is not None else self.suite.budget_kimg

    @property
    def feature_cache_dir(self) -> Path | None:
        return Path(self.opts.results_dir) / ".cache" if self.opts.feature_cache else None

    @property
    def train_bf16(self) -> bool:
        """Whether training autocasts to bf16: asked for (the default) and on CUDA."""
        return self.opts.train_bf16 and self.device.type == "cuda"

    def settings(self, ds, card: Card) -> dict:
        """What a finished run must have been made with to count as this plan's run."""
        return {"budget_kimg": self.budget_kimg, "suite_version": self.suite.version,
                "card": {k: to_dict(getattr(card, k)) for k in ("family", "params", "sampler", "batch_size", "ema")},
                "dataset": to_dict(ds), "eval": to_dict(self.suite.eval)}

    def describe(self) -> dict:
        return {"suite": to_dict(self.suite), "cards": [to_dict(c) for c in self.cards], "seeds": self.seeds,
                "device": str(self.device), "budget_kimg": self.budget_kimg, "train_bf16": self.train_bf16,
                "feature_cache": str(self.feature_cache_dir) if self.feature_cache_dir else None,
                "fast_path": self.opts.fast.describe(self.device),
                "train_fast_path": {**self.opts.train_fast.describe(self.device), "bf16": self.train_bf16},
                "extractors": self.extractors, "results_dir": str(self.opts.results_dir), "jobs": effective_jobs(self),
                "rerun": self.opts.rerun, "executor": self.opts.executor, "cluster": self.opts.cluster,
                "runs": [f"{ds.name}/{c.name}/seed{s}" for ds, c, s in self.runs()]}


def _sweep_points(suite: Suite, card: Card) -> list[tuple[str, str, object, dict, int | None]]:
    """(sweep name, param, value, sampler, n_fake or None) of every sweep point that applies to `card`."""
    family = get_family(card.family)
    points = []
    for sw in suite.sweeps:
        if sw.cards and card.name not in sw.cards and not any(c.endswith((".yaml", ".yml")) and
                                                              Path(c).stem == card.name for c in sw.cards):
            continue
        if not sw.cards and sw.param not in family.sampler_options:
            continue
        for v in sw.values:
            points.append((sw.name, sw.param, v, {**card.sampler, **sw.sampler, sw.param: v}, sw.n_fake))
    return points


def plan(suite: Suite, opts: RunOptions, check_inputs: bool = True) -> Plan:
    """Resolve everything a run needs and fail on bad input now, not an hour in. Every missing input
    (dataset files, extractor weights) is named in one error."""
    device = gdist.place(resolve_device(opts.device))
    cards = suite_cards(suite, opts.only)
    if not cards:
        raise UserError("--only selects no card")
    if gdist.launched():
        opts = _rank_options(opts, cards)
    n_seeds = opts.seeds if opts.seeds is not None else suite.seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or not 1 <= n_seeds <= 100_000:
        raise UserError(f"--seeds must be a whole number in [1, 100000], got {n_seeds!r}")
    if isinstance(opts.first_seed, bool) or not isinstance(opts.first_seed, int) or \
            not 0 <= opts.first_seed <= 2**31 - 1 - n_seeds:
        raise UserError(f"--first-seed must be a whole number in [0, {2**31 - 1 - n_seeds}], got {opts.first_seed!r}")
    if opts.jobs is not None and (isinstance(opts.jobs, bool) or not isinstance(opts.jobs, int) or opts.jobs < 1):
        raise UserError(f"--jobs must be a whole number of at least 1, got {opts.jobs!r}")
    if opts.budget_kimg is not None and not (opts.budget_kimg > 0 and opts.budget_kimg != float("inf")):
        raise UserError(f"--budget-kimg must be positive and finite, got {opts.budget_kimg}")
    missing: list[str] = []
    extractors: dict[str, str | None] = {}
    for ds in suite.datasets:
        gdata.check_name(ds.name)
        if ds.name in gdata.POINT_DATASETS:
            extractors[ds.name] = None
            continue
        name = opts.extractor or (suite.eval.extractor if suite.eval.extractor != "auto"
                                  else auto_extractor(ds.name))
        try:
            check_extractor(name, inception_weights=opts.inception_weights, download=opts.download)
        except UserError as e:
            if not check_inputs or "unknown extractor" in str(e):
                raise
            missing.append(str(e))
        extractors[ds.name] = name
    p = Plan(suite, cards, list(range(opts.first_seed, opts.first_seed + n_seeds)), device, extractors, opts)
    if check_inputs:
        missing += check_data(p)
        if missing:
            raise UserError(("an input is not usable: " if len(missing) == 1 else
                             f"{len(missing)} inputs are not usable: ") + " | ".join(missing))
        check_models(p)
        store.check_writable_dir(opts.results_dir, "--results-dir")
        for ds, card, seed in p.runs():   # every run folder name is checked before the first one is made
            p.run_dir(ds, card, seed)
    return p


def _rank_options(opts: RunOptions, cards: list[Card]) -> RunOptions:
    """The options of a rank under torchrun (world N > 1), checked by `check_world`; only rank 0 shows
    progress."""
    check_world(opts, cards, gdist.env_world())
    if gdist.env_rank() != 0:
        opts = dataclasses.replace(opts, progress=False)
    return opts


def check_world(opts: RunOptions, cards: list[Card], n: int, device: torch.device | None = None) -> None:
    """What a run at world n > 1 can and cannot do, checked before anything starts: the ranks train one
    run at a time together (no --jobs, no other executor), and each card's batch size is the global
    batch and must divide over the ranks."""
    if opts.executor not in (None, "local"):
        raise UserError(f"--executor {opts.executor}: under torchrun the ranks run the suite themselves; "
                        f"use the local executor")
    if opts.jobs is not None and opts.jobs > 1:
        raise UserError(f"--jobs {opts.jobs}: under torchrun the {n} ranks train one run at a time together; "
                        f"drop --jobs")
    bad = [f"{c.name} ({c.batch_size})" for c in cards if c.batch_size % n]
    if bad:
        raise UserError(f"batch size does not divide over {n} ranks (the card's batch is the global batch, each "
                        f"rank takes batch / {n}): {', '.join(bad)}")
    if device is not None and device.type == "cuda" and device.index is not None:
        raise UserError(f"--device {device}: with {n} ranks each rank takes its own GPU; use --device cuda or auto")


def check_data(p: Plan) -> list[str]:
    """Load each dataset's train and reference split once; the problems, one line each."""
    problems = []
    for ds in p.suite.datasets:
        for split in sorted({"train", "test", p.suite.eval.ref_split}):   # run_one reads all three
            try:
                d = _load(ds, split, p.opts)
            except UserError as e:
                if str(e) not in problems:
                    problems.append(str(e))
                continue
            if len(d) == 0:
                problems.append(f"dataset {ds.name!r} split {split!r} holds no examples")
            elif split == "train":
                p.specs[ds.name] = d.spec
    return problems


def build_model(card: Card, spec: DataSpec, device: torch.device | str = "cpu") -> GenerativeModel:
    """Family(spec, **card.params) on `device`; a parameter the family does not take, or a value it refuses,
    is a UserError naming the card."""
    fam = get_family(card.family)
    try:
        inspect.signature(fam).bind(spec, **card.params)
    except TypeError as e:
        raise UserError(f"{card.path}: params: {e} (family {card.family!r})") from None
    try:
        return fam(spec, **card.params).to(device)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise UserError(f"{card.path}: params: {type(e).__name__}: {e}") from None


def _meta_model(card: Card, spec: DataSpec) -> GenerativeModel:
    """The card's model without allocating its weights (meta device); on the CPU where a family's
    constructor needs real numbers."""
    try:
        with torch.device("meta"):
            return build_model(card, spec, "meta")
    except UserError:
        raise
    except (RuntimeError, NotImplementedError):
        return build_model(card, spec, "cpu")


def check_models(p: Plan) -> None:
    """Every card builds on every dataset's shape and takes its main and sweep sampler settings."""
    for ds in p.suite.datasets:
        spec = p.specs.get(ds.name)
        if spec is None:
            continue
        for card in p.cards:
            model = _meta_model(card, spec)
            fam = type(model)
            for name, _, _, sampler, _ in [("main", None, None, card.sampler, None), *_sweep_points(p.suite, card)]:
                bad = [k for k in sampler if fam.sampler_options and k not in fam.sampler_options]
                if bad:
                    raise UserError(f"card {card.name!r}: sampler option {bad[0]!r} is not one of "
                                    f"{', '.join(fam.sampler_options)}")
                try:
                    model.nfe(**sampler)
                except (ValueError, TypeError) as e:
                    where = "its sampler" if name == "main" else f"sweep {name!r}"
                    raise UserError(f"card {card.name!r} on {ds.name}: {where}: {e}") from None


_DATA_CACHE: dict = {}


def _load(ds, split: str, opts: RunOptions, seed: int = 0) -> gdata.Data:
    key = (ds, split, str(opts.data_root), seed)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 8:   # a suite holds a few datasets; bound memory on long suites
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = gdata.load(ds.name, split, root=opts.data_root, download=opts.download,
                                      image_size=ds.image_size, seed=seed, size=ds.size)
    return _DATA_CACHE[key]


# --------------------------------------------------------------------------- finished runs


def finished_state(p: Plan, ds, card: Card, seed: int) -> tuple[str, str | None]:
    """("todo" | "skip" | "stale", the line to log): whether a run folder already holds this run."""
    rdir = p.run_dir(ds, card, seed)
    rec = store.try_read_record(rdir)
    if rec is None or not rec.finished:
        return "todo", None
    if rec.status == "complete":
        problem = store.model_problem(rdir, rec)
        if problem is not None:
            return "stale", f"{problem}: the run is redone"
    want = p.settings(ds, card)
    have = getattr(rec, "settings", None) or {"budget_kimg": (rec.training or {}).get("budget_kimg"),
                                              "suite_version": rec.suite_version}
    diff = [k for k in want if k in have and have[k] != want[k]]
    if diff:
        what = ", ".join(f"{k} {_short(have[k])} (now {_short(want[k])})" for k in diff)
        if p.opts.rerun:
            return "stale", f"made with {what}: redone (--rerun)"
        return "skip", f"finished earlier with {what}; kept (--rerun redoes it)"
    return "skip", None


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def run_suite(p: Plan, log=print) -> dict[str, int]:
    """Run every planned run; returns counts by outcome (complete, diverged, failed, skipped, and
    submitted when jobs were submitted without waiting).

    Finished runs are skipped here; the others go to the plan's executor (genbench/executors/: local
    worker processes, Slurm through submitit, Ray), which runs each through `execute_run`: the run's
    lease is taken first, so a run held by another process is skipped with a line naming the holder.
    One line is logged per run as it ends."""
    from genbench.executors import RunTask, get_executor

    executor = get_executor(p)   # a missing engine or a bad option: one UserError, before any work
    p = resolved_plan(p)
    counts = {"complete": 0, "diverged": 0, "failed": 0, "skipped": 0}
    runs = list(p.runs())
    todo = []
    if gdist.launched():   # the ranks join here (a no-op when the command line did it); rank 0 decides
        dist = gdist.init(p.device)
        states = gdist.broadcast_object([finished_state(p, *r) for r in runs] if dist.main else None)
        if not dist.main:
            log = _quiet
    else:
        states = None
    for i, (ds, card, seed) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {p.suite.name}/{ds.name}/{card.name}/seed{seed}"
        state, line = states[i - 1] if states is not None else finished_state(p, ds, card, seed)
        if state == "skip":
            counts["skipped"] += 1
            log(f"{tag}: {line or 'finished earlier, skipped'}")
            continue
        todo.append(RunTask(ds, card, seed, tag))   # "stale" ones are set aside under their lease
    for status, line in executor.run(p, todo, log):
        counts[status] = counts.get(status, 0) + 1
        log(line)
    return counts


def _quiet(line: str) -> None:
    """The log of a rank other than 0: rank 0 prints every line."""


CHECKPOINT_ENV = "GENBENCH_CHECKPOINT_EVERY_S"
ATTEMPT_LOG_ENV = "GENBENCH_ATTEMPT_LOG"


def checkpoint_interval(opts: RunOptions) -> float:
    """Seconds between training checkpoints: opts.checkpoint_every_s, else $GENBENCH_CHECKPOINT_EVERY_S,
    else 60 (0: after every step)."""
    v = opts.checkpoint_every_s
    where = "--checkpoint-every-s"
    if v is None:
        env = os.environ.get(CHECKPOINT_ENV)
        if not env:
            return 60.0
        where = f"${CHECKPOINT_ENV}"
        try:
            v = float(env)
        except ValueError:
            raise UserError(f"{where}={env!r} is not a number of seconds") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
        raise UserError(f"{where} must be a non-negative number of seconds, got {v!r}")
    return float(v)


def resolved_plan(p: Plan) -> Plan:
    """The plan with the settings that environment variables may give (lease stale time, checkpoint
    interval) made explicit, so a worker on another machine uses this invocation's values."""
    from genbench import lease

    opts = dataclasses.replace(p.opts, lease_stale_s=lease.stale_after(p.opts.lease_stale_s),
                               checkpoint_every_s=checkpoint_interval(p.opts))
    return dataclasses.replace(p, opts=opts)


def run_key(p: Plan, ds, card: Card, seed: int) -> str:
    return f"{p.suite.name}/{ds.name}/{card.name}/seed{seed}"


def execute_run(p: Plan, ds, card: Card, seed: int, tag: str, *, token: str | None = None,
                who: str = "genbench run", job: dict | None = None, wait_own: bool = False, log=None,
                on_lease=None) -> tuple[str, str]:
    """One run wherever it executes (this process, a worker process, a Slurm job, a Ray task): take its
    lease, check it again under the lease (another process may have finished it meanwhile), set a
    finished run with other settings aside, train and evaluate (train() resumes from checkpoint.pt),
    release the lease. Returns (status, the lines to log); with `log`, notes are logged at once.

    Everything is resolved here from the Plan (a plain dataclass): datasets load, families resolve by
    name and the extractor is built in this process. `token` is the claimant's identity across
    requeues and retries (a submitit job, a Ray task): with it, a lease left by the same token's
    previous incarnation is taken back. `on_lease(lease)` is called once the lease is held."""
    from genbench import lease as lease_mod

    if gdist.current() is not None:
        return _execute_run_ranks(p, ds, card, seed, tag, who=who, log=log)
    p = _here(p)
    rdir = p.run_dir(ds, card, seed)
    got = lease_mod.acquire(rdir, stale_after_s=p.opts.lease_stale_s, token=token, who=who, job=job,
                            run=run_key(p, ds, card, seed), wait_own=wait_own)
    if isinstance(got, lease_mod.Holder):
        return "skipped", f"{tag}: held by {got.describe()}; skipped"
    notes: list[str] = []

    def note(line: str) -> None:
        log(line) if log is not None else notes.append(line)

    def out(status: str, line: str) -> tuple[str, str]:
        return status, "\n".join([*notes, line])

    if on_lease is not None:
        on_lease(got)
    try:
        with got:
            decision, line = _decide_under_lease(p, ds, card, seed, tag, got, note)
            if decision != "go":
                return out(decision, line)
            status, line = _run_logged(p, ds, card, seed, tag)
    except KeyboardInterrupt:
        if not got.interrupted:
            raise
        new = got.lost.describe() if isinstance(got.lost, lease_mod.Holder) else "another process"
        return out("skipped", f"{tag}: lost its lease to {new} (this process was silent for longer than "
                              f"the stale time); stopped, the new holder goes on")
    return out(status, line)


def _decide_under_lease(p: Plan, ds, card: Card, seed: int, tag: str, got, note) -> tuple[str, str | None]:
    """Under the run's lease: ("skipped", line) when the run finished meanwhile, else ("go", None) after
    setting a stale run's files aside and noting a takeover or a resume from its checkpoint."""
    rdir = p.run_dir(ds, card, seed)
    if got.took_over is not None and not got.readopted:
        note(f"{tag}: took over the stale lease of {got.took_over.describe()} ({got.why})")
    state, line = finished_state(p, ds, card, seed)
    if state == "skip":
        return "skipped", f"{tag}: {line or 'finished meanwhile by another process, skipped'}"
    if state == "stale":
        moved = _set_aside_contents(rdir)
        note(f"{tag}: {line}; the old folder is now {moved.name}")
    resumed = _checkpoint_kimg(rdir)
    if resumed is not None:
        note(f"{tag}: resumes from its checkpoint at {resumed:.4g} kimg")
    _log_attempt(p, ds, card, seed, got, resumed)
    return "go", None


def _execute_run_ranks(p: Plan, ds, card: Card, seed: int, tag: str, *, who: str, log=None) -> tuple[str, str]:
    """execute_run at world N > 1, on every rank at once. Rank 0 takes the lease, checks the run under it,
    sets a stale one aside and broadcasts its decision; then all ranks train and evaluate. Any exception
    on any rank (a crash, a lost lease) goes through `_abort_ranks`: one record, the job ends."""
    from genbench import lease as lease_mod

    dist = gdist.current()
    p = _here(p)
    rdir = p.run_dir(ds, card, seed)
    got, started, notes = None, False, []

    def note(line: str) -> None:
        log(line) if log is not None else notes.append(line)

    try:
        decision = None
        if dist.main:
            got = lease_mod.acquire(rdir, stale_after_s=p.opts.lease_stale_s, who=f"{who} (torchrun rank 0 of "
                                    f"{dist.world})", run=run_key(p, ds, card, seed))
            if isinstance(got, lease_mod.Holder):
                decision = ("skipped", f"{tag}: held by {got.describe()}; skipped")
                got = None
            else:
                got.__enter__()
                decision = _decide_under_lease(p, ds, card, seed, tag, got, note)
        decision = gdist.broadcast_object(decision)
        if decision[0] != "go":
            return decision[0], "\n".join([*notes, decision[1]])
        started = True
        t0 = time.time()
        extractor = get_extractor(p.extractors[ds.name], p.device, p.opts)
        status = run_one(p, ds, card, seed, rdir, extractor)
        return status, "\n".join([*notes, f"{tag}: {status} in {time.time() - t0:.1f} s"])
    except BaseException as e:  # noqa: BLE001 - every rank ends the same way, whatever it was
        _abort_ranks(p, ds, card, seed, tag, e, got, started)
        raise AssertionError("unreachable")
    finally:
        if got is not None:
            got.__exit__(None, None, None)


def _abort_ranks(p: Plan, ds, card: Card, seed: int, tag: str, exc: BaseException, got, started: bool) -> None:
    """A rank failed inside a run: this rank publishes its line and aborts its collectives (the others'
    waits end at once); rank 0 writes one `failed` record with the first failure's line (not for a lost
    lease, whose run now belongs to another process, nor for Ctrl-C); then JobAborted on every rank."""
    dist = gdist.current()
    first = gdist.fail(exc)
    lost = got is not None and getattr(got, "interrupted", False)
    if dist.main:
        if lost:
            line = f"{tag}: lost its lease (this process was silent for longer than the stale time); the job stops"
        elif started and not isinstance(exc, KeyboardInterrupt) and not isinstance(exc, UserError):
            rec = _base_record(p, ds, card, seed, "failed")
            rec.error = first
            rec.traceback = "".join(traceback.format_exception(exc, limit=5)) if first.startswith("rank 0:") else None
            rec.provenance = dict(dist.provenance())
            try:
                store.write_record(p.run_dir(ds, card, seed), rec)
            except OSError as e:
                _warn(f"{tag}: the failed record could not be written: {e}")
            line = f"{tag}: FAILED ({first}); the distributed job stops on all {dist.world} ranks"
        else:
            line = f"{tag}: stopped ({first}); the distributed job stops on all {dist.world} ranks"
        if got is not None:   # before the other ranks may exit (torchrun then stops this one too)
            got.__exit__(None, None, None)
        gdist.recorded()
    else:
        gdist.wait_recorded()
        line = f"{tag}: stopped on rank {dist.rank} ({first})"
    if isinstance(exc, UserError) and first.startswith(f"rank {dist.rank}:"):
        raise exc
    raise gdist.JobAborted(line) from exc


def _here(p: Plan) -> Plan:
    """The plan with --device auto resolved on this machine (a Slurm job or Ray task may have a GPU the
    submitting host lacks)."""
    if p.opts.device != "auto":
        return p
    device = gdist.place(resolve_device("auto"))
    return p if device == p.device else dataclasses.replace(p, device=device)


def _checkpoint_kimg(rdir: Path) -> float | None:
    """The kimg a run's checkpoint.pt was saved at (None without one; nan when it cannot be read:
    train() then sets it aside and starts over)."""
    path = Path(rdir) / store.CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return float(ckpt["state"]["kimg"])
    except Exception:  # noqa: BLE001 - only for the log line
        return float("nan")


def _log_attempt(p: Plan, ds, card: Card, seed: int, got, resumed: float | None) -> None:
    """One JSON line per training attempt to $GENBENCH_ATTEMPT_LOG, when set (an audit of who trained
    what; tests count trainings with it)."""
    import json
    import socket

    path = os.environ.get(ATTEMPT_LOG_ENV)
    if not path:
        return
    line = json.dumps({"run": run_key(p, ds, card, seed), "results_dir": str(Path(p.opts.results_dir).resolve()),
                       "host": socket.gethostname(), "pid": os.getpid(), "token": got.token, "who": got.me.who,
                       "time": time.time(), "resumed_from_kimg": resumed,
                       "took_over": got.took_over.token if got.took_over is not None else None})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _set_aside_contents(rdir: Path) -> Path:
    """Move a finished run's files (all but its lease) into a new `.replaced-seedK-N` folder beside it:
    kept for a look, never found as a run again; the lease stays, so the run stays claimed."""
    from genbench.lease import is_lease_file

    rdir = Path(rdir)
    n = 1
    while True:
        dest = rdir.parent / f".replaced-{rdir.name}-{n}"
        try:
            dest.mkdir()
            break
        except FileExistsError:
            n += 1
    for entry in rdir.iterdir():
        if not is_lease_file(entry.name) and not entry.name.startswith(".lease-"):
            os.replace(entry, dest / entry.name)
    return dest


def effective_jobs(p: Plan) -> int:
    """--jobs, else the suite's `jobs`, capped by the CPU count when running on the CPU."""
    jobs = p.opts.jobs if p.opts.jobs is not None else p.suite.jobs
    if gdist.launched():   # the ranks train one run at a time, all together
        return 1
    if p.device.type == "cpu":
        jobs = min(jobs, os.cpu_count() or 1)
    return max(1, jobs)


_EXTRACTORS: dict[tuple, Extractor] = {}   # per process: built once per (name, device, weights), reused


def get_extractor(name: str | None, device: torch.device, opts: RunOptions) -> Extractor | None:
    if not name:
        return None
    compile_extractor = opts.fast.compile != "off"   # --compile covers the extractor too
    key = (name, str(device), opts.inception_weights, compile_extractor)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = build_extractor(name, device, inception_weights=opts.inception_weights,
                                           download=opts.download, compile=compile_extractor)
    return _EXTRACTORS[key]


def _base_record(p: Plan, ds, card: Card, seed: int, status: str) -> RunRecord:
    fam = get_family(card.family)
    return RunRecord(status=status, suite=p.suite.name, suite_version=p.suite.version, dataset=ds.name,
                     card=card.name, family=fam.family or card.family, traits=dict(card.traits), seed=seed,
                     gate={"tolerances": dict(p.suite.tolerances)},
                     declared_metrics={m.key: m.to_dict() for m in fam.declared_metrics})


def _run_logged(p: Plan, ds, card: Card, seed: int, tag: str) -> tuple[str, str]:
    """One run with its crash recorded: (status, the line to log)."""
    rdir = p.run_dir(ds, card, seed)
    t0 = time.time()
    try:
        extractor = get_extractor(p.extractors[ds.name], p.device, p.opts)
        status = run_one(p, ds, card, seed, rdir, extractor)
        return status, f"{tag}: {status} in {time.time() - t0:.1f} s"
    except UserError:
        raise
    except Exception as e:  # a crash in one run is recorded; the suite goes on
        rec = _base_record(p, ds, card, seed, "failed")
        rec.error, rec.traceback = f"{type(e).__name__}: {e}", traceback.format_exc(limit=5)
        store.write_record(rdir, rec)
        return "failed", f"{tag}: FAILED ({type(e).__name__}: {e}) after {time.time() - t0:.1f} s"


def run_one(p: Plan, ds, card: Card, seed: int, rdir: Path, extractor: Extractor | None) -> str:
    """Train, evaluate and record one run; returns its status. Under torchrun every rank calls it: all
    of them train and evaluate (sharded), rank 0 alone writes (`writes`), and every collective is
    outside the rank-0-only parts."""
    suite, ev, opts = p.suite, p.suite.eval, p.opts
    dist = gdist.current()
    writes = dist is None or dist.main
    train_data = _load(ds, "train", opts)
    ref = _load(ds, ev.ref_split, opts)
    test = _load(ds, "test", opts)
    budget = p.budget_kimg
    if writes:
        store.write_json(rdir / store.CONFIG_FILE, {
            "suite": to_dict(suite), "card": to_dict(card), "dataset": to_dict(ds), "seed": seed,
            "device": str(p.device), "budget_kimg": budget, "extractor": extractor.spec.name if extractor else None})
    torch.manual_seed(seed)
    model = build_model(card, train_data.spec, p.device)

    reference = None
    if extractor:
        feats = reference_features(extractor, ref, ev.n_real, p.feature_cache_dir,
                                   batch_size=ev.batch_size, progress=opts.progress)
        reference = Reference.on(extractor.device, feats) if feats is not None else None   # rank 0's only
    n_real = (min(ev.n_real, len(ref)) if ev.n_real else len(ref))
    main_settings = PointSettings(ev.n_fake, ev.batch_size, ev.metrics, ev.kid_subset_size)
    cheap_settings = PointSettings(ev.cheap_n_fake, ev.batch_size, ev.cheap_groups, ev.kid_subset_size)

    def cheap_eval(m, kimg):
        metrics, _, _ = evaluate_point(m, card.sampler, seed + 10_000, cheap_settings, ref, extractor, reference,
                                       timed=False)
        return metrics

    result = train(model, train_data, budget_kimg=budget, batch_size=card.batch_size, seed=seed, run_dir=rdir,
                   ema_decay=card.ema, cheap_eval=cheap_eval if ev.every_kimg else None,
                   every_kimg=ev.every_kimg, progress=opts.progress, bf16=p.train_bf16, log=_warn,
                   checkpoint_every_s=checkpoint_interval(opts), fast=opts.train_fast)
    st = result.state
    if writes:
        store.write_csv(rdir / store.TRAIN_LOG_FILE, st.log or [{"kimg": 0}])
        store.write_csv(rdir / store.CURVES_FILE, st.curves or [{"kimg": st.kimg}])
    rec = _base_record(p, ds, card, seed, "diverged" if result.diverged else "complete")
    rec.settings = p.settings(ds, card)
    rec.training = {"kimg": round(st.kimg, 4), "wall_s": round(st.wall_s, 2), "steps": st.steps,
                    "diverged_at_kimg": st.diverged_at_kimg, "diverged_reason": st.diverged_reason,
                    "budget_kimg": budget, "batch_size": card.batch_size, "ema": card.ema, "bf16": p.train_bf16,
                    "fast_path": result.fast_path}
    rec.provenance = provenance(extractor, n_real=n_real if extractor else None, n_fake=ev.n_fake,
                                ref_split=ev.ref_split, image_size=list(train_data.x.shape[1:]), device=p.device,
                                seed=seed)
    if dist is not None:   # world size, backend, each rank's host and device
        rec.provenance.update(dist.provenance())
    if not result.diverged:
        if writes:
            store.atomic_torch_save(rdir / store.MODEL_FILE, result.model.state_dict())
            rec.model = store.file_digest(rdir / store.MODEL_FILE)
        model = prepare(result.model, p.device, opts.fast)
        rec.metrics, rec.sampling, grid = evaluate_point(model, card.sampler, seed, main_settings, ref, extractor,
                                                         reference, fast=opts.fast, progress=opts.progress,
                                                         keep=64 if ref.is_image else 2000)
        rec.sampler = dict(card.sampler)
        if writes:   # held-out metrics: rank 0 alone (no collective inside), the others wait for the sweeps
            rec.metrics.update(likelihood_metrics(model, test, ev.metrics, max_n=ev.n_likelihood,
                                                  batch_size=ev.batch_size))
        if grid is not None and writes:
            save_grid(rdir / store.SAMPLES_FILE, grid, ref)
        for name, param, value, sampler, n_fake in _sweep_points(suite, card):
            settings, prov = main_settings, None
            if n_fake is not None and n_fake != ev.n_fake:
                groups = tuple(g for g in ev.metrics if metric_registry.GROUPS[g].needs(ev) <= n_fake)
                settings, prov = PointSettings(n_fake, ev.batch_size, groups, ev.kid_subset_size), {"n_fake": n_fake}
            m, s, _ = evaluate_point(model, sampler, seed, settings, ref, extractor, reference, fast=opts.fast,
                                     progress=opts.progress)
            rec.sweeps.append(EvalPoint(name, param, value, sampler, m, s, prov))
    if writes:
        store.write_record(rdir, rec)   # last: marks the run finished
        (rdir / store.CHECKPOINT_FILE).unlink(missing_ok=True)
    return rec.status


def _warn(line: str) -> None:
    import sys

    print(f"genbench: {line}", file=sys.stderr)


def save_grid(path: Path, samples: torch.Tensor, ref: gdata.Data) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    if samples.dim() == 4:   # uint8 images -> one PNG grid, 8 per row
        from torchvision.utils import make_grid

        grid = make_grid(samples, nrow=8, padding=1).permute(1, 2, 0).numpy()   # [H, W, 3]
        plt.imsave(buf, grid, format="png")
    else:                    # 2-D points: scatter over the true mode centres
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.5, label="samples")
        if ref.mode_centers is not None:
            ax.scatter(ref.mode_centers[:, 0], ref.mode_centers[:, 1], marker="x", c="r", label="modes")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
    store.atomic_write_bytes(path, buf.getvalue())
