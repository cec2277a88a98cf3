"""`genbench report`: a results tree -> report.md, a self-contained report.html and plots/*.png.

The report reads only what the store wrote (metrics.json through store.load_results, curves.csv,
train_log.csv, samples.png). It is built once as a list of blocks (headings, paragraphs, tables,
images) and rendered twice: Markdown linking plots/*.png, and HTML embedding every image as a
base64 data URI, so the HTML opens offline with no external asset. A missing or partial tree still
gives a report, with "no runs" lines where there is nothing to show.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from genbench import claims as claims_mod
from genbench import store
from genbench.anchors import ANCHORS, CLAIM_ANCHORS
from genbench import metrics as registry
from genbench.compare import direction

# Columns, labels and directions come from the metric registry (genbench/metrics.py): a registered
# metric, a family's declared one included, gets its column without a change here.


def _feature(m: str) -> bool:
    """Computed in a feature extractor's space: never two extractors in one column."""
    met = registry.get(m)
    return met is not None and met.feature_space


def _device(m: str) -> bool:
    """Measured on one device: never two in a column."""
    met = registry.get(m)
    return met is not None and met.device_bound


def _label(m: str) -> str:
    return registry.label(m)


COLLAPSE_DROP = 0.2   # a collapse event: modes_covered falls below (1 - 0.2) x its running maximum
PLOT_DPI = 90
VERDICT_COLORS = {"supported": "#1a7f37", "contradicted": "#cf222e", "inconclusive": "#9a6700",
                  "not measured": "#6e7781"}


# --------------------------------------------------------------------------- document model


@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def markdown(self, out_dir: Path) -> str:
        lines: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "pre":
                lines += ["```", b[1], "```", ""]
            elif b[0] == "ul":
                lines += [f"- {x}" for x in b[1]] + [""]
            elif b[0] == "table":
                cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines.append("| " + " | ".join(cell(x) for x in b[1]) + " |")
                lines.append("|" + "---|" * len(b[1]))
                lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in b[2]]
                lines.append("")
            elif b[0] == "img":
                lines += [f"![{b[2]}]({b[1].relative_to(out_dir).as_posix()})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 f"<style>{CSS}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                slug = re.sub(r"[^a-z0-9]+", "-", b[2].lower()).strip("-")
                parts.append(f"<h{b[1]} id='{slug}'>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "pre":
                parts.append(f"<pre>{html.escape(b[1])}</pre>")
            elif b[0] == "ul":
                parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(str(x))}</th>" for x in b[1])
                body = "".join("<tr>" + "".join(f"<td>{_cell(str(x))}</td>" for x in r) + "</tr>" for r in b[2])
                parts.append(f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
            elif b[0] == "img":
                data = base64.b64encode(Path(b[1]).read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                             f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#1f2328}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #d0d7de;padding:3px 6px;
vertical-align:top;text-align:left}th{background:#f6f8fa}.tw{overflow-x:auto}img{max-width:100%}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:12px;color:#57606a}
pre{background:#f6f8fa;padding:.5em;white-space:pre-wrap;font-size:12px}code{background:#f6f8fa}
.v{font-weight:600}"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report uses inline: `code` and **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _cell(text: str) -> str:
    if text in VERDICT_COLORS:
        return f"<span class='v' style='color:{VERDICT_COLORS[text]}'>{html.escape(text)}</span>"
    return _inline(text)


# --------------------------------------------------------------------------- numbers


def _numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").dropna()


def mean_cell(values: pd.Series) -> str:
    """mean ± std [95% t-interval] (n) over seeds."""
    v = _numeric(values).to_numpy(dtype=float)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.4g} (n=1)"
    m, s = float(v.mean()), float(v.std(ddof=1))
    if s <= 1e-12 * max(1.0, abs(m)):   # equal values up to float noise
        s = 0.0
    h = stats.t.ppf(0.975, len(v) - 1) * s / math.sqrt(len(v))
    return f"{m:.4g} ± {s:.2g} [{m - h:.4g}, {m + h:.4g}] (n={len(v)})"


def _arrow(metric: str) -> str:
    d = direction(metric)
    return "" if d is None else (" ↑" if d else " ↓")


def _safe(name: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


# --------------------------------------------------------------------------- reading the tree


@dataclass
class Run:
    suite: str
    dataset: str
    card: str
    family: str | None
    seed: int
    status: str
    path: Path


def read_runs(results: Path, warn=None) -> list[Run]:
    """Every run folder with a readable record; each unreadable or malformed one is named through `warn`."""
    if not Path(results).is_dir():
        return []
    return [Run(rec.suite, rec.dataset, rec.card, rec.family, rec.seed, rec.status, rdir)
            for rdir, rec in store.iter_records(results, warn)]


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError):
        return None


def load_curves(runs: list[Run], filename: str) -> pd.DataFrame:
    """curves.csv (or train_log.csv) of every run, stacked, with suite/dataset/card/seed columns."""
    frames = []
    for r in runs:
        c = _read_csv(r.path / filename)
        if c is None or c.empty or "kimg" not in c:
            continue
        frames.append(c.assign(suite=r.suite, dataset=r.dataset, card=r.card, seed=r.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collapse_events(modes: pd.Series) -> int:
    """Times modes_covered falls below (1 - COLLAPSE_DROP) x its running maximum (entries, not evaluations)."""
    v = _numeric(modes).to_numpy(dtype=float)
    events, collapsed, best = 0, False, -math.inf
    for x in v:
        now = best > 0 and x < (1 - COLLAPSE_DROP) * best
        events += now and not collapsed
        collapsed = now
        best = max(best, x)
    return int(events)


# --------------------------------------------------------------------------- plots


class Plotter:
    """Writes plots/*.png with seaborn on the Agg backend; a failing plot becomes a line, never a crash."""

    def __init__(self, doc: Doc, plots: Path):
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        import seaborn as sns

        self.doc, self.dir, self.plt, self.sns = doc, plots, plt, sns
        self.files: list[Path] = []

    def __call__(self, name: str, caption: str, draw, *, ncols: int = 1, size=(5.0, 3.6), bottom=0.2) -> None:
        plt = self.plt
        fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=False)
        try:
            with self.sns.axes_style("whitegrid"):
                draw(*axes[0])
            # fixed margins: tight_layout would lay every figure out twice (40% of the plotting time)
            fig.subplots_adjust(left=0.13 / ncols ** 0.5, right=0.98, bottom=bottom, top=0.95, wspace=0.35)
            path = self.dir / f"{_safe(name)}.png"
            fig.savefig(path, dpi=PLOT_DPI)
            self.files.append(path)
            self.doc.img(path, caption)
        except Exception as e:  # noqa: BLE001 - one bad plot must not lose the report
            self.doc.p(f"Plot '{caption}' could not be drawn: {type(e).__name__}: {e}")
        finally:
            plt.close(fig)


def _pareto(points: pd.DataFrame, x: str, y: str, x_higher: bool) -> pd.DataFrame:
    """Points not dominated in (x, lower y): the best quality reachable at each sampling cost."""
    pts = points.sort_values(x, ascending=not x_higher)
    front, best = [], math.inf
    for _, r in pts.iterrows():
        if r[y] < best:
            front.append(r)
            best = r[y]
    return pd.DataFrame(front)


def plot_scope(pl: Plotter, tag: str, rows: pd.DataFrame, curves: pd.DataFrame, logs: pd.DataFrame,
               quality: str) -> None:
    sns = pl.sns
    ok = store.at_run_n(rows[rows["status"] == "complete"])
    main = ok[ok["eval"] == "main"]
    any_plot = False
    # A feature metric's axis names the extractor whose space it lives in, as the tables' columns do:
    # "FID" in a domain classifier's space is not comparable with Inception FID.
    extractors = sorted(set(_col(ok, "prov_extractor").dropna().astype(str)))
    space = f" [{extractors[0]}]" if len(extractors) == 1 else ""

    def label(m: str) -> str:
        return _label(m) + _arrow(m) + (space if _feature(m) else "")

    if not curves.empty and quality in curves and _numeric(curves[quality]).size:
        any_plot = True
        pl(f"{tag}_curves_{quality}", f"{_label(quality)} against kimg (band: ± 1 std over seeds)",
           lambda ax: (sns.lineplot(data=curves, x="kimg", y=quality, hue="card", errorbar="sd", ax=ax),
                       ax.set_ylabel(label(quality))))
    if not curves.empty and "modes_covered" in curves and _numeric(curves["modes_covered"]).size:
        any_plot = True
        pl(f"{tag}_curves_modes", "modes covered against kimg (band: ± 1 std over seeds)",
           lambda ax: sns.lineplot(data=curves, x="kimg", y="modes_covered", hue="card", errorbar="sd", ax=ax))

    if {"precision", "recall"} <= set(main.columns) and main[["precision", "recall"]].notna().all(axis=1).any():
        any_plot = True
        pr = main.dropna(subset=["precision", "recall"])

        def draw_pr(ax):
            sns.scatterplot(data=pr, x="recall", y="precision", hue="card", style="family", s=60, ax=ax)
            ax.set_xlim(0, 1.02), ax.set_ylim(0, 1.02)
        pl(f"{tag}_precision_recall", "precision against recall (one point per seed)", draw_pr)

    if quality in ok and ({"img_per_s", "nfe"} & set(ok.columns)):
        pts = ok.dropna(subset=[quality]).copy()
        pts["point"] = pts["card"] + np.where(pts["eval"] == "main", "", " " + pts["eval"].astype(str) + "="
                                              + pts["sweep_value"].astype(str))
        axes_x = [c for c in ("img_per_s", "nfe") if c in pts and _numeric(pts[c]).size]
        if axes_x:
            any_plot = True

            def draw_cost(*axes):
                for ax, x in zip(axes, axes_x):
                    p = pts.dropna(subset=[x])
                    p = p[pd.to_numeric(p[x], errors="coerce") > 0]
                    agg = p.groupby(["card", "point"], as_index=False)[[x, quality]].mean()
                    sns.scatterplot(data=agg, x=x, y=quality, hue="card", ax=ax, s=50)
                    front = _pareto(agg, x, quality, x_higher=(x == "img_per_s"))
                    if len(front):
                        ax.plot(front[x], front[quality], "k--", lw=1, label="Pareto front")
                    ax.set_xscale("log")
                    ax.set_xlabel(_label(x) + " (log)")
                    ax.set_ylabel(label(quality))
            pl(f"{tag}_pareto", f"{_label(quality)} against sampling cost (main and sweep points, "
                                "mean over seeds; dashed: Pareto front)", draw_cost, ncols=len(axes_x))

    steps = ok[(ok["sweep_param"] == "steps")] if quality in ok else ok.iloc[0:0]
    if len(steps) and _numeric(steps[quality]).size:
        any_plot = True
        st = steps.assign(steps=pd.to_numeric(steps["sweep_value"], errors="coerce")).dropna(subset=["steps", quality])

        def draw_steps(ax):
            sns.lineplot(data=st, x="steps", y=quality, hue="card", style="eval", markers=True, errorbar="sd", ax=ax)
            ax.set_xscale("log")
            ax.set_ylabel(label(quality))
        pl(f"{tag}_steps", f"{_label(quality)} against sampling steps (band: ± 1 std over seeds)",
           draw_steps)

    for param in ("guidance", "classifier_scale"):
        g = ok[ok["sweep_param"] == param]
        ms = [m for m in ("fid", "is_mean", "precision", "recall") if m in g and _numeric(g[m]).size]
        if len(g) and ms:
            any_plot = True
            gv = g.assign(value=pd.to_numeric(g["sweep_value"], errors="coerce"))

            def draw_guid(*axes, gv=gv, ms=ms):
                for ax, m in zip(axes, ms):
                    sns.lineplot(data=gv, x="value", y=m, hue="card", marker="o", errorbar="sd", ax=ax)
                    ax.set_ylabel(label(m))
                    ax.set_xlabel(param)
            pl(f"{tag}_{param}", f"metrics along the {param} sweep (band: ± 1 std over seeds)", draw_guid,
               ncols=len(ms), size=(3.6, 3.2))

    if "modes_covered" in main and _numeric(main["modes_covered"]).size:
        any_plot = True
        mc = main.dropna(subset=["modes_covered"]).assign(modes_covered=lambda d: pd.to_numeric(d["modes_covered"]))

        def draw_modes(ax):
            sns.barplot(data=mc, x="card", y="modes_covered", errorbar="sd", color="#9ecae1", ax=ax)
            sns.stripplot(data=mc, x="card", y="modes_covered", color="k", size=4, ax=ax)
            ax.tick_params(axis="x", rotation=30)
            for t in ax.get_xticklabels():
                t.set_ha("right")
            total = _numeric(_col(mc, "modes_total"))
            ax.set_ylabel("modes covered" + (f" (of {total.max():g})" if total.size else ""))
            ax.set_xlabel("")
        pl(f"{tag}_modes", "modes covered per card (bar: mean ± 1 std over seeds; dots: seeds)", draw_modes,
           bottom=0.3)

    if not logs.empty:
        gcols = [c for c in logs.columns if c.startswith("grad_norm_")]
        if gcols:
            any_plot = True
            long = logs.melt(id_vars=["kimg", "card", "seed"], value_vars=gcols, var_name="net", value_name="grad_norm")
            long = long.dropna(subset=["grad_norm"])

            def draw_grad(ax):
                sns.lineplot(data=long, x="kimg", y="grad_norm", hue="card", style="net", errorbar=None, ax=ax)
                ax.set_yscale("log")
            pl(f"{tag}_grad_norms", "gradient norms during training (mean over seeds; log scale)", draw_grad)
    if not any_plot:
        pl.doc.p("No plots: no runs with the metrics the plots need.")


# --------------------------------------------------------------------------- sections


def _scope_key(df: pd.DataFrame) -> list[tuple[str, str]]:
    if df.empty:
        return []
    return sorted({(str(s), str(d)) for s, d in zip(df["suite"], df["dataset"])})


def results_table(doc: Doc, rows: pd.DataFrame) -> None:
    main = rows[rows["eval"] == "main"]
    ok = main[main["status"] == "complete"]
    cols: list[tuple[str, str | None, str | None]] = []   # (metric, extractor, device)
    for m in registry.quality_metrics() + registry.sampling_metrics():
        if m not in ok or not _numeric(ok[m]).size:
            continue
        if _feature(m):
            for ex in sorted(set(_col(ok, "prov_extractor").dropna().astype(str))) or ["?"]:
                cols.append((m, ex, None))
        elif _device(m):
            for dv in sorted(set(_col(ok, "device").fillna("?").astype(str))):
                cols.append((m, None, dv))
        else:
            cols.append((m, None, None))
    headers = ["card", "family", "runs"] + [
        _label(m) + _arrow(m) + (f" [{ex}]" if ex else "") + (f" [{dv}]" if dv else "") for m, ex, dv in cols]
    body = []
    for card, g in main.groupby("card", sort=True):
        st = g["status"].value_counts()
        runs = ", ".join(f"{int(n)} {s}" for s, n in st.items())
        cells = [str(card), str(g["family"].dropna().iloc[0]) if g["family"].notna().any() else "?", runs]
        gok = g[g["status"] == "complete"]
        for m, ex, dv in cols:
            sel = gok
            if ex is not None and ex != "?":
                sel = sel[_col(sel, "prov_extractor").astype(str) == ex]
            if dv is not None:
                sel = sel[_col(sel, "device").fillna("?").astype(str) == dv]
            cells.append(mean_cell(sel[m]) if m in sel else "–")
        body.append(cells)
    if not body:
        doc.p("No runs.")
        return
    doc.table(headers, body)
    doc.p("Cells: mean ± std [95% t-interval of the mean] (n seeds), complete runs only, main evaluation. "
          "↑ higher is better, ↓ lower is better. Feature-based metrics name their extractor and timings "
          "their device in the column: numbers from different extractors or devices never share a column.")


def sweep_table(doc: Doc, rows: pd.DataFrame) -> None:
    sw = rows[(rows["eval"] != "main") & (rows["status"] == "complete")]
    if sw.empty:
        return
    ms = [m for m in ("fid", "is_mean", "precision", "recall", "modes_covered", "nfe", "img_per_s")
          if m in sw and _numeric(sw[m]).size]
    body = []
    # a point sampled at its own n_fake says so: its FID is not comparable with the run's (FID depends on n)
    other_n = ~sw.index.isin(store.at_run_n(sw).index)
    n_tag = np.where(other_n, " (n=" + _col(sw, "prov_n_fake").astype(str).str.replace(r"\.0$", "", regex=True)
                     + ")", "")
    sw = sw.assign(_v=pd.to_numeric(sw["sweep_value"], errors="coerce"), _s=sw["sweep_value"].astype(str) + n_tag)
    for (card, ev, sv), g in sw.groupby(["card", "eval", "_s"], sort=False):
        body.append([str(card), str(ev), f"{g['sweep_param'].iloc[0]}={sv}"] + [mean_cell(g[m]) for m in ms])
    order = sorted(range(len(body)), key=lambda i: (body[i][0], body[i][1], _sort_num(body[i][2])))
    doc.h(4, "Sweeps")
    doc.table(["card", "sweep", "point"] + [_label(m) + _arrow(m) for m in ms], [body[i] for i in order])


def _sort_num(point: str) -> tuple:
    v = point.split("=", 1)[-1]
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def stability_table(doc: Doc, rows: pd.DataFrame, curves: pd.DataFrame, quality: str) -> None:
    main = rows[rows["eval"] == "main"]
    if main.empty:
        doc.p("No runs.")
        return
    body = []
    for card, g in main.groupby("card", sort=True):
        div = g[g["status"] == "diverged"]
        at = _numeric(_col(div, "diverged_at_kimg"))
        div_txt = f"{len(div)}/{len(g)}" + (f" (at kimg {', '.join(f'{x:g}' for x in at)})" if len(at) else "")
        q = _numeric(g[g["status"] == "complete"][quality]) if quality in g else pd.Series(dtype=float)
        spread = "–"
        if len(q) > 1:
            cv = q.std(ddof=1) / abs(q.mean()) if q.mean() else math.nan
            spread = f"{q.std(ddof=1):.3g} (CV {cv:.1%})"
        ev_txt = "no modes_covered in curves.csv"
        if not curves.empty and "modes_covered" in curves:
            cc = curves[curves["card"] == card]
            if len(cc):
                per_seed = {s: collapse_events(c.sort_values("kimg")["modes_covered"]) for s, c in cc.groupby("seed")}
                hit = [f"seed{s}: {n}" for s, n in per_seed.items() if n]
                ev_txt = f"{sum(per_seed.values())}" + (f" ({', '.join(hit)})" if hit else "")
        body.append([str(card), div_txt, str(int((g["status"] == "failed").sum())), spread, ev_txt])
    doc.table(["card", "diverged", "failed", f"std of final {_label(quality)} over seeds",
               "collapse events"], body)
    doc.p(f"A collapse event: modes_covered in curves.csv falls below {1 - COLLAPSE_DROP:.0%} of its running "
          "maximum (counted once until it recovers).")


def provenance_table(doc: Doc, df: pd.DataFrame) -> None:
    main = df[df["eval"] == "main"] if not df.empty else df
    if main.empty:
        doc.p("No runs.")
        return
    vcols = sorted(c for c in main.columns if c.startswith("prov_") and c.endswith("_version"))
    keys = ["prov_extractor", "prov_extractor_sha256", "prov_n_real", "prov_n_fake", "prov_ref_split",
            "prov_image_size", "prov_device"]
    m = main.copy()
    m["_versions"] = [", ".join(f"{c[5:-8]} {r[c]}" for c in vcols if pd.notna(r[c])) for _, r in m.iterrows()]
    other = sorted(c for c in m.columns if c.startswith("prov_") and c not in keys and c not in vcols
                   and c != "prov_seed")
    m["_other"] = [", ".join(f"{c[5:]} {r[c]}" for c in other if pd.notna(r[c])) for _, r in m.iterrows()]
    for k in keys:
        m[k] = _col(m, k).map(lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else
                              (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)))
    body = []
    for ident, g in m.groupby(["suite", "dataset"] + keys + ["_versions", "_other"], sort=True, dropna=False):
        runs = "; ".join(f"{c} seeds {','.join(str(int(s)) for s in sorted(h['seed']))}"
                         for c, h in g.groupby("card", sort=True))
        body.append([str(x) for x in ident] + [runs])
    doc.table(["suite", "dataset", "extractor", "weights sha256", "n_real", "n_fake", "ref split", "image size",
               "device", "versions", "other", "runs"], body)


def claims_section(doc: Doc, df: pd.DataFrame) -> None:
    verdicts = claims_mod.evaluate_claims(df)
    doc.table(["claim", "verdict", "statement"], [[v.id, v.verdict, v.title] for v in verdicts])
    doc.p("How verdicts are reached:")
    doc.pre(claims_mod.RULES)
    for v in verdicts:
        doc.h(3, f"{v.id}: {v.verdict}")
        doc.p(v.title)
        rows = [[s.scope, c.text, c.verdict, c.evidence] for s in v.scopes for c in s.checks
                if c.verdict != claims_mod.NOT_MEASURED]
        if rows:
            doc.table(["scope", "check", "verdict", "evidence"], rows)
        missing = sorted({c.text for s in v.scopes for c in s.checks if c.verdict == claims_mod.NOT_MEASURED})
        if missing:
            doc.p("Not measured: " + "; ".join(missing) + ".")
        if not v.scopes:
            doc.p("Not measured: no runs.")
        keys = CLAIM_ANCHORS.get(v.id, ())
        if keys:
            doc.p("Published anchors (settings differ from ours: direction and size of the effect, not values to reproduce):")
            doc.ul([ANCHORS[k].text() for k in keys])
        else:
            doc.p("Published anchor: " + v.anchor + ".")


def _quality(rows: pd.DataFrame) -> str:
    for m in ("fid", "kid_mean", "mode_kl", "nll_bpd", "recon_mse"):
        if m in rows and _numeric(rows[m]).size:
            return m
    return "fid"


def build(results_dir: Path, out_dir: Path, warn=lambda line: None) -> Doc:
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    plots = out_dir / "plots"
    doc = Doc()
    problems: list[str] = []
    records = list(store.iter_records(results_dir, problems.append)) if results_dir.is_dir() else []
    for line in problems:
        warn(line)
    df = claims_mod.normalize(store.frame(rec for _, rec in records))
    runs = [Run(rec.suite, rec.dataset, rec.card, rec.family, rec.seed, rec.status, rdir) for rdir, rec in records]
    doc.h(1, "genbench report")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    main = df[df["eval"] == "main"]
    counts = ", ".join(f"{n} {s}" for s, n in main["status"].value_counts().items()) or "none"
    doc.p(f"Results from `{results_dir}`, {len(main)} runs ({counts}); generated {stamp}.")
    if problems:
        doc.p(f"{len(problems)} run record(s) could not be read and are left out:")
        doc.ul(problems)
    if main.empty:
        doc.p("No runs found: nothing under the results folder has a metrics.json. Run `genbench run --suite NAME` first.")

    doc.h(2, "Claims")
    claims_section(doc, df)

    pl = Plotter(doc, plots)
    curves_all = load_curves(runs, store.CURVES_FILE)
    logs_all = load_curves(runs, store.TRAIN_LOG_FILE)
    doc.h(2, "Results")
    scopes = _scope_key(df)
    if not scopes:
        doc.p("No runs.")
    for suite, dataset in scopes:
        rows = df[(df["suite"].astype(str) == suite) & (df["dataset"].astype(str) == dataset)]
        sel = lambda c: c[(c["suite"] == suite) & (c["dataset"] == dataset)] if not c.empty else c  # noqa: E731
        curves, logs = sel(curves_all), sel(logs_all)
        tag = f"{_safe(suite)}_{_safe(dataset)}"
        q = _quality(rows)
        doc.h(3, f"Suite {suite} · dataset {dataset}")
        results_table(doc, rows)
        sweep_table(doc, rows)
        doc.h(4, "Plots")
        plot_scope(pl, tag, rows, curves, logs, q)
        doc.h(4, "Samples")
        shown = False
        for r in sorted((r for r in runs if r.suite == suite and r.dataset == dataset), key=lambda r: (r.card, r.seed)):
            src = r.path / store.SAMPLES_FILE
            if src.is_file() and not any(f.name.startswith(f"{tag}_samples_{_safe(r.card)}.") for f in pl.files):
                dst = plots / f"{tag}_samples_{_safe(r.card)}.png"
                shutil.copyfile(src, dst)
                pl.files.append(dst)
                doc.img(dst, f"{r.card}, seed {r.seed} ({r.status})")
                shown = True
        if not shown:
            doc.p("No sample grids (no samples.png).")
        doc.h(4, "Training stability")
        stability_table(doc, rows, curves, q)

    doc.h(2, "Provenance")
    doc.p("Where every number above comes from: feature extractor and its weights hash, sample counts, "
          "reference split, image size, device and package versions, per group of runs that share them.")
    provenance_table(doc, df)
    return doc


def write_report(results_dir: Path, out_dir: Path, warn=lambda line: None) -> Path:
    """Write report.md, report.html and plots/*.png under out_dir; return the report.md path."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    if plots.is_dir():  # plots of an earlier report would otherwise linger beside the new ones
        for f in plots.glob("*.png"):
            f.unlink()
    plots.mkdir(parents=True, exist_ok=True)
    import matplotlib

    with matplotlib.rc_context():
        doc = build(Path(results_dir), out_dir, warn)
    md = out_dir / "report.md"
    store.atomic_write_bytes(md, doc.markdown(out_dir).encode())
    store.atomic_write_bytes(out_dir / "report.html", doc.html("genbench report").encode())
    return md
