"""`genbench compare BASELINE CURRENT`: the CI regression gate.

Each side is a results tree or a summary file (summarize() below, written as JSON: a baseline is a
small committed file such as results/baselines/smoke.json). For every suite x dataset x card x
evaluation point x metric of the baseline, the median of the current seeds is checked against the
median of the baseline's, one-sided in the metric's harmful direction, within a band made from the
baseline's measured spread over seeds:

    band = t(1 - alpha, n - 1) * s * sqrt(v(n) + v(m))

the prediction bound for the difference between the median of m new seeds and the median of the n
baseline seeds when nothing changed (s: the baseline's std over seeds; v(k): the variance of the median
of k standard normals, 1/k for k <= 2, 0.449 for k = 3, about pi/(2k) for large k). One seed of a short
CPU run is chaotic, and another machine's BLAS acts like another seed, so the band is what lets a clean
machine pass; the median is what keeps one chaotic seed out of the verdict (with 3 or more current
seeds a single bad seed cannot fail the gate, a real regression moves them all). Medians also keep the
two sides' centres comparable when a metric's spread is skewed. alpha = FWER / K for the K band checks
(Bonferroni): an unchanged tree fails anywhere with chance at most FWER (1% by default), under
normality. Then:
  * a metric whose band is wider than the baseline median itself (UNSTABLE_REL) cannot tell a value
    from its double or from zero: reported as "unstable", not gated;
  * a whole-number metric (modes covered) gets a band of at least 1; a suite's `tolerances` (stored in
    each run's record at run time, never read from the suite file here) are floors under the band;
  * with a one-seed baseline there is no spread: the floor, else 10% of the baseline value;
  * NFE is gated exactly (the sampler changed); img/s, ms/img and memory depend on the machine and
    are reported, never gated; metrics without a direction are left out.
A main-point metric or a card the baseline has and the current lacks is a regression, as are a lower
share of completed runs and a changed feature extractor. Other points are compared where both have
them. Exit codes: 0 no regression, 1 regression, 2 unusable input (missing or malformed tree or summary).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from genbench import metrics as registry
from genbench import store
from genbench.errors import UserError

SUMMARY_FORMAT = "genbench-summary"
SUMMARY_VERSION = 2
FWER = 0.01              # chance that an unchanged tree fails somewhere (all band checks together)
UNSTABLE_REL = 1.0       # band / |baseline mean| above this: too unstable to gate
SINGLE_SEED_REL = 0.10   # tolerance for a one-seed baseline without a floor
FLOAT_NOISE_REL = 1e-6   # a zero spread still allows float noise


class UnusableInput(UserError):
    """A baseline or current that is missing, malformed or empty (exit code 2)."""


@dataclass(frozen=True)
class CompareResult:
    exit_code: int
    markdown: str


def direction(metric: str) -> bool | None:
    """True if higher is better, False if lower is better, None if the metric has no direction."""
    return registry.direction(metric)


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
    """The run folders of a tree; UnusableInput when it is missing, empty or holds a malformed record
    (a gate over a damaged tree must not pass by leaving a run out)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UnusableInput(f"{results_dir}: no such results folder")
    runs = store.find_runs(results_dir)
    if not runs:
        raise UnusableInput(f"{results_dir}: no runs (no <suite>/<dataset>/<card>/seed<k>/metrics.json)")

    def fail(msg: str):
        raise UnusableInput(msg)

    for _ in store.iter_records(results_dir, warn=fail):
        pass
    return runs


def summarize(results_dir: str | Path) -> dict:
    """A results tree reduced to what the gate compares: per suite x dataset x card x point x metric the
    values over seeds (with mean, std, n), the extractor, the floors the suite set, and the run
    statuses. JSON-serializable; nothing in it needs the suite file later."""
    validate_tree(Path(results_dir))
    df = store.load_results(Path(results_dir))
    entries: list[dict] = []
    ok = df[df["status"] == "complete"]
    keys = ["suite", "dataset", "card", "eval", "sweep_param", "sweep_value"]
    if len(ok):
        grouped = ok.assign(_sv=ok["sweep_value"].map(lambda v: json.dumps(_value(v)))).groupby(
            ["suite", "dataset", "card", "eval", "_sv"], dropna=False, sort=True)
        for _, g in grouped:
            g = g.sort_values("seed")
            first = g.iloc[0]
            ident = {k: _plain(first[k]) for k in keys}
            ident["sweep_value"] = _value(first["sweep_value"])
            floors = _floors(g)
            for metric, m in registry.METRICS.items():
                if metric not in g or m.higher_is_better is None:
                    continue
                sel = pd.to_numeric(g[metric], errors="coerce")
                keep = sel.notna()
                vals = sel[keep]
                if vals.empty:
                    continue
                entries.append({**ident, "metric": metric, "n": int(len(vals)), "mean": float(vals.mean()),
                                "std": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                                "values": [float(v) for v in vals], "seeds": [int(s) for s in g["seed"][keep]],
                                "floor": floors.get(metric),
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


def _floors(g: pd.DataFrame) -> dict[str, float]:
    """The suite's absolute tolerances as its runs recorded them (the first run's; they share a suite)."""
    if "gate_tolerances" not in g:
        return {}
    for tol in g["gate_tolerances"]:
        if isinstance(tol, dict):
            return {str(k): float(v) for k, v in tol.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


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
    """A summary file, checked; UnusableInput when it is not one. Version-1 summaries (no per-seed
    values, no floors) still load."""
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
        if not isinstance(e, dict) or any(k not in e for k in need) or not isinstance(e["mean"], (int, float)) \
                or not isinstance(e["n"], int) or e["n"] < 1:
            raise UnusableInput(f"{path}: entry {i} lacks one of {', '.join(need)} or has a non-numeric mean or n")
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


# --------------------------------------------------------------------------- the band


@functools.lru_cache(maxsize=None)
def median_variance(m: int) -> float:
    """Variance of the median of m independent standard normals (1 for m = 1, 1/2 for m = 2, 0.449 for
    m = 3, about pi/(2m) for large m), by numerical integration of the order statistics' density."""
    if m < 1:
        raise ValueError("m must be at least 1")
    if m > 201:
        return math.pi / (2 * m)
    from scipy import integrate

    pdf, cdf = stats.norm.pdf, stats.norm.cdf
    if m % 2:
        k = (m + 1) // 2
        return float(integrate.quad(lambda x: x * x * pdf(x) * stats.beta.pdf(cdf(x), k, m - k + 1), -12, 12,
                                    limit=200)[0])
    # Even m: the mean of order statistics k and k+1, whose joint density over x < y is
    # c F(x)^(k-1) (1 - F(y))^(k-1) f(x) f(y); integrated on a grid (the trapezoid rule is exact to ~1e-7 here).
    k = m // 2
    x = np.linspace(-8.0, 8.0, 2001)
    h = x[1] - x[0]
    logc = math.lgamma(m + 1) - 2 * math.lgamma(k)
    lx = (k - 1) * stats.norm.logcdf(x) + stats.norm.logpdf(x)        # the lower statistic's factor
    ly = (k - 1) * stats.norm.logsf(x) + stats.norm.logpdf(x)         # the upper one's
    weight = np.triu(np.ones((len(x), len(x))), 1) + 0.5 * np.eye(len(x))   # x < y, the diagonal halved
    dens = np.exp(logc + lx[:, None] + ly[None, :]) * weight
    return float((dens * ((x[:, None] + x[None, :]) / 2) ** 2).sum() * h * h)


def median(e: dict) -> float:
    """The median of an entry's per-seed values (its mean when a version-1 summary kept no values)."""
    v = e.get("values")
    return float(np.median(v)) if v else float(e["mean"])


def band(std: float, n_base: int, n_cur: int, alpha: float) -> float:
    """One-sided prediction bound (level 1 - alpha) for median(m new seeds) - median(n baseline seeds)
    when nothing changed, from the baseline's std over seeds s: t(1 - alpha, n - 1) s sqrt(v(n) + v(m)),
    v(k) the variance of the median of k standard normals (1/k for k <= 2)."""
    if n_base < 2:
        raise ValueError("a band needs at least 2 baseline seeds")
    return float(stats.t.ppf(1 - alpha, n_base - 1)) * std * math.sqrt(median_variance(n_base) +
                                                                       median_variance(max(1, n_cur)))


@dataclass(frozen=True)
class Tolerance:
    value: float | None       # None: not gated
    how: str                  # shown in the table


def tolerance(entry: dict, n_cur: int, alpha: float) -> Tolerance:
    """How far the current median may move in the harmful direction before the check fails."""
    m = registry.get(entry["metric"])
    if m is not None and m.gate == registry.EXACT:
        return Tolerance(0.0, "exact")
    floor = entry.get("floor")
    floor = float(floor) if isinstance(floor, (int, float)) else 0.0
    if m is not None and m.integer:
        floor = max(floor, 1.0)
    mid, n = median(entry), int(entry.get("n") or 1)
    std = entry.get("std")
    if n < 2 or std is None:
        if floor > 0:
            return Tolerance(floor, "floor (1-seed baseline)")
        return Tolerance(SINGLE_SEED_REL * abs(mid), f"{SINGLE_SEED_REL:.0%} (1-seed baseline)")
    b = band(float(std), n, n_cur, alpha)
    how = f"t-band n={n}, m={n_cur}"
    if b > UNSTABLE_REL * abs(mid) and b > floor:
        return Tolerance(None, f"unstable: band {b:.3g} > |median|")
    if floor > b:
        b, how = floor, "floor"
    return Tolerance(max(b, FLOAT_NOISE_REL * abs(mid)), how)


# --------------------------------------------------------------------------- the gate


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


def _gated(e: dict) -> bool:
    m = registry.get(e["metric"])
    return m is not None and m.higher_is_better is not None and m.gate == registry.BAND


def gate(baseline: dict, current: dict, fwer: float = FWER) -> tuple[list[dict], int]:
    """Rows of the comparison table and the number of regressions."""
    if not 0 < fwer < 1:
        raise UserError(f"the false-alarm rate must be in (0, 1), got {fwer}")
    cur = {_key(e): e for e in current["entries"]}
    n_band = sum(1 for b in baseline["entries"] if _gated(b) and (b.get("n") or 1) >= 2 and _key(b) in cur)
    alpha = fwer / max(1, n_band)
    rows: list[dict] = []
    for b in sorted(baseline["entries"], key=_key):
        metric = b["metric"]
        m = registry.get(metric)
        higher = direction(metric)
        if higher is None:
            continue
        info = m.gate == registry.INFO
        row = {"suite": b["suite"], "dataset": b["dataset"], "card": b["card"], "eval": _eval_name(b),
               "metric": metric, "dir": "↑" if higher else "↓", "baseline": _fmt(b["mean"]) + _n(b)}
        c = cur.get(_key(b))
        if c is None:
            gated = not info and b["eval"] == "main"
            rows.append({**row, "current": "missing", "delta": "–", "tol": "–",
                         "status": "REGRESSION: missing" if gated else "missing (not gated)"})
            continue
        bm, cm = median(b), median(c)
        row.update(baseline=_fmt(bm) + _n(b), current=_fmt(cm) + _n(c), delta=f"{cm - bm:+.4g}")
        if not info and b.get("extractor_sha256") and c.get("extractor_sha256") and \
                b["extractor_sha256"] != c["extractor_sha256"]:
            rows.append({**row, "tol": "–", "status": "REGRESSION: extractor changed"})
            continue
        worse = (bm - cm) if higher else (cm - bm)   # > 0: the current is worse
        if info:
            rows.append({**row, "tol": "not gated (machine-dependent)",
                         "status": "worse (not gated)" if worse > 0 else "ok (not gated)"})
            continue
        tol = tolerance(b, int(c.get("n") or 1), alpha)
        if m.gate == registry.EXACT:
            status = "ok" if c["mean"] == b["mean"] and cm == bm else "REGRESSION: changed"
        elif tol.value is None:
            status = "unstable (not gated)"
        elif worse > tol.value:
            status = "REGRESSION"
        elif -worse > tol.value:
            status = "better"
        else:
            status = "ok"
        row["tol"] = tol.how if tol.value is None else f"{_fmt(tol.value)} ({tol.how})"
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


def render(rows: list[dict], n_reg: int, baseline: str, current: str, n_new: int, fwer: float = FWER) -> str:
    head = "**Regression**" if n_reg else "**No regression**"
    n_unstable = sum(r["status"].startswith("unstable") for r in rows)
    lines = ["## genbench compare", "",
             f"baseline `{baseline}` · current `{current}`", "",
             f"{head}: {n_reg} of {len(rows)} checks failed." +
             (f" {n_unstable} too unstable to gate (reported)." if n_unstable else "") +
             (f" {n_new} entries of the current results are not in the baseline (not gated)." if n_new else ""),
             ""]
    if rows:
        order = sorted(rows, key=lambda r: not r["status"].startswith("REGRESSION"))
        lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in order:
            lines.append("| " + " | ".join(str(r.get(k, "")).replace("|", "\\|") for k, _ in COLUMNS) + " |")
        lines.append("")
    lines += [f"Tolerance: the one-sided band t(1 - α, n - 1) · s · √(v(n) + v(m)) from the baseline's spread over "
              f"its n seeds (s) for the median of the current m seeds against the baseline's median (v(k): the "
              f"variance of the median of k standard normals), α = {fwer:g} / the number of band checks "
              f"(Bonferroni: an unchanged tree fails anywhere with chance ≤ {fwer:g}); a band wider than the "
              f"baseline median is too unstable to gate; the suite's tolerances are floors (1 for whole numbers); "
              f"a one-seed baseline uses its floor or {SINGLE_SEED_REL:.0%}. NFE must match exactly; img/s, "
              f"ms/img and memory are machine-dependent and not gated. Medians are over complete runs."]
    return "\n".join(lines) + "\n"


def compare(baseline: str | Path, current: str | Path, fwer: float = FWER) -> CompareResult:
    """Gate `current` against `baseline`; never raises for bad input (exit code 2 with a message)."""
    try:
        b = load_side(baseline)
        c = load_side(current)
    except UnusableInput as e:
        return CompareResult(2, f"## genbench compare\n\n**Unusable input**: {e}\n")
    rows, n_reg = gate(b, c, fwer)
    n_new = len({_key(e) for e in c["entries"]} - {_key(e) for e in b["entries"]})
    return CompareResult(1 if n_reg else 0, render(rows, n_reg, str(baseline), str(current), n_new, fwer))
