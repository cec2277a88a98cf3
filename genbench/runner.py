"""Running a suite: for each dataset x card x seed, train -> evaluate -> sweeps -> store.

Checks that can fail on user input (cards, datasets, extractor weights, sweep options) all run
before the first training step. A finished run is skipped; a diverged run is recorded and the suite
goes on; a crashed run is recorded as `failed` (with its error) and retried on the next invocation.
"""
from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from genbench import data as gdata
from genbench import store
from genbench.config import Card, Suite, suite_cards, to_dict
from genbench.errors import UserError
from genbench.evaluate import (Extractor, Reference, build_extractor, evaluate_samples, likelihood_metrics,
                               provenance, reference_features)
from genbench.evaluators import auto_extractor, check_extractor
from genbench.families import get_family
from genbench.families.base import DataSpec
from genbench.fastpath import FastPath, prepare
from genbench.timing import SamplingTimer
from genbench.train import train


@dataclass(frozen=True)
class RunOptions:
    results_dir: Path = Path("results")
    data_root: Path | None = None
    device: str = "auto"
    seeds: int | None = None          # overrides the suite's seed count
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device: {name!r} is not one of auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


@dataclass
class Plan:
    suite: Suite
    cards: list[Card]
    seeds: list[int]
    device: torch.device
    extractors: dict[str, str | None]   # dataset name -> extractor name (None for point sets)
    opts: RunOptions

    def runs(self):
        for ds in self.suite.datasets:
            for card in self.cards:
                for seed in self.seeds:
                    yield ds, card, seed

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

    def describe(self) -> dict:
        return {"suite": to_dict(self.suite), "cards": [to_dict(c) for c in self.cards], "seeds": self.seeds,
                "device": str(self.device), "budget_kimg": self.budget_kimg, "train_bf16": self.train_bf16,
                "feature_cache": str(self.feature_cache_dir) if self.feature_cache_dir else None,
                "fast_path": self.opts.fast.describe(self.device), "extractors": self.extractors,
                "results_dir": str(self.opts.results_dir), "jobs": effective_jobs(self),
                "runs": [f"{ds.name}/{c.name}/seed{s}" for ds, c, s in self.runs()]}


def _sweep_points(suite: Suite, card: Card) -> list[tuple[str, str, object, dict]]:
    family = get_family(card.family)
    points = []
    for sw in suite.sweeps:
        if sw.cards and card.name not in sw.cards:
            continue
        if not sw.cards and sw.param not in family.sampler_options:
            continue
        for v in sw.values:
            points.append((sw.name, sw.param, v, {**card.sampler, **sw.sampler, sw.param: v}))
    return points


def plan(suite: Suite, opts: RunOptions) -> Plan:
    """Resolve everything a run needs and fail on bad input now, not an hour in."""
    device = resolve_device(opts.device)
    cards = suite_cards(suite, opts.only)
    n_seeds = opts.seeds if opts.seeds is not None else suite.seeds
    if n_seeds < 1:
        raise UserError("--seeds must be at least 1")
    if opts.jobs is not None and opts.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if opts.budget_kimg is not None and not opts.budget_kimg > 0:   # `not >` also refuses nan
        raise UserError(f"--budget-kimg must be positive, got {opts.budget_kimg}")
    extractors: dict[str, str | None] = {}
    for ds in suite.datasets:
        gdata.check_name(ds.name)
        if ds.name in gdata.POINT_DATASETS:
            extractors[ds.name] = None
            continue
        name = opts.extractor or (suite.eval.extractor if suite.eval.extractor != "auto"
                                  else auto_extractor(ds.name))
        check_extractor(name, inception_weights=opts.inception_weights, download=opts.download)
        extractors[ds.name] = name
    for card in cards:
        fam = get_family(card.family)
        bad = [k for k in card.sampler if fam.sampler_options and k not in fam.sampler_options]
        for _, param, _, sampler in _sweep_points(suite, card):
            bad += [k for k in sampler if fam.sampler_options and k not in fam.sampler_options]
        if bad:
            raise UserError(f"card {card.name!r}: sampler option {bad[0]!r} is not one of "
                            f"{', '.join(fam.sampler_options)}")
    return Plan(suite, cards, list(range(n_seeds)), device, extractors, opts)


def check_data(p: Plan) -> None:
    """Load each dataset's train and reference split once, so missing data fails before training."""
    for ds in p.suite.datasets:
        for split in {"train", "test", p.suite.eval.ref_split}:   # run_one reads all three
            _load(ds, split, p.opts)


_DATA_CACHE: dict = {}


def _load(ds, split: str, opts: RunOptions, seed: int = 0) -> gdata.Data:
    key = (ds, split, str(opts.data_root), seed)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 8:   # a suite holds a few datasets; bound memory on long suites
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = gdata.load(ds.name, split, root=opts.data_root, download=opts.download,
                                      image_size=ds.image_size, seed=seed, size=ds.size)
    return _DATA_CACHE[key]


def run_suite(p: Plan, log=print) -> dict[str, int]:
    """Run every planned run; returns counts by outcome (complete, diverged, failed, skipped).

    With more than one job, runs go to worker processes (spawned, so no thread pool is forked), each
    with an even share of the CPU threads; finished-run lines are logged as runs end."""
    counts = {"complete": 0, "diverged": 0, "failed": 0, "skipped": 0}
    check_data(p)
    runs = list(p.runs())
    todo = []
    for i, (ds, card, seed) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {p.suite.name}/{ds.name}/{card.name}/seed{seed}"
        if store.is_finished(store.run_dir(p.opts.results_dir, p.suite.name, ds.name, card.name, seed)):
            counts["skipped"] += 1
            log(f"{tag}: finished earlier, skipped")
        else:
            todo.append((ds, card, seed, tag))
    jobs = min(effective_jobs(p), len(todo)) if todo else 1
    if jobs <= 1:
        for ds, card, seed, tag in todo:
            status, line = _run_logged(p, ds, card, seed, tag)
            counts[status] += 1
            log(line)
        return counts
    # Bars from several processes would overwrite each other: one line per finished run instead.
    worker_plan = dataclasses.replace(p, opts=dataclasses.replace(p.opts, progress=False))
    threads = max(1, torch.get_num_threads() // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        pending = {pool.submit(_run_logged, worker_plan, ds, card, seed, tag) for ds, card, seed, tag in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:   # a UserError: the same input fails every run
                    for f in pending:
                        f.cancel()
                    raise fut.exception()
                status, line = fut.result()
                counts[status] += 1
                log(line)
    return counts


def effective_jobs(p: Plan) -> int:
    """--jobs, else the suite's `jobs`, capped by the CPU count when running on the CPU."""
    jobs = p.opts.jobs if p.opts.jobs is not None else p.suite.jobs
    if p.device.type == "cpu":
        jobs = min(jobs, os.cpu_count() or 1)
    return max(1, jobs)


_EXTRACTORS: dict[tuple, Extractor] = {}   # per process: built once per (name, device, weights), reused


def _run_logged(p: Plan, ds, card: Card, seed: int, tag: str) -> tuple[str, str]:
    """One run with its crash recorded: (status, the line to log)."""
    rdir = store.run_dir(p.opts.results_dir, p.suite.name, ds.name, card.name, seed)
    ext_name = p.extractors[ds.name]
    compile_extractor = p.opts.fast.compile != "off"   # --compile covers the extractor too
    key = (ext_name, str(p.device), p.opts.inception_weights, compile_extractor)
    if ext_name and key not in _EXTRACTORS:
        _EXTRACTORS[key] = build_extractor(ext_name, p.device, inception_weights=p.opts.inception_weights,
                                           download=p.opts.download, compile=compile_extractor)
    t0 = time.time()
    try:
        status = run_one(p, ds, card, seed, rdir, _EXTRACTORS.get(key))
        return status, f"{tag}: {status} in {time.time() - t0:.1f} s"
    except UserError:
        raise
    except Exception as e:  # a crash in one run is recorded; the suite goes on
        store.write_json(rdir / store.METRICS_FILE, {
            "status": "failed", "suite": p.suite.name, "dataset": ds.name, "card": card.name,
            "family": card.family, "seed": seed, "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=5)})
        return "failed", f"{tag}: FAILED ({type(e).__name__}: {e}) after {time.time() - t0:.1f} s"


def run_one(p: Plan, ds, card: Card, seed: int, rdir: Path, extractor: Extractor | None) -> str:
    suite, ev, opts = p.suite, p.suite.eval, p.opts
    train_data = _load(ds, "train", opts)
    ref = _load(ds, ev.ref_split, opts)
    test = _load(ds, "test", opts)
    budget = p.budget_kimg
    store.write_json(rdir / store.CONFIG_FILE, {
        "suite": to_dict(suite), "card": to_dict(card), "dataset": to_dict(ds), "seed": seed,
        "device": str(p.device), "budget_kimg": budget, "extractor": extractor.spec.name if extractor else None})
    torch.manual_seed(seed)
    family = get_family(card.family)
    model = family(DataSpec(tuple(train_data.x.shape[1:]), train_data.num_classes), **card.params).to(p.device)

    real_feats = None
    if extractor:
        feats = reference_features(extractor, ref, ev.n_real, p.feature_cache_dir,
                                   batch_size=ev.batch_size, progress=opts.progress)
        real_feats = Reference.on(extractor.device, feats)
    n_real = (min(ev.n_real, len(ref)) if ev.n_real else len(ref))
    cheap_groups = tuple(g for g in ev.metrics if g in ("fid", "modes"))

    def cheap_eval(m, kimg):
        metrics, _ = evaluate_samples(m, seed=seed + 10_000, n_fake=ev.cheap_n_fake, sampler=card.sampler,
                                      groups=cheap_groups, ref=ref, extractor=extractor, real_feats=real_feats,
                                      batch_size=ev.batch_size, kid_subset_size=ev.kid_subset_size)
        return metrics

    result = train(model, train_data, budget_kimg=budget, batch_size=card.batch_size, seed=seed, run_dir=rdir,
                   ema_decay=card.ema, cheap_eval=cheap_eval if ev.every_kimg else None,
                   every_kimg=ev.every_kimg, progress=opts.progress, bf16=p.train_bf16)
    st = result.state
    store.write_csv(rdir / store.TRAIN_LOG_FILE, st.log or [{"kimg": 0}])
    store.write_csv(rdir / store.CURVES_FILE, st.curves or [{"kimg": st.kimg}])
    training = {"kimg": round(st.kimg, 4), "wall_s": round(st.wall_s, 2), "steps": st.steps,
                "diverged_at_kimg": st.diverged_at_kimg, "diverged_reason": st.diverged_reason,
                "budget_kimg": budget, "batch_size": card.batch_size, "ema": card.ema, "bf16": p.train_bf16}
    prov = provenance(extractor, n_real=n_real if extractor else None, n_fake=ev.n_fake, ref_split=ev.ref_split,
                      image_size=list(train_data.x.shape[1:]), device=p.device, seed=seed)
    record = {"status": "diverged" if result.diverged else "complete", "suite": suite.name,
              "suite_version": suite.version, "dataset": ds.name, "card": card.name, "family": card.family,
              "seed": seed, "metrics": {}, "sampling": {}, "training": training, "provenance": prov, "sweeps": []}
    if not result.diverged:
        store.atomic_torch_save(rdir / store.MODEL_FILE, result.model.state_dict())
        model = prepare(result.model, p.device, opts.fast)
        record["metrics"], record["sampling"], grid = _evaluate_point(model, card.sampler, seed, ev, ref,
                                                                        extractor, real_feats, opts,
                                                                        keep=64 if ref.is_image else 2000)
        record["metrics"].update(likelihood_metrics(model, test, ev.metrics, max_n=ev.n_likelihood,
                                                    batch_size=ev.batch_size))
        if grid is not None:
            _save_grid(rdir / store.SAMPLES_FILE, grid, ref)
        for name, param, value, sampler in _sweep_points(suite, card):
            m, s, _ = _evaluate_point(model, sampler, seed, ev, ref, extractor, real_feats, opts)
            record["sweeps"].append({"name": name, "param": param, "value": value, "sampler": sampler,
                                     "metrics": m, "sampling": s})
    store.write_json(rdir / store.METRICS_FILE, record)   # last: marks the run finished
    (rdir / store.CHECKPOINT_FILE).unlink(missing_ok=True)
    return record["status"]


def _evaluate_point(model, sampler: dict, seed: int, ev, ref, extractor, real_feats, opts, keep: int = 0):
    timer = SamplingTimer(model.device)
    bar = tqdm(total=ev.n_fake, desc="sample", unit="img", disable=not opts.progress, leave=False)
    metrics, grid = evaluate_samples(model, seed=seed, n_fake=ev.n_fake, sampler=sampler, groups=ev.metrics,
                                     ref=ref, extractor=extractor, real_feats=real_feats, batch_size=ev.batch_size,
                                     kid_subset_size=ev.kid_subset_size, timer=timer, keep=keep,
                                     progress=bar.update, fast=opts.fast)
    bar.close()
    sampling = {**timer.summary(model.nfe(**sampler), ev.batch_size), "sampler": sampler,
                "fast_path": opts.fast.describe(model.device)}
    return metrics, sampling, grid


def _save_grid(path: Path, samples: torch.Tensor, ref: gdata.Data) -> None:
    import io

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

