"""`genbench compare BASELINE CURRENT`: the CI regression gate.

Each side is a results tree or a summary file (summarize() below, written as JSON: a baseline can be
a small committed file such as results/baselines/smoke.json instead of a whole tree). For every
suite x dataset x card x evaluation (main, and each sweep point present in both) x metric, the
current mean over seeds is checked against the baseline mean, in the metric's own direction, with a
tolerance:
  1. the suite file's `tolerances` mapping (absolute, per metric), when the suite name resolves;
  2. else 2 x the baseline's standard deviation over seeds, when it has 2+ seeds and a nonzero spread;
  3. else 10% of the baseline mean (DEFAULT_REL_TOL).
`nfe` is gated exactly (any change fails: the sampler changed). Sampling speed and memory
(img_per_s, ms_per_img, peak_mem_mb) depend on the machine: they are reported, never gated.
A main-evaluation metric or a card the baseline has and the current lacks is a regression (a gate
that passes when a metric silently disappears protects nothing); so is a lower share of completed
runs, and a changed feature extractor (numbers from different extractors cannot be compared).
Sweep points are compared only where both sides have them.
Exit codes: 0 no regression, 1 regression, 2 unusable input (missing or malformed tree or summary).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from genbench import store
from genbench.errors import UserError

SUMMARY_FORMAT = "genbench-summary"
SUMMARY_VERSION = 1
DEFAULT_REL_TOL = 0.10
SPREAD_K = 2.0          # tolerance = SPREAD_K x baseline std over seeds

# Direction of every metric the gate reads: store.HIGHER_IS_BETTER, plus keys it has no direction for
# (None: reported nowhere, not gated; e.g. the std of IS across splits is not a quality).
DIRECTIONS: dict[str, bool | None] = {**store.HIGHER_IS_BETTER, "is_std": None, "kid_std": None,
                                      "modes_total": None}
INFO_ONLY = ("img_per_s", "ms_per_img", "peak_mem_mb")   # machine-dependent: reported, not gated
EXACT = ("nfe",)                                          # deterministic: any change fails
METRICS = tuple(m for m, d in DIRECTIONS.items() if d is not None)


class UnusableInput(UserError):
    """A baseline or current that is missing, malformed or empty (exit code 2)."""


@dataclass(frozen=True)
class CompareResult:
    exit_code: int
    markdown: str


def direction(metric: str) -> bool | None:
    """True if higher is better, False if lower is better, None if the metric has no direction."""
    return DIRECTIONS.get(metric)


# --------------------------------------------------------------------------- summaries


def _plain(v: Any) -> Any:
    """JSON-friendly scalar: NaN -> None, numpy scalars -> Python."""
    if v is None:
        return None
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _value(v: Any) -> Any:
    """A sweep value in one canonical form (50, 50.0 and numpy 50 are one key; NaN is None)."""
    v = _plain(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def validate_tree(results_dir: Path) -> list[Path]:
    """The run folders of a tree; UnusableInput when it is missing, empty or has a malformed metrics.json."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UnusableInput(f"{results_dir}: no such results folder")
    runs = store.find_runs(results_dir)
    if not runs:
        raise UnusableInput(f"{results_dir}: no runs (no <suite>/<dataset>/<card>/seed<k>/metrics.json)")
    for r in runs:
        try:
            m = store.read_json(r / store.METRICS_FILE)
        except (OSError, ValueError) as e:
            raise UnusableInput(f"{r / store.METRICS_FILE}: not valid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("status") not in store.STATUSES:
            raise UnusableInput(f"{r / store.METRICS_FILE}: no valid status (one of {', '.join(store.STATUSES)})")
        if not isinstance(m.get("metrics", {}), dict):
            raise UnusableInput(f"{r / store.METRICS_FILE}: 'metrics' is not a mapping")
    return runs


def summarize(results_dir: str | Path) -> dict:
    """A results tree reduced to what the gate compares: mean, std and n of every metric over the seeds
    of each suite x dataset x card x evaluation, and the run statuses. JSON-serializable."""
    validate_tree(Path(results_dir))
    df = store.load_results(Path(results_dir))
    entries: list[dict] = []
    ok = df[df["status"] == "complete"]
    keys = ["suite", "dataset", "card", "eval", "sweep_param", "sweep_value"]
    if len(ok):
        grouped = ok.assign(_sv=ok["sweep_value"].map(lambda v: json.dumps(_value(v)))).groupby(
            ["suite", "dataset", "card", "eval", "_sv"], dropna=False, sort=True)
        for _, g in grouped:
            first = g.iloc[0]
            ident = {k: _plain(first[k]) for k in keys}
            ident["sweep_value"] = _value(first["sweep_value"])
            for metric in METRICS:
                if metric not in g:
                    continue
                vals = pd.to_numeric(g[metric], errors="coerce").dropna()
                if vals.empty:
                    continue
                entries.append({**ident, "metric": metric, "n": int(len(vals)), "mean": float(vals.mean()),
                                "std": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                                "extractor": _joined(g, "prov_extractor"),
                                "extractor_sha256": _joined(g, "prov_extractor_sha256"),
                                "device": _joined(g, "device")})
    runs = []
    main = df[df["eval"] == "main"]
    for (suite, dataset, card), g in main.groupby(["suite", "dataset", "card"], dropna=False, sort=True):
        st = g["status"].value_counts()
        runs.append({"suite": suite, "dataset": dataset, "card": card, "n_runs": int(len(g)),
                     "n_complete": int(st.get("complete", 0)), "n_diverged": int(st.get("diverged", 0)),
                     "n_failed": int(st.get("failed", 0))})
    return {"format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "source": str(results_dir),
            "entries": entries, "runs": runs}


def _joined(g: pd.DataFrame, col: str) -> str | None:
    if col not in g:
        return None
    vals = sorted({str(v) for v in g[col].dropna()})
    return ",".join(vals) if vals else None


def write_summary(results_dir: str | Path, path: str | Path) -> Path:
    """Summarize a tree into a JSON file (how results/baselines/*.json are made)."""
    path = Path(path)
    store.write_json(path, summarize(results_dir))
    return path


def load_summary(path: str | Path) -> dict:
    """A summary file, checked; UnusableInput when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnusableInput(f"{path}: not a readable JSON summary ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        raise UnusableInput(f"{path}: not a genbench summary (expected \"format\": \"{SUMMARY_FORMAT}\")")
    if not isinstance(data.get("version"), int) or data["version"] > SUMMARY_VERSION:
        raise UnusableInput(f"{path}: summary version {data.get('version')!r} not supported (<= {SUMMARY_VERSION})")
    entries, runs = data.get("entries"), data.get("runs", [])
    if not isinstance(entries, list) or not isinstance(runs, list):
        raise UnusableInput(f"{path}: 'entries' and 'runs' must be lists")
    need = ("suite", "dataset", "card", "eval", "metric", "n", "mean")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in need) or not isinstance(e["mean"], (int, float)):
            raise UnusableInput(f"{path}: entry {i} lacks one of {', '.join(need)} or has a non-numeric mean")
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or any(k not in r for k in ("suite", "dataset", "card", "n_runs", "n_complete")):
            raise UnusableInput(f"{path}: runs entry {i} is malformed")
    if not entries and not runs:
        raise UnusableInput(f"{path}: the summary holds no runs")
    return data


def load_side(path: str | Path) -> dict:
    """A tree or a summary file, as a summary."""
    p = Path(path)
    if not p.exists():
        raise UnusableInput(f"{p}: not found")
    return summarize(p) if p.is_dir() else load_summary(p)


# --------------------------------------------------------------------------- the gate


def suite_tolerances(suite: str) -> dict[str, float]:
    """The suite file's absolute per-metric tolerances; {} when the suite does not resolve."""
    from genbench import config

    try:
        tol = config.load_suite(suite).tolerances
    except Exception:  # noqa: BLE001 - an unknown or broken suite only loses its tolerances
        try:  # the suite's cards may not load here (e.g. a family not installed): read the YAML alone
            import yaml

            tol = (yaml.safe_load((config.SUITES_DIR / f"{suite}.yaml").read_text()) or {}).get("tolerances", {})
        except Exception:  # noqa: BLE001
            tol = {}
    if not isinstance(tol, dict):
        return {}
    return {str(k): float(v) for k, v in tol.items() if isinstance(v, (int, float))}


def _key(e: dict) -> tuple:
    return (e["suite"], e["dataset"], e["card"], e["eval"], json.dumps(_value(e.get("sweep_value"))), e["metric"])


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4g}"


def _eval_name(e: dict) -> str:
    if e["eval"] == "main" or e.get("sweep_param") is None:
        return str(e["eval"])
    return f"{e['eval']} ({e['sweep_param']}={e.get('sweep_value')})"


def _tolerance(metric: str, base: dict, suite_tol: dict) -> tuple[float, str]:
    if metric in EXACT:
        return 0.0, "exact"
    if metric in suite_tol:
        return suite_tol[metric], "suite"
    std = base.get("std") or 0.0
    if base.get("n", 0) >= 2 and std > 1e-9 * max(1.0, abs(base["mean"])):   # not float noise
        return SPREAD_K * std, f"{SPREAD_K:g}σ base"
    return DEFAULT_REL_TOL * abs(base["mean"]), f"{DEFAULT_REL_TOL:.0%} default"


def gate(baseline: dict, current: dict) -> tuple[list[dict], int]:
    """Rows of the comparison table and the number of regressions."""
    cur = {_key(e): e for e in current["entries"]}
    tol_cache: dict[str, dict] = {}
    rows: list[dict] = []
    for b in sorted(baseline["entries"], key=_key):
        metric = b["metric"]
        higher = direction(metric)
        if higher is None:
            continue
        info = metric in INFO_ONLY
        row = {"suite": b["suite"], "dataset": b["dataset"], "card": b["card"], "eval": _eval_name(b),
               "metric": metric, "dir": "↑" if higher else "↓", "baseline": _fmt(b["mean"]) + _n(b)}
        c = cur.get(_key(b))
        if c is None:
            # sweeps are compared only where both sides ran them; a missing main metric fails
            gated = not info and b["eval"] == "main"
            rows.append({**row, "current": "missing", "delta": "–", "tol": "–",
                         "status": "REGRESSION: missing" if gated else "missing (not gated)"})
            continue
        row.update(current=_fmt(c["mean"]) + _n(c), delta=f"{c['mean'] - b['mean']:+.4g}")
        if not info and b.get("extractor_sha256") and c.get("extractor_sha256") and \
                b["extractor_sha256"] != c["extractor_sha256"]:
            rows.append({**row, "tol": "–", "status": "REGRESSION: extractor changed"})
            continue
        if b["suite"] not in tol_cache:
            tol_cache[b["suite"]] = suite_tolerances(b["suite"])
        tol, source = _tolerance(metric, b, tol_cache[b["suite"]])
        worse = (b["mean"] - c["mean"]) if higher else (c["mean"] - b["mean"])   # > 0: current is worse
        row["tol"] = f"{_fmt(tol)} ({source})"
        if metric in EXACT:
            status = "ok" if c["mean"] == b["mean"] else "REGRESSION: changed"
        elif worse > tol:
            status = "worse (not gated)" if info else "REGRESSION"
        elif -worse > tol:
            status = "better"
        else:
            status = "ok"
        rows.append({**row, "status": status})
    cur_runs = {(r["suite"], r["dataset"], r["card"]): r for r in current.get("runs", [])}
    for b in sorted(baseline.get("runs", []), key=lambda r: (r["suite"], r["dataset"], r["card"])):
        c = cur_runs.get((b["suite"], b["dataset"], b["card"]))
        row = {"suite": b["suite"], "dataset": b["dataset"], "card": b["card"], "eval": "main",
               "metric": "runs complete", "dir": "↑", "baseline": f"{b['n_complete']}/{b['n_runs']}",
               "delta": "–", "tol": "share"}
        if c is None:
            rows.append({**row, "current": "missing", "status": "REGRESSION: missing"})
            continue
        bs = b["n_complete"] / b["n_runs"] if b["n_runs"] else 0.0
        cs = c["n_complete"] / c["n_runs"] if c["n_runs"] else 0.0
        rows.append({**row, "current": f"{c['n_complete']}/{c['n_runs']}",
                     "status": "REGRESSION" if cs < bs else "ok"})
    n_reg = sum(r["status"].startswith("REGRESSION") for r in rows)
    return rows, n_reg


def _n(e: dict) -> str:
    return f" (n={e['n']})" if e.get("n", 1) != 1 else ""


COLUMNS = [("suite", "suite"), ("dataset", "dataset"), ("card", "card"), ("eval", "eval"), ("metric", "metric"),
           ("dir", "better"), ("baseline", "baseline"), ("current", "current"), ("delta", "Δ"),
           ("tol", "tolerance"), ("status", "status")]


def render(rows: list[dict], n_reg: int, baseline: str, current: str, n_new: int) -> str:
    head = "**Regression**" if n_reg else "**No regression**"
    lines = ["## genbench compare", "",
             f"baseline `{baseline}` · current `{current}`", "",
             f"{head}: {n_reg} of {len(rows)} checks failed." + (f" {n_new} entries of the current results "
                                                                  "are not in the baseline (not gated)." if n_new else ""),
             ""]
    if rows:
        order = sorted(rows, key=lambda r: not r["status"].startswith("REGRESSION"))
        lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in order:
            lines.append("| " + " | ".join(str(r.get(k, "")).replace("|", "\\|") for k, _ in COLUMNS) + " |")
        lines.append("")
    lines += [f"Tolerances: the suite file's `tolerances` (absolute) where set, else {SPREAD_K:g} × the baseline's "
              f"std over seeds, else {DEFAULT_REL_TOL:.0%} of the baseline mean; `nfe` must match exactly; "
              f"{', '.join(INFO_ONLY)} are machine-dependent and not gated. Means are over complete runs."]
    return "\n".join(lines) + "\n"


def compare(baseline: str | Path, current: str | Path) -> CompareResult:
    """Gate `current` against `baseline`; never raises for bad input (exit code 2 with a message)."""
    try:
        b = load_side(baseline)
        c = load_side(current)
    except UnusableInput as e:
        return CompareResult(2, f"## genbench compare\n\n**Unusable input**: {e}\n")
    rows, n_reg = gate(b, c)
    n_new = len({_key(e) for e in c["entries"]} - {_key(e) for e in b["entries"]})
    return CompareResult(1 if n_reg else 0, render(rows, n_reg, str(baseline), str(current), n_new))
