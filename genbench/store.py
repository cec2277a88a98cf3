"""The results store: one folder per run, atomic writes, and one loader that turns a results tree
into a pandas DataFrame (the only thing report, claims and compare read).

Layout: <results>/<suite>/<dataset>/<card>/seed<k>/
    config.json    resolved suite/card/run configuration (written when the run starts)
    checkpoint.pt  training state for resume (removed once the run is finished)
    model.pt       the final sampling weights (the EMA copy when enabled), for re-evaluation later
    train_log.csv  per-step training logs (losses, gradient norms): the stability log
    curves.csv     cheap evaluations during training (quality against kimg)
    samples.png    a grid of samples from the final model
    metrics.json   written LAST: its presence with a final status marks the run finished
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pandas as pd

from genbench import metrics as metric_registry
from genbench.errors import UserError
from genbench.record import FINAL_STATUSES, STATUSES, RecordError, RunRecord  # noqa: F401 - statuses re-exported

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CURVES_FILE = "curves.csv"
TRAIN_LOG_FILE = "train_log.csv"
SAMPLES_FILE = "samples.png"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnsafeName(UserError):
    """A suite, card or dataset name that would leave its folder (path syntax in a name)."""


def check_name(name: str, what: str) -> str:
    """`name` if it is one plain folder name (letters, digits, '.', '_', '-', not starting with a dot);
    UnsafeName otherwise, so a name from a file or the command line never leaves its folder."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UnsafeName(f"{what} name {name!r} is not a plain name (letters, digits, '.', '_' and '-'; "
                         "no '/', '..' or leading dot)")
    return name


def dataset_folder(dataset: str) -> str:
    """The folder a dataset's runs go in: its name, or for a path dataset ('folder:DIR', 'x.npz') the
    path made into one safe folder name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(dataset)).strip("._") or "dataset"
    return s


def run_dir(results: Path, suite: str, dataset: str, card: str, seed: int) -> Path:
    """results/<suite>/<dataset>/<card>/seed<k>: always inside `results` (names are checked)."""
    check_name(suite, "suite")
    check_name(card, "card")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed {seed!r} is not a non-negative integer")
    root = Path(results)
    out = root / suite / dataset_folder(dataset) / card / f"seed{seed}"
    if not out.resolve().is_relative_to(root.resolve()):   # symlinks inside results may point away
        raise UnsafeName(f"run folder {out} would lie outside {root}")
    return out


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save straight into the temp file: no in-memory copy of the whole file, and torch's writer
    releases the GIL while it writes (a thread can save while the main thread works)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null (a metric that does not apply is null, never made up)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def set_aside(path: Path) -> Path:
    """Rename a corrupt file out of the way (`NAME.corrupt-<n>`) so the next attempt starts clean and
    the file stays for a post-mortem; returns the new path."""
    path = Path(path)
    n = 1
    while (dest := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    os.replace(path, dest)
    return dest


def check_writable_dir(folder: Path, what: str) -> None:
    """UserError unless `folder` is, or could be made, a writable folder: its nearest existing ancestor
    is a folder that takes a probe file (made and removed at once). Nothing is left behind, so a bad
    output path fails before any work and a good one is created only when the work writes to it."""
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".genbench-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {folder}: {existing} is not writable ({e.strerror or e})") from None


def check_writable_file(path: Path, what: str) -> None:
    """UserError unless `path` can be written as a file (its folder writable, the path not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a folder, not a file")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what)


# --------------------------------------------------------------------------- run records


def write_record(rdir: Path, rec: RunRecord) -> None:
    """The run's metrics.json, atomically. Written last by a run: its final status marks it finished."""
    write_json(Path(rdir) / METRICS_FILE, rec.to_dict())


def read_record(rdir: Path) -> RunRecord:
    """The run record in `rdir`. OSError when unreadable, RecordError when not a record (malformed JSON
    included), so callers name the file and go on."""
    p = Path(rdir) / METRICS_FILE
    try:
        data = read_json(p)
    except ValueError as e:
        raise RecordError(f"not valid JSON ({e})") from None
    rec = RunRecord.from_dict(data)
    metric_registry.adopt(rec.declared_metrics)
    return rec


def try_read_record(rdir: Path) -> RunRecord | None:
    try:
        return read_record(rdir)
    except (OSError, RecordError):
        return None


def is_finished(rdir: Path) -> bool:
    rec = try_read_record(rdir)
    return rec is not None and rec.finished


def file_digest(path: Path) -> dict:
    """{"file", "sha256", "bytes"} of a file, for a record to check it against later."""
    import hashlib

    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return {"file": Path(path).name, "sha256": h.hexdigest(), "bytes": n}


def model_problem(rdir: Path, rec: RunRecord) -> str | None:
    """Why the run's model.pt cannot be trusted (missing, truncated, changed), or None when it matches
    the size and sha256 its record holds. Records from before the check (no "model") are trusted on
    size > 0 alone."""
    path = Path(rdir) / MODEL_FILE
    if not path.is_file():
        return f"{path} is missing"
    want = rec.model or {}
    size = path.stat().st_size
    if want.get("bytes") is not None and size != want["bytes"]:
        return f"{path} has {size} bytes, its record says {want['bytes']} (truncated or replaced)"
    if size == 0:
        return f"{path} is empty"
    if want.get("sha256") and file_digest(path)["sha256"] != want["sha256"]:
        return f"{path} does not match the sha256 in its record (changed since the run)"
    return None


# --------------------------------------------------------------------------- loading a tree

ID_COLUMNS = ["suite", "dataset", "card", "family", "kind", "seed", "status", "eval", "sweep_param", "sweep_value"]


def _flat_provenance(prov: dict) -> dict:
    # Scalars stay as they are; a list (image size [C, H, W]) becomes "CxHxW" so it fits one cell.
    out = {f"prov_{k}": ("x".join(map(str, v)) if isinstance(v, list) else v)
           for k, v in (prov or {}).items() if not isinstance(v, dict)}
    out.update({f"prov_{k}_version": v for k, v in ((prov or {}).get("versions") or {}).items()})
    return out


def at_run_n(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows sampled at their run's n_fake. A point with its own n_fake (e.g. a 1000-step point timed
    on 100 samples) has a FID of another sample count: claims leave it out of FID comparisons, the
    report out of its quality plots (FID depends on n)."""
    if "prov_n_fake" not in rows or "run_n_fake" not in rows:
        return rows
    p = pd.to_numeric(rows["prov_n_fake"], errors="coerce")
    r = pd.to_numeric(rows["run_n_fake"], errors="coerce")
    return rows[p.isna() | r.isna() | (p == r)]


def rows_of_record(rec: RunRecord) -> list[dict]:
    """One DataFrame row per evaluation point of a run: the main one, then each further point."""
    base = {"suite": rec.suite, "dataset": rec.dataset, "card": rec.card, "family": rec.family, "kind": rec.kind,
            "seed": rec.seed, "status": rec.status, "suite_version": rec.suite_version,
            "gate_tolerances": (rec.gate or {}).get("tolerances"),
            # the run's own sample count: a point may use another n (its prov_n_fake says so)
            "run_n_fake": (rec.provenance or {}).get("n_fake")}
    base.update({f"trait_{k}": v for k, v in (rec.traits or {}).items() if not isinstance(v, (dict, list))})
    train = {k: v for k, v in (rec.training or {}).items() if not isinstance(v, (dict, list))}
    prov = _flat_provenance(rec.provenance)
    rows = []
    for pt in rec.points():
        p_prov = {**prov, **_flat_provenance(pt.provenance)} if pt.provenance else prov
        rows.append({**base, "eval": pt.name, "sweep_param": pt.param, "sweep_value": pt.value,
                     **(pt.metrics or {}), **(pt.sampling or {}), "sampler": pt.sampler or pt.sampling.get("sampler"),
                     **train, **p_prov})
    return rows


def find_runs(results: Path) -> list[Path]:
    return sorted(p.parent for p in Path(results).rglob(METRICS_FILE) if p.parent.name.startswith("seed"))


def iter_records(results: Path, warn: Callable[[str], None] | None = None):
    """(run folder, record) for every readable run record under `results`; each unreadable or malformed
    metrics.json is named through `warn` (one line) and skipped."""
    for rdir in find_runs(results):
        try:
            yield rdir, read_record(rdir)
        except (OSError, RecordError) as e:
            if warn is not None:
                warn(f"skipped {rdir / METRICS_FILE}: {e}")


def load_results(results: Path, warn: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every run under `results` as rows: one for its main evaluation, one per further point.

    Columns: ID_COLUMNS, then the metric keys (fid, precision, ...), sampling keys (img_per_s, nfe, ...),
    training keys (kimg, wall_s, diverged_at_kimg, ...), traits as trait_* and provenance as prov_*.
    """
    return frame(rec for _, rec in iter_records(Path(results), warn))


def frame(records) -> pd.DataFrame:
    """Records -> the DataFrame of their evaluation points (ID_COLUMNS always present)."""
    rows: list[dict] = []
    for rec in records:
        rows.extend(rows_of_record(rec))
    df = pd.DataFrame(rows)
    for c in ID_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    return df
