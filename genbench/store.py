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
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pandas as pd

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
CURVES_FILE = "curves.csv"
TRAIN_LOG_FILE = "train_log.csv"
SAMPLES_FILE = "samples.png"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"

FINAL_STATUSES = ("complete", "diverged")   # a run in one of these is never redone
STATUSES = FINAL_STATUSES + ("failed",)     # failed: crashed; rerun on the next `genbench run`

# Metric keys of metrics.json "metrics" and whether higher is better (lm-eval's habit: every metric
# declares its direction; report and compare read it from here).
HIGHER_IS_BETTER: dict[str, bool] = {
    "fid": False, "is_mean": True, "kid_mean": False, "precision": True, "recall": True, "f_score": True,
    "modes_covered": True, "mode_kl": False, "high_quality_frac": True, "nll_bpd": False,
    "recon_mse": False, "codebook_perplexity": True, "codebook_usage": True, "prior_bits_per_code": False,
    "img_per_s": True, "ms_per_img": False, "nfe": False, "peak_mem_mb": False,
}


def run_dir(results: Path, suite: str, dataset: str, card: str, seed: int) -> Path:
    return Path(results) / suite / dataset.replace("/", "_").replace(":", "_") / card / f"seed{seed}"


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


def is_finished(rdir: Path) -> bool:
    p = Path(rdir) / METRICS_FILE
    if not p.is_file():
        return False
    try:
        return read_json(p).get("status") in FINAL_STATUSES
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- loading a tree

ID_COLUMNS = ["suite", "dataset", "card", "family", "seed", "status", "eval", "sweep_param", "sweep_value"]


def _rows_of_run(m: dict, ids: dict) -> list[dict]:
    base = {**ids, "status": m.get("status")}
    train = {k: v for k, v in (m.get("training") or {}).items() if not isinstance(v, (dict, list))}
    # Scalars stay as they are; a list (image size [C, H, W]) becomes "CxHxW" so it fits one cell.
    prov = {f"prov_{k}": ("x".join(map(str, v)) if isinstance(v, list) else v)
            for k, v in (m.get("provenance") or {}).items() if not isinstance(v, dict)}
    prov.update({f"prov_{k}_version": v for k, v in ((m.get("provenance") or {}).get("versions") or {}).items()})
    main = {**base, "eval": "main", "sweep_param": None, "sweep_value": None,
            **(m.get("metrics") or {}), **(m.get("sampling") or {}), **train, **prov}
    rows = [main]
    for pt in m.get("sweeps") or []:
        rows.append({**base, "eval": pt.get("name"), "sweep_param": pt.get("param"),
                     "sweep_value": pt.get("value"), **(pt.get("metrics") or {}),
                     **(pt.get("sampling") or {}), **train, **prov})
    return rows


def find_runs(results: Path) -> list[Path]:
    return sorted(p.parent for p in Path(results).rglob(METRICS_FILE) if p.parent.name.startswith("seed"))


def load_results(results: Path) -> pd.DataFrame:
    """Every run under `results` as rows: one for its main evaluation, one per sweep point.

    Columns: ID_COLUMNS, then the metric keys (fid, precision, ...), sampling keys (img_per_s, nfe, ...),
    training keys (kimg, wall_s, diverged_at_kimg, ...) and provenance as prov_* columns.
    """
    rows: list[dict] = []
    results = Path(results)
    for rdir in find_runs(results):
        try:
            m = read_json(rdir / METRICS_FILE)
        except (OSError, ValueError):
            continue
        rel = rdir.relative_to(results).parts
        ids = {"suite": m.get("suite", rel[-4] if len(rel) >= 4 else None),
               "dataset": m.get("dataset", rel[-3] if len(rel) >= 3 else None),
               "card": m.get("card", rel[-2]), "family": m.get("family"),
               "seed": int(m.get("seed", rel[-1].removeprefix("seed")))}
        rows.extend(_rows_of_run(m, ids))
    df = pd.DataFrame(rows)
    for c in ID_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    return df
