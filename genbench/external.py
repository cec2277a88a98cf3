"""Scoring what genbench did not train in this invocation: sample sets made elsewhere (`genbench eval
--samples`), a stored run's model re-sampled with another sampler or extractor (`genbench eval --run`),
and a stored run's samples written out (`genbench sample`).

All three enter the one scoring path (genbench/scoring) with uint8 batches, and their results are run
records in the same results tree, so report and compare show them beside suite runs under the same
provenance rules. Every check on user input runs before any sampling or scoring.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from genbench import data as gdata
from genbench import metrics as registry
from genbench import store
from genbench.config import Card, DatasetRef, EvalConfig, card_from_dict
from genbench.errors import UserError
from genbench.evaluation import PointSettings, evaluate_point
from genbench.evaluators import auto_extractor, check_extractor
from genbench.fastpath import FastPath, prepare
from genbench.record import EvalPoint, RunRecord
from genbench.scoring import Reference, provenance, reference_features, sample_stream, score_images, uint8_batches

EXTERNAL_SUITE = "external"   # results/external/<dataset>/<name>/seed<k>/


def parse_option(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (key, value), the value read as a YAML scalar (10 -> int, 0.5 -> float, true -> bool)."""
    if "=" not in text:
        raise UserError(f"--option {text!r}: expected KEY=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not key:
        raise UserError(f"--option {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise UserError(f"--option {text!r}: the value must be a plain number, word or boolean")
    return key, value


def _feature_groups(groups: tuple[str, ...] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """The metric groups a set of images can be scored with (no held-out likelihood: that needs a model)."""
    chosen = tuple(groups) if groups else default
    known = registry.selectable_groups()
    bad = [g for g in chosen if g not in known]
    if bad:
        raise UserError(f"--metrics: unknown metric group {bad[0]!r}; choose from: {', '.join(known)}")
    needs_model = [g for g in chosen if registry.GROUPS[g].source != registry.FEATURES]
    if groups and needs_model:
        raise UserError(f"--metrics: {needs_model[0]!r} is computed from a model on held-out data, not from samples")
    return tuple(g for g in chosen if registry.GROUPS[g].source == registry.FEATURES)


def _check_counts(n: int, groups: tuple[str, ...], ev, what: str) -> None:
    for g in groups:
        need = registry.GROUPS[g].needs(ev)
        if n < need:
            raise UserError(f"{what}: {n} images are fewer than metric {g!r} needs ({need})")


# --------------------------------------------------------------------------- eval --samples


@dataclass(frozen=True)
class SampleEval:
    samples: str
    dataset: str
    name: str | None = None
    extractor: str | None = None
    ref_split: str = "test"
    labels: str | None = None
    seed: int = 0
    family: str | None = None
    n_real: int | None = None
    metrics: tuple[str, ...] = ()
    batch_size: int = 250
    kid_subset_size: int = 1000
    image_size: int | None = None


def eval_samples(req: SampleEval, *, results_dir: Path, device: torch.device, data_root=None,
                 inception_weights=None, download: bool = False, feature_cache: bool = True,
                 progress: bool = False, log: Callable[[str], None] = print) -> Path:
    """Score a sample set against a dataset's reference split; returns the record's folder."""
    from genbench import sample_sets
    from genbench.runner import get_extractor, RunOptions

    gdata.check_name(req.dataset)
    if req.dataset in gdata.POINT_DATASETS:
        raise UserError(f"--dataset {req.dataset}: a 2-D point set; eval --samples scores images")
    if req.ref_split not in gdata.SPLITS:
        raise UserError(f"--ref-split must be one of {', '.join(gdata.SPLITS)}, got {req.ref_split!r}")
    name = req.name or _default_name(req.samples)
    rdir = store.run_dir(results_dir, EXTERNAL_SUITE, req.dataset, name, req.seed)
    ev = EvalConfig(n_fake=1, batch_size=req.batch_size, kid_subset_size=req.kid_subset_size, n_real=req.n_real,
                    ref_split=req.ref_split)
    groups = _feature_groups(req.metrics, EvalConfig().metrics)
    ext_name = req.extractor or auto_extractor(req.dataset)
    check_extractor(ext_name, inception_weights=inception_weights, download=download)
    if req.family is not None:
        from genbench.families import resolve_family

        family = resolve_family(req.family).family or req.family
    else:
        family = None
    store.check_writable_dir(results_dir, "--results-dir")
    s = sample_sets.load_sample_set(req.samples, req.labels)
    ref = gdata.load(req.dataset, req.ref_split, root=data_root, download=download, image_size=req.image_size)
    sample_sets.check_compatible(s, tuple(ref.x.shape[1:]), req.dataset)
    _check_counts(s.count, groups, ev, f"--samples {req.samples}")
    n_real = min(req.n_real, len(ref)) if req.n_real else len(ref)
    _check_counts(n_real, groups, ev, f"the {req.dataset} {req.ref_split} split")
    opts = RunOptions(results_dir=results_dir, inception_weights=inception_weights, download=download)
    extractor = get_extractor(ext_name, device, opts)
    prov = provenance(extractor, n_real=n_real, n_fake=s.count, ref_split=req.ref_split,
                      image_size=list(s.images.shape[1:]), device=device, seed=req.seed)
    old = store.try_read_record(rdir)
    if old is not None and (old.samples or {}).get("sha256") == s.sha256 and \
            old.provenance.get("extractor_sha256") == prov["extractor_sha256"] and \
            old.provenance.get("n_real") == n_real and old.provenance.get("ref_split") == req.ref_split and \
            set(groups) <= {registry.METRICS[k].group for k in old.metrics if k in registry.METRICS}:
        log(f"{rdir}: these samples were scored with this extractor already; skipped")
        return rdir
    cache = Path(results_dir) / ".cache" if feature_cache else None
    feats = reference_features(extractor, ref, req.n_real, cache, batch_size=req.batch_size, progress=progress)
    reference = Reference.on(extractor.device, feats)
    batches = (s.images[i:i + req.batch_size] for i in range(0, s.count, req.batch_size))
    metrics = score_images(batches, extractor=extractor, reference=reference, groups=groups, seed=req.seed,
                           kid_subset_size=req.kid_subset_size, labels=s.labels)
    rec = RunRecord(status="complete", kind="external", suite=EXTERNAL_SUITE, dataset=req.dataset, card=name,
                    family=family, seed=req.seed, metrics=metrics, provenance=prov,
                    samples={"path": str(req.samples), "kind": s.kind, "count": s.count, "sha256": s.sha256,
                             "files": len(s.files), "labels": s.labels is not None})
    from genbench.runner import save_grid

    save_grid(rdir / store.SAMPLES_FILE, s.images[:64], ref)
    if old is not None:
        log(f"{rdir}: replaced an earlier record (other samples, extractor or reference)")
    store.write_record(rdir, rec)
    return rdir


def _default_name(samples: str) -> str:
    import re

    stem = Path(str(samples).rstrip("/")).name
    stem = stem.split("*")[0] or "samples"
    for suffix in (".npz", ".npy"):
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "samples"
    return stem


# --------------------------------------------------------------------------- a stored run


@dataclass
class StoredRun:
    rdir: Path
    record: RunRecord
    card: Card
    dataset: DatasetRef
    eval: EvalConfig
    extractor: str | None
    model: torch.nn.Module


def _config_of(rdir: Path) -> dict:
    path = rdir / store.CONFIG_FILE
    try:
        cfg = store.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: the run's configuration cannot be read ({e})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("card", "dataset", "suite")):
        raise UserError(f"{path}: not a genbench run configuration")
    return cfg


def open_run(run_dir: Path, device: torch.device, data_root=None, download: bool = False) -> StoredRun:
    """A finished, complete run with its model loaded on `device`; UserError (one line) for a folder that
    is not one, a missing or truncated model.pt, or one that does not load. Nothing is sampled here."""
    from genbench.runner import build_model

    rdir = Path(run_dir)
    if not rdir.is_dir():
        raise UserError(f"--run {rdir}: no such folder")
    try:
        rec = store.read_record(rdir)
    except OSError:
        raise UserError(f"--run {rdir}: not a run folder (no readable {store.METRICS_FILE})") from None
    except ValueError as e:
        raise UserError(f"--run {rdir}: {store.METRICS_FILE} is not a run record ({e})") from None
    if rec.kind != "suite":
        raise UserError(f"--run {rdir}: a record of samples scored from files, with no model to sample")
    if rec.status != "complete":
        raise UserError(f"--run {rdir}: the run is {rec.status}, not complete: it has no model to sample")
    problem = store.model_problem(rdir, rec)
    if problem is not None:
        raise UserError(f"--run {rdir}: {problem}")
    cfg = _config_of(rdir)
    card_fields = {f.name for f in dataclasses.fields(Card)} - {"path"}
    card = card_from_dict({k: v for k, v in cfg["card"].items() if k in card_fields}, str(rdir / store.CONFIG_FILE))
    ds = DatasetRef(**{k: v for k, v in cfg["dataset"].items() if k in {f.name for f in dataclasses.fields(DatasetRef)}})
    ev_dict = {k: v for k, v in (cfg["suite"].get("eval") or {}).items()
               if k in {f.name for f in dataclasses.fields(EvalConfig)}}
    if "metrics" in ev_dict:
        ev_dict["metrics"] = tuple(ev_dict["metrics"])
    ev = EvalConfig(**ev_dict)
    train = gdata.load(ds.name, "train", root=data_root, download=download, image_size=ds.image_size, size=ds.size)
    model = build_model(card, train.spec, device)
    path = rdir / store.MODEL_FILE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a model file that does not load is the user's to fix, in one line
        raise UserError(f"--run {rdir}: {path} does not load into card {card.name!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    model.eval()
    return StoredRun(rdir, rec, card, ds, ev, cfg.get("extractor"), model)


def sampler_for(run: StoredRun, overrides: dict) -> dict:
    """The card's sampler with the user's options; an option the family does not take, or a value it
    refuses (steps > T), is one UserError line."""
    fam = type(run.model)
    bad = [k for k in overrides if fam.sampler_options and k not in fam.sampler_options]
    if bad:
        raise UserError(f"sampler option {bad[0]!r} is not one the {run.card.family!r} family takes "
                        f"({', '.join(fam.sampler_options) or 'none'})")
    sampler = {**run.card.sampler, **overrides}
    try:
        run.model.nfe(**sampler)
    except (ValueError, TypeError) as e:
        raise UserError(f"card {run.card.name!r}: {e}") from None
    return sampler


def _point_label(card_sampler: dict, sampler: dict) -> tuple[str | None, object]:
    changed = {k: v for k, v in sampler.items() if card_sampler.get(k) != v}
    if not changed:
        return None, None
    if len(changed) == 1:
        return next(iter(changed.items()))
    return ",".join(sorted(changed)), ",".join(f"{k}={changed[k]}" for k in sorted(changed))


def eval_run(run_dir: Path, *, device: torch.device, overrides: dict, name: str = "eval", n_fake: int | None = None,
             extractor: str | None = None, batch_size: int | None = None, data_root=None, inception_weights=None,
             download: bool = False, feature_cache: bool = True, results_dir: Path | None = None,
             fast: FastPath | None = None, progress: bool = False, log: Callable[[str], None] = print) -> EvalPoint:
    """Re-score a finished run's model.pt with other sampler options or another extractor, adding one
    evaluation point to its record (skipped when a point with the same identity is there)."""
    from genbench.runner import RunOptions, get_extractor

    store.check_name(name, "--name")
    run = open_run(Path(run_dir), device, data_root, download)
    sampler = sampler_for(run, overrides)
    ev = run.eval
    n = n_fake if n_fake is not None else ev.n_fake
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n-fake must be a positive whole number, got {n!r}")
    bs = batch_size or ev.batch_size
    ref = gdata.load(run.dataset.name, ev.ref_split, root=data_root, download=download,
                     image_size=run.dataset.image_size, size=run.dataset.size)
    groups = tuple(g for g in ev.metrics if registry.GROUPS[g].source in (registry.FEATURES, registry.POINTS))
    if ref.is_image:
        _check_counts(n, groups, ev, "--n-fake")
    ext_name = extractor or run.extractor or (None if not ref.is_image else auto_extractor(run.dataset.name))
    if ext_name:
        check_extractor(ext_name, inception_weights=inception_weights, download=download)
    prov_over = {}
    opts = RunOptions(results_dir=results_dir or run.rdir.parents[3], inception_weights=inception_weights,
                      download=download, fast=fast or FastPath())
    ext = get_extractor(ext_name, device, opts) if ref.is_image else None
    if ext is not None and ext.sha256 != run.record.provenance.get("extractor_sha256"):
        prov_over.update({k: v for k, v in provenance(ext, n_real=None, n_fake=n, ref_split=ev.ref_split,
                                                      image_size=None, device=device, seed=run.record.seed).items()
                          if k.startswith("extractor") or k in ("prc_features", "metric_code")})
    if n != ev.n_fake:
        prov_over["n_fake"] = n
    param, value = _point_label(run.card.sampler, sampler)
    point = EvalPoint(name, param, value, sampler, provenance=prov_over or None)
    if run.record.has_point(point):
        log(f"{run.rdir}: point {name!r} with sampler {sampler} is there already; skipped")
        return next(p for p in run.record.points() if p.identity() == point.identity())
    reference = None
    if ext is not None:
        cache = (results_dir or run.rdir.parents[3]) / ".cache" if feature_cache else None
        feats = reference_features(ext, ref, ev.n_real, cache, batch_size=bs, progress=progress)
        reference = Reference.on(ext.device, feats)
    model = prepare(run.model, device, fast or FastPath())
    try:
        metrics, sampling, _ = evaluate_point(model, sampler, run.record.seed, PointSettings(n, bs, groups,
                                              ev.kid_subset_size), ref, ext, reference, fast=fast, progress=progress)
    except (ValueError, FloatingPointError) as e:   # a model that breaks the sampling contract: one line
        raise UserError(f"--run {run.rdir}: sampling failed: {e}") from None
    point = dataclasses.replace(point, metrics=metrics, sampling=sampling)
    rec = store.read_record(run.rdir)       # re-read: never lose a point another process added meanwhile
    if rec.add_point(point):
        store.write_record(run.rdir, rec)
    return point


# --------------------------------------------------------------------------- sample


def read_labels(path: str | None, n: int) -> torch.Tensor | None:
    if path is None:
        return None
    from genbench import sample_sets

    return sample_sets.read_labels(path, n)


def sample_run(run_dir: Path, out: Path, *, n: int, device: torch.device, overrides: dict, seed_start: int = 0,
               labels: str | None = None, batch_size: int | None = None, data_root=None, download: bool = False,
               fast: FastPath | None = None, progress: bool = False) -> Path:
    """Write images seed_start .. seed_start+n-1 of a stored run (one seed per image: the first images
    of --n 100 and --n 200 are the same) as an ADM-layout npz or a folder of PNGs; complete or absent."""
    from tqdm import tqdm

    from genbench import sample_sets

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n must be a positive whole number, got {n!r}")
    if isinstance(seed_start, bool) or not isinstance(seed_start, int) or seed_start < 0:
        raise UserError(f"--seed-start must be a non-negative whole number, got {seed_start!r}")
    sample_sets.check_output(out)
    run = open_run(Path(run_dir), device, data_root, download)
    if not run.model.spec.is_image:
        raise UserError(f"--run {run_dir}: a model of 2-D points; sample writes images")
    sampler = sampler_for(run, overrides)
    y = read_labels(labels, n)
    if y is not None and not run.model.conditional:
        raise UserError("--labels: this model is not class-conditional")
    if y is not None and (int(y.min()) < 0 or int(y.max()) >= run.model.spec.num_classes):
        raise UserError(f"--labels: labels must be in [0, {run.model.spec.num_classes - 1}]")
    if y is None and run.model.conditional:
        from genbench.scoring import balanced_labels

        y = balanced_labels(n, run.model.spec.num_classes, seed_start)
    bs = batch_size or run.eval.batch_size
    model = prepare(run.model, device, fast or FastPath())
    bar = tqdm(total=n, desc="sample", unit="img", disable=not progress, leave=False)
    stream = sample_stream(model, n, run.record.seed, bs, sampler, None, bar.update, fast, start=seed_start, labels=y)
    try:
        images = torch.cat([u.cpu() for u in uint8_batches(stream)])
    except (ValueError, FloatingPointError) as e:   # a model that breaks the sampling contract: one line
        raise UserError(f"--run {run_dir}: sampling failed: {e}") from None
    bar.close()
    return sample_sets.write_sample_set(images, out, y)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
