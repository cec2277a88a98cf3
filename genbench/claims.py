"""Claims C1-C8: each a function over the results DataFrame that returns a verdict with its numbers.

Rules (stated once, used everywhere; the report prints RULES):
- Claims compare runs only within one scope: one suite, one dataset, one feature extractor. Families
  are compared by pooling the seeds of all their cards (main evaluation, complete runs only).
- "A is higher/lower than B": supported when the means differ in the claimed direction and the 95%
  t-intervals over seeds do not overlap; contradicted when they differ the other way without overlap;
  inconclusive when the intervals overlap or a side has fewer than 2 seeds; not measured when a side
  has no runs.
- "A is no worse than B" (non-inferiority, margin m relative to B's mean): supported when the upper
  end of the 95% Welch interval of A's shortfall is within m; contradicted when its lower end is past m.
- "A spreads more over seeds than B": one-sided F-test on the pooled within-card variances, 5% level.
- "more diverged runs": one-sided Fisher exact test on diverged vs finished counts, 5% level.
- "A at least k times slower than B" (times per image): the 95% Welch interval of log A - log B,
  exponentiated, bounds the ratio; supported when its lower end is >= k, contradicted when its upper
  end is < k (times vary by factors and cannot be negative, so they are compared on log scale).
- Deterministic quantities (NFE, counts of diverged runs) are compared directly, whatever the seeds.
- A claim is a conjunction of checks: in one scope it is contradicted if any check is contradicted,
  supported only if every check was measured and is supported, not measured if no check is, and
  inconclusive otherwise (a half-measured claim is not supported by the half that was). Across scopes:
  supported and contradicted scopes together make it inconclusive (mixed); otherwise the strongest
  verdict present wins (contradicted, then supported, then inconclusive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats

from genbench.anchors import anchor_text
from genbench.store import at_run_n

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = "supported", "contradicted", "inconclusive", "not measured"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED)
ALPHA = 0.05

RULES = __doc__.split("Rules (stated once, used everywhere; the report prints RULES):\n", 1)[1].strip()

# What the claims call "DDPM", "iDDPM", "ADM" and the guided models, by family and declared traits (a
# card's `traits:`), never by card name: a renamed or new card with these traits is counted the same.
ROLES: dict[str, dict[str, str]] = {
    "ddpm": {"family": "diffusion", "architecture": "ddpm-unet", "schedule": "linear", "variance": "fixed",
             "conditioning": "none"},
    "iddpm": {"family": "diffusion", "architecture": "ddpm-unet", "schedule": "cosine", "variance": "learned",
              "conditioning": "none"},
    "adm": {"family": "diffusion", "architecture": "adm", "conditioning": "none"},
    "adm-cfg": {"family": "diffusion", "architecture": "adm", "conditioning": "classifier-free"},
    "adm-cg": {"family": "diffusion", "architecture": "adm", "conditioning": "classifier"},
}


@dataclass(frozen=True)
class Check:
    """One measured statement inside a claim, in one scope."""
    text: str
    verdict: str
    evidence: str
    numbers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScopeVerdict:
    scope: str                  # "suite/dataset" (+ " [extractor]" when a dataset has several)
    verdict: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class ClaimVerdict:
    id: str
    title: str
    verdict: str
    evidence: str
    numbers: dict
    anchor: str
    scopes: tuple[ScopeVerdict, ...] = ()


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Sample:
    """Values of one metric over seeds (or over pooled cards of a family)."""
    label: str
    values: np.ndarray

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        """95% t-interval of the mean; NaN with fewer than 2 values."""
        if self.n < 2:
            return (math.nan, math.nan)
        h = stats.t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n)
        return (self.mean - h, self.mean + h)

    def fmt(self) -> str:
        if self.n == 0:
            return "no runs"
        if self.n == 1:
            return f"{self.mean:.4g} (n=1)"
        lo, hi = self.ci
        return f"{self.mean:.4g} [{lo:.4g}, {hi:.4g}] (n={self.n})"

    def numbers(self, key: str) -> dict:
        lo, hi = self.ci
        return {f"{key} mean": self.mean, f"{key} ci_lo": lo, f"{key} ci_hi": hi, f"{key} n": float(self.n)}


def _two_samples(a: Sample, b: Sample, metric: str, text: str) -> tuple[dict, str, Check | None]:
    """Numbers and evidence of a two-sample check, and its verdict when a side is too small to test."""
    nums = {**a.numbers(f"{a.label} {metric}"), **b.numbers(f"{b.label} {metric}")}
    ev = f"{a.label} {metric} {a.fmt()} vs {b.label} {b.fmt()}"
    if a.n == 0 or b.n == 0:
        return nums, ev, Check(text, NOT_MEASURED, ev, nums)
    if a.n < 2 or b.n < 2:
        return nums, ev, Check(text, INCONCLUSIVE, ev + ": fewer than 2 seeds", nums)
    return nums, ev, None


def differ(a: Sample, b: Sample, metric: str, a_higher: bool, text: str) -> Check:
    """Claimed: mean of a is higher (a_higher) or lower than mean of b; rule: 95% t-intervals disjoint."""
    nums, ev, early = _two_samples(a, b, metric, text)
    if early is not None:
        return early
    (alo, ahi), (blo, bhi) = a.ci, b.ci
    if alo <= bhi and blo <= ahi:
        return Check(text, INCONCLUSIVE, ev + ": 95% intervals overlap", nums)
    claimed = a.mean > b.mean if a_higher else a.mean < b.mean
    return Check(text, SUPPORTED if claimed else CONTRADICTED,
                 ev + (": intervals disjoint, as claimed" if claimed else ": intervals disjoint, the other way"), nums)


def no_worse(a: Sample, b: Sample, metric: str, higher_is_better: bool, margin_rel: float, text: str) -> Check:
    """Claimed: a is no worse than b by more than margin_rel * |mean b| (Welch 95% interval)."""
    nums, ev, early = _two_samples(a, b, metric, text)
    if early is not None:
        return early
    # shortfall > 0 means a is worse than b
    d = (b.mean - a.mean) if higher_is_better else (a.mean - b.mean)
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se > 0:
        df = (va + vb) ** 2 / ((va ** 2 / (a.n - 1) if va else 0) + (vb ** 2 / (b.n - 1) if vb else 0))
        h = stats.t.ppf(0.975, df) * se
    else:
        h = 0.0
    margin = margin_rel * abs(b.mean)
    nums.update({"shortfall": d, "shortfall ci_lo": d - h, "shortfall ci_hi": d + h, "margin": margin})
    ev += f": shortfall {d:.4g} [{d - h:.4g}, {d + h:.4g}], margin {margin:.4g} ({margin_rel:.0%})"
    if d + h <= margin:
        return Check(text, SUPPORTED, ev, nums)
    if d - h > margin:
        return Check(text, CONTRADICTED, ev, nums)
    return Check(text, INCONCLUSIVE, ev, nums)


def _pooled_var(groups: list[np.ndarray]) -> tuple[float, int]:
    """Pooled within-group variance and its degrees of freedom (groups of < 2 values add nothing)."""
    ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if len(g) > 1)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    return (ss / df if df else math.nan), df


def spread_larger(a_label: str, a_groups: list[np.ndarray], b_label: str, b_groups: list[np.ndarray],
                  metric: str, text: str) -> Check:
    """Claimed: a's seed-to-seed variance exceeds b's (one-sided F-test on pooled within-card variances)."""
    va, dfa = _pooled_var(a_groups)
    vb, dfb = _pooled_var(b_groups)
    nums = {f"{a_label} {metric} seed std": math.sqrt(va) if dfa else math.nan, f"{a_label} df": float(dfa),
            f"{b_label} {metric} seed std": math.sqrt(vb) if dfb else math.nan, f"{b_label} df": float(dfb)}
    if not any(len(g) for g in a_groups) or not any(len(g) for g in b_groups):
        return Check(text, NOT_MEASURED, f"{metric}: runs of {a_label} or {b_label} missing", nums)
    if dfa == 0 or dfb == 0:
        return Check(text, INCONCLUSIVE, f"{metric}: fewer than 2 seeds per card on one side", nums)
    ev = (f"pooled seed std of {metric}: {a_label} {math.sqrt(va):.4g} (df {dfa}) vs "
          f"{b_label} {math.sqrt(vb):.4g} (df {dfb})")
    if va == vb:
        return Check(text, INCONCLUSIVE, ev + ": equal", nums)
    if vb == 0 or va == 0:
        p_larger, p_smaller = (0.0, 1.0) if vb == 0 else (1.0, 0.0)
    else:
        f = va / vb
        p_larger, p_smaller = float(stats.f.sf(f, dfa, dfb)), float(stats.f.cdf(f, dfa, dfb))
    nums.update({"p larger": p_larger, "p smaller": p_smaller})
    if p_larger < ALPHA:
        return Check(text, SUPPORTED, ev + f": F-test p={p_larger:.3g}", nums)
    if p_smaller < ALPHA:
        return Check(text, CONTRADICTED, ev + f": smaller, F-test p={p_smaller:.3g}", nums)
    return Check(text, INCONCLUSIVE, ev + f": F-test p={p_larger:.3g}", nums)


def more_diverged(a_label: str, a_status: pd.Series, b_label: str, b_status: pd.Series, text: str) -> Check:
    """Claimed: a has a larger share of diverged runs than b (one-sided Fisher exact test)."""
    ad, an = int((a_status == "diverged").sum()), int(a_status.isin(["complete", "diverged"]).sum())
    bd, bn = int((b_status == "diverged").sum()), int(b_status.isin(["complete", "diverged"]).sum())
    nums = {f"{a_label} diverged": float(ad), f"{a_label} runs": float(an),
            f"{b_label} diverged": float(bd), f"{b_label} runs": float(bn)}
    ev = f"diverged runs: {a_label} {ad}/{an} vs {b_label} {bd}/{bn}"
    if an == 0 or bn == 0:
        return Check(text, NOT_MEASURED, ev, nums)
    table = [[ad, an - ad], [bd, bn - bd]]
    p_greater = float(stats.fisher_exact(table, alternative="greater")[1])
    p_less = float(stats.fisher_exact(table, alternative="less")[1])
    nums.update({"p greater": p_greater, "p less": p_less})
    if p_greater < ALPHA:
        return Check(text, SUPPORTED, ev + f": Fisher p={p_greater:.3g}", nums)
    if p_less < ALPHA:
        return Check(text, CONTRADICTED, ev + f": fewer, Fisher p={p_less:.3g}", nums)
    return Check(text, INCONCLUSIVE, ev + f": Fisher p={p_greater:.3g}", nums)


def none_diverged(label: str, status: pd.Series, text: str) -> Check:
    """Deterministic count: every finished run of `label` completed without diverging."""
    d, n = int((status == "diverged").sum()), int(status.isin(["complete", "diverged"]).sum())
    nums = {f"{label} diverged": float(d), f"{label} runs": float(n)}
    ev = f"{label}: {d} of {n} runs diverged"
    if n == 0:
        return Check(text, NOT_MEASURED, ev, nums)
    return Check(text, CONTRADICTED if d else SUPPORTED, ev, nums)


def any_of(text: str, checks: list[Check]) -> Check:
    """Disjunction: supported if one part is, contradicted only if every measured part is."""
    measured = [c for c in checks if c.verdict != NOT_MEASURED]
    ev = "; ".join(f"{c.text}: {c.verdict} ({c.evidence})" for c in checks)
    nums = {k: v for c in checks for k, v in c.numbers.items()}
    if not measured:
        v = NOT_MEASURED
    elif any(c.verdict == SUPPORTED for c in measured):
        v = SUPPORTED
    elif all(c.verdict == CONTRADICTED for c in measured):
        v = CONTRADICTED
    else:
        v = INCONCLUSIVE
    return Check(text, v, ev, nums)


def all_of(checks: list[Check]) -> str:
    """Conjunction rule for the checks of one claim in one scope."""
    verdicts = [c.verdict for c in checks]
    if all(v == NOT_MEASURED for v in verdicts):
        return NOT_MEASURED
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return INCONCLUSIVE


def across_scopes(verdicts: list[str]) -> str:
    vs = set(verdicts)
    if SUPPORTED in vs and CONTRADICTED in vs:
        return INCONCLUSIVE
    for v in (CONTRADICTED, SUPPORTED, INCONCLUSIVE):
        if v in vs:
            return v
    return NOT_MEASURED


# --------------------------------------------------------------------------- selecting rows


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def sampler_kind(row: pd.Series) -> str | None:
    """ddim / ancestral for a row: from its sampler options (the store keeps the dict a point was
    sampled with in column "sampler"), else from the evaluation's name (e.g. "steps_ddim")."""
    opts = row.get("sampler")
    if isinstance(opts, dict):
        v = opts.get("sampler")
        if isinstance(v, str) and v:
            return v.lower()
    name = str(row.get("eval") or "").lower()
    if "ddim" in name:
        return "ddim"
    if "ancestral" in name or "ddpm" in name:
        return "ancestral"
    return None


class Scope:
    """The rows of one suite + dataset + extractor, with the selections the claims need."""

    def __init__(self, name: str, df: pd.DataFrame):
        self.name = name
        self.df = df
        self.main = df[df["eval"] == "main"]
        self.ok = self.main[self.main["status"] == "complete"]

    def fam_rows(self, family: str, complete: bool = True) -> pd.DataFrame:
        d = self.ok if complete else self.main
        return d[d["family"] == family]

    def fam(self, family: str, metric: str, label: str | None = None) -> Sample:
        return _sample(self.fam_rows(family), metric, label or family)

    def card(self, card: str, metric: str) -> Sample:
        return _sample(self.ok[self.ok["card"] == card], metric, card)

    def role(self, role: str, metric: str) -> Sample:
        """The metric over the seeds of every card in `role` (ROLES), main evaluation, complete runs."""
        return _sample(self.ok[self.ok["role"] == role], metric, role)

    def groups(self, rows: pd.DataFrame, metric: str) -> list[np.ndarray]:
        """Per-card value arrays (seed-to-seed spread without the differences between cards)."""
        if metric not in rows:
            return []
        return [g[metric].map(_num).dropna().to_numpy() for _, g in rows.groupby("card")]

    def sweep(self, param: str, cards: tuple[str, ...] = (), kind: str | None = None,
              roles: tuple[str, ...] = ()) -> pd.DataFrame:
        """Complete sweep rows over `param`, with numeric sweep values when they are numbers."""
        d = self.df[(self.df["sweep_param"] == param) & (self.df["status"] == "complete")]
        d = at_run_n(d)   # a point sampled at another n is no FID of this scope
        if cards:
            d = d[d["card"].isin(cards)]
        if roles:
            d = d[d["role"].isin(roles)]
        if kind is not None and len(d):
            d = d[d.apply(sampler_kind, axis=1) == kind]
        return d

    def has(self, metric: str) -> bool:
        return metric in self.df.columns


def _sample(rows: pd.DataFrame, metric: str, label: str) -> Sample:
    if metric not in rows.columns:
        return Sample(label, np.array([]))
    return Sample(label, rows[metric].map(_num).dropna().to_numpy(dtype=float))


def _at(rows: pd.DataFrame, value, metric: str, label: str) -> Sample:
    """The metric over seeds at one sweep value."""
    return _sample(rows[rows["_v"] == value], metric, label)


def _with_values(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    rows["_v"] = rows["sweep_value"].map(_num)
    return rows[rows["_v"].notna()]


def _first_card(s: Scope, param: str, preferred: tuple[str, ...], kind: str | None = None,
                family: str | None = None) -> str | None:
    """The card a sweep claim reads: the first card in a role of `preferred` (ROLES) with that sweep,
    else any card (of `family`, when given) with it."""
    d = s.sweep(param, kind=kind)
    for role in preferred:
        cards = list(dict.fromkeys(d[d["role"] == role]["card"]))
        if cards:
            return cards[0]
    if family is not None:
        d = d[d["family"] == family]
    cards = list(dict.fromkeys(d["card"]))
    return cards[0] if cards else None


def _one_sweep(s: Scope, param: str, card: str, kind: str | None = None) -> pd.DataFrame:
    """Rows of one named sweep of `card` over `param` (two sweeps over the same parameter, e.g. steps
    with DDIM and with ancestral sampling, are never mixed), with numeric values in column _v."""
    rows = _with_values(s.sweep(param, (card,), kind))
    if rows.empty:
        return rows
    name = rows["eval"].value_counts().sort_index().idxmax()
    return rows[rows["eval"] == name]


def _endpoints(s: Scope, param: str, card: str | None, metric: str, a_higher: bool, text: str,
               kind: str | None = None) -> Check:
    """Claimed: metric at the largest sweep value is higher (a_higher) / lower than at the smallest."""
    if card is None:
        return Check(text, NOT_MEASURED, f"no {param} sweep", {})
    rows = _one_sweep(s, param, card, kind)
    vals = sorted(set(rows["_v"])) if len(rows) else []
    if len(vals) < 2 or metric not in rows or rows[metric].map(_num).isna().all():
        return Check(text, NOT_MEASURED, f"{card}: {param} sweep lacks two values with {metric}", {})
    hi = _at(rows, vals[-1], metric, f"{card} {param}={vals[-1]:g}")
    lo = _at(rows, vals[0], metric, f"{card} {param}={vals[0]:g}")
    return differ(hi, lo, metric, a_higher, text)


# --------------------------------------------------------------------------- the claims


def c1(s: Scope) -> list[Check]:
    others = s.ok[s.ok["family"] != "gan"]
    return [
        differ(s.fam("gan", "precision"), s.fam("vae", "precision"), "precision", True,
               "GAN precision higher than VAE"),
        any_of("GAN recall lower or fewer modes than diffusion", [
            differ(s.fam("gan", "recall"), s.fam("diffusion", "recall"), "recall", False,
                   "recall lower than diffusion"),
            differ(s.fam("gan", "modes_covered"), s.fam("diffusion", "modes_covered"), "modes_covered", False,
                   "fewer modes than diffusion")]),
        spread_larger("gan", s.groups(s.fam_rows("gan"), "fid"), "other families", s.groups(others, "fid"),
                      "fid", "GAN FID spreads more over seeds than the other families"),
        more_diverged("gan", s.fam_rows("gan", complete=False)["status"], "other families",
                      s.main[s.main["family"] != "gan"]["status"], "GANs diverge more often"),
    ]


def c2(s: Scope) -> list[Check]:
    return [
        any_of("VAE recall or mode coverage higher than GAN", [
            differ(s.fam("vae", "recall"), s.fam("gan", "recall"), "recall", True, "recall higher"),
            differ(s.fam("vae", "modes_covered"), s.fam("gan", "modes_covered"), "modes_covered", True,
                   "more modes")]),
        differ(s.fam("vae", "fid"), s.fam("gan", "fid"), "fid", True, "VAE FID worse (higher) than GAN"),
        differ(s.fam("vae", "precision"), s.fam("gan", "precision"), "precision", False,
               "VAE precision lower than GAN"),
    ]


def c3(s: Scope) -> list[Check]:
    card = _first_card(s, "codes", (), family="vqvae")
    if card is None:
        prior_check = Check("PixelCNN prior FID better than uniform codes", NOT_MEASURED, "no codes sweep", {})
    else:
        rows = s.sweep("codes", (card,))
        prior = _sample(rows[rows["sweep_value"].astype(str) == "prior"], "fid", f"{card} codes=prior")
        if prior.n == 0:  # the main evaluation samples from the prior
            prior = _sample(s.ok[s.ok["card"] == card], "fid", f"{card} main (prior)")
        uniform = _sample(rows[rows["sweep_value"].astype(str) == "uniform"], "fid", f"{card} codes=uniform")
        prior_check = differ(prior, uniform, "fid", False, "PixelCNN prior FID better than uniform codes")
    return [
        none_diverged("vqvae", s.fam_rows("vqvae", complete=False)["status"], "no VQ-VAE run diverged"),
        spread_larger("gan", s.groups(s.fam_rows("gan"), "fid"), "vqvae", s.groups(s.fam_rows("vqvae"), "fid"),
                      "fid", "VQ-VAE FID spreads less over seeds than GAN FID"),
        prior_check,
    ]


def _ms_per_img(rows: pd.DataFrame, label: str) -> Sample:
    if "ms_per_img" in rows and rows["ms_per_img"].notna().any():
        return _sample(rows, "ms_per_img", label)
    if "img_per_s" in rows:
        v = 1000.0 / rows["img_per_s"].map(_num)
        return Sample(label, v[np.isfinite(v)].to_numpy(dtype=float))
    return Sample(label, np.array([]))


def device_of(rows: pd.DataFrame) -> pd.Series:
    """The machine a row was timed on: the device's model (provenance device_model, e.g. "NVIDIA H200" or
    the CPU's name) where recorded, else the device string; "same device" compares these."""
    dev = rows["device"] if "device" in rows else pd.Series("unknown", index=rows.index)
    dev = dev.fillna("unknown").astype(str)
    if "prov_device_model" in rows:
        return rows["prov_device_model"].where(rows["prov_device_model"].notna(), dev).astype(str)
    return dev


def c4(s: Scope) -> list[Check]:
    checks = []
    # NFE: deterministic, every diffusion card against every other card
    text = "diffusion needs more network evaluations per image than every other family"
    if "nfe" in s.ok:
        per_card = s.ok.groupby("card").agg(nfe=("nfe", lambda x: x.map(_num).max()), family=("family", "first"))
        per_card = per_card[per_card["nfe"].notna()]
        dif, oth = per_card[per_card["family"] == "diffusion"], per_card[per_card["family"] != "diffusion"]
        if len(dif) and len(oth):
            fmt = lambda d: ", ".join(f"{c} {v:g}" for c, v in d["nfe"].items())  # noqa: E731
            ev = f"NFE diffusion ({fmt(dif)}) vs others ({fmt(oth)})"
            ok = dif["nfe"].min() > oth["nfe"].max()
            checks.append(Check(text, SUPPORTED if ok else CONTRADICTED, ev,
                                {"diffusion min nfe": float(dif["nfe"].min()), "others max nfe": float(oth["nfe"].max())}))
    if not checks:
        checks.append(Check(text, NOT_MEASURED, "NFE of diffusion or of other families missing", {}))
    # img/s, only on one device at a time
    speed_checks = []
    if "img_per_s" in s.ok:
        dev = device_of(s.ok)
        for d in sorted(set(dev)):
            rows = s.ok[dev == d]
            dif = _sample(rows[rows["family"] == "diffusion"], "img_per_s", f"diffusion@{d}")
            for fam in sorted(set(rows["family"].dropna()) - {"diffusion"}):
                speed_checks.append(differ(dif, _sample(rows[rows["family"] == fam], "img_per_s", f"{fam}@{d}"),
                                           "img_per_s", False, f"diffusion img/s below {fam} on {d}"))
    speed = [c for c in speed_checks if c.verdict != NOT_MEASURED]
    if speed:
        v = all_of(speed)
        checks.append(Check("diffusion has the lowest img/s on the same device", v,
                            "; ".join(f"{c.text}: {c.verdict} ({c.evidence})" for c in speed),
                            {k: x for c in speed for k, x in c.numbers.items()}))
    else:
        checks.append(Check("diffusion has the lowest img/s on the same device", NOT_MEASURED,
                            "img/s of diffusion and another family on one device missing", {}))
    checks.append(_ddpm_vs_gan(s))
    return checks


def _ddpm_vs_gan(s: Scope, factor: float = 100.0) -> Check:
    text = f"1000-step DDPM at least {factor:g}x slower per image than the GAN"
    d = s.df[s.df["status"] == "complete"]
    ddpm = d[(d["family"] == "diffusion") & (d["nfe"].map(_num) == 1000)] if "nfe" in d else d.iloc[0:0]
    # a seed's main row and its steps=1000 sweep row are one observation: one value per card and seed
    if len(ddpm) and "ms_per_img" in ddpm:
        ddpm = ddpm.assign(ms_per_img=ddpm["ms_per_img"].map(_num)).groupby(
            ["card", "seed"], as_index=False).agg({"ms_per_img": "mean", **{c: "first" for c in ddpm.columns
                                                                            if c not in ("card", "seed", "ms_per_img")}})
    gan = s.fam_rows("gan")
    dev = device_of
    common = sorted(set(dev(ddpm)) & set(dev(gan)))
    if not common:
        return Check(text, NOT_MEASURED, "no 1000-step DDPM and GAN timing on one device", {})
    dv = common[0]
    a, b = _ms_per_img(ddpm[dev(ddpm) == dv], f"ddpm@{dv}"), _ms_per_img(gan[dev(gan) == dv], f"gan@{dv}")
    nums = {**a.numbers("ddpm ms_per_img"), **b.numbers("gan ms_per_img")}
    if a.n == 0 or b.n == 0:
        return Check(text, NOT_MEASURED, "ms/img missing", nums)
    ratio = a.mean / b.mean if b.mean > 0 else math.inf
    nums["ratio"] = ratio
    ev = f"ms/img ddpm {a.fmt()} vs gan {b.fmt()} on {dv}: ratio {ratio:.3g}"
    if a.n < 2 or b.n < 2:
        return Check(text, INCONCLUSIVE, ev + ": fewer than 2 seeds", nums)
    lo, hi = log_ratio_interval(a.values, b.values)
    nums["ratio ci_lo"], nums["ratio ci_hi"] = lo, hi
    ev += f" (95% interval of the ratio {lo:.3g} to {hi:.3g})"
    if lo >= factor:
        return Check(text, SUPPORTED, ev, nums)
    if hi < factor:
        return Check(text, CONTRADICTED, ev, nums)
    return Check(text, INCONCLUSIVE, ev, nums)


def log_ratio_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """95% Welch interval of the ratio of the geometric means of two sets of positive times.

    A time per image varies by factors (load, clocks), not by amounts, and cannot be negative: an
    arithmetic t-interval of three timings can reach below zero and make any ratio "inconclusive".
    On log time the spread is additive, so the interval of log(a) - log(b) is the test, and its
    ends, exponentiated, bound the ratio."""
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    if not (np.isfinite(la).all() and np.isfinite(lb).all()):
        return (math.nan, math.nan)
    va, vb = la.var(ddof=1) / len(la), lb.var(ddof=1) / len(lb)
    d = la.mean() - lb.mean()
    se = math.sqrt(va + vb)
    if se == 0:
        return (math.exp(d), math.exp(d))
    df = (va + vb) ** 2 / (va ** 2 / (len(la) - 1) + vb ** 2 / (len(lb) - 1))
    h = stats.t.ppf(0.975, df) * se
    return (math.exp(d - h), math.exp(d + h))


def c5(s: Scope) -> list[Check]:
    return [
        none_diverged("ddpm", s.main[s.main["role"] == "ddpm"]["status"], "no DDPM run diverged"),
        no_worse(s.role("ddpm", "fid"), s.role("iddpm", "fid"), "fid", False, 0.10,
                 "DDPM (fixed variance) FID no worse than iDDPM (learned variance), 10% margin"),
    ]


def _step_loss(rows: pd.DataFrame, role: str, lo: float, hi: float) -> Sample:
    """Per card and seed of `role`: FID at `lo` steps minus FID at `hi` steps (the quality lost by
    sampling faster)."""
    rows = rows[rows["role"] == role]
    a = rows[rows["_v"] == lo].groupby(["card", "seed"])["fid"].mean()
    b = rows[rows["_v"] == hi].groupby(["card", "seed"])["fid"].mean()
    loss = (a - b).dropna()
    return Sample(f"{role} FID({lo:g})-FID({hi:g})", loss.to_numpy(dtype=float))


def c6(s: Scope) -> list[Check]:
    text = "learned variance (iDDPM) loses less FID than fixed (DDPM) as steps drop"
    step_check = Check(text, NOT_MEASURED, "no steps sweep with FID shared by ddpm and iddpm", {})
    rows = _with_values(s.sweep("steps", roles=("ddpm", "iddpm")))
    if len(rows) and "fid" in rows:
        # one named sweep at a time, ancestral sampling first (the setting of the iDDPM paper)
        kind = {e: sampler_kind(g.iloc[0]) for e, g in rows.groupby("eval")}
        names = sorted(kind, key=lambda e: (kind[e] != "ancestral", e))
        for name in names:
            r = rows[rows["eval"] == name]
            common = sorted(set(r[r["role"] == "ddpm"]["_v"]) & set(r[r["role"] == "iddpm"]["_v"]))
            if len(common) >= 2:
                lo, hi = common[0], common[-1]
                step_check = differ(_step_loss(r, "iddpm", lo, hi), _step_loss(r, "ddpm", lo, hi),
                                    f"fid loss ({name})", False, text)
                break
    return [
        step_check,
        differ(s.role("iddpm", "nll_bpd"), s.role("ddpm", "nll_bpd"), "nll_bpd", False,
               "cosine schedule (iddpm card) beats linear (ddpm card) in bits/dim"),
    ]


def _near(vals: list[float], target: float, lo: float, hi: float) -> float | None:
    ok = [v for v in vals if lo <= v <= hi]
    return min(ok, key=lambda v: abs(v - target)) if ok else None


def c7(s: Scope) -> list[Check]:
    cg = _first_card(s, "classifier_scale", ("adm-cg",), family="diffusion")
    guide = [
        any_of("classifier guidance raises precision or IS as the scale grows", [
            _endpoints(s, "classifier_scale", cg, "precision", True, "precision rises"),
            _endpoints(s, "classifier_scale", cg, "is_mean", True, "IS rises")]),
        _endpoints(s, "classifier_scale", cg, "recall", False, "classifier guidance lowers recall as the scale grows"),
    ]
    text = "~25 DDIM steps stay within 25% of the FID at ~250 steps"
    step_check = Check(text, NOT_MEASURED, "no DDIM steps sweep with ~25 and ~250 steps", {})
    card = _first_card(s, "steps", ("adm", "adm-cg", "adm-cfg"), kind="ddim")
    if card is not None and (s.df[s.df["card"] == card]["role"].isin(("adm", "adm-cg", "adm-cfg"))).any():
        rows = _one_sweep(s, "steps", card, "ddim")
        vals = sorted(set(rows["_v"]))
        few, many = _near(vals, 25, 10, 50), _near(vals, 250, 200, 1000)
        if few is not None and many is not None:
            step_check = no_worse(_at(rows, few, "fid", f"{card} {few:g} steps"),
                                  _at(rows, many, "fid", f"{card} {many:g} steps"), "fid", False, 0.25, text)
    return [differ(s.role("adm", "fid"), s.role("ddpm", "fid"), "fid", False,
                   "ADM network FID better than DDPM network at the suite's equal budget"), *guide, step_check]


def _u_shape(s: Scope, card: str | None) -> Check:
    text = "FID is U-shaped in w with its minimum at a small w"
    if card is None:
        return Check(text, NOT_MEASURED, "no guidance sweep", {})
    rows = _one_sweep(s, "guidance", card)
    ws = sorted(set(rows["_v"])) if len(rows) else []
    if len(ws) < 3 or "fid" not in rows:
        return Check(text, NOT_MEASURED, f"{card}: guidance sweep has fewer than 3 values with FID", {})
    samples = [_at(rows, w, "fid", f"w={w:g}") for w in ws]
    nums = {k: v for sm in samples for k, v in sm.numbers(f"fid {sm.label}").items()}
    ev = f"{card} FID over w: " + ", ".join(f"{sm.label}: {sm.fmt()}" for sm in samples)
    if any(sm.n < 2 for sm in samples):
        return Check(text, INCONCLUSIVE, ev + ": fewer than 2 seeds at some w", nums)
    best = int(np.argmin([sm.mean for sm in samples]))
    below = lambda a, b: a.ci[1] < b.ci[0]  # noqa: E731  (a's interval entirely below b's)
    if 0 < best < len(ws) - 1:
        if below(samples[best], samples[0]) and below(samples[best], samples[-1]):
            small = ws[best] <= (ws[0] + ws[-1]) / 2
            return Check(text, SUPPORTED if small else CONTRADICTED,
                         ev + f": interior minimum at w={ws[best]:g}" + ("" if small else ", in the upper half"), nums)
        return Check(text, INCONCLUSIVE, ev + f": minimum at w={ws[best]:g} overlaps an end", nums)
    if all(below(samples[best], sm) for i, sm in enumerate(samples) if 0 < i < len(ws) - 1):
        return Check(text, CONTRADICTED, ev + f": minimum at the end w={ws[best]:g}, below every inner w", nums)
    return Check(text, INCONCLUSIVE, ev + f": minimum at the end w={ws[best]:g}, intervals overlap", nums)


def _nfe_doubles(s: Scope, card: str | None) -> Check:
    text = "guidance doubles the NFE"
    in_role = s.ok[s.ok["role"] == "adm-cfg"]["card"]
    cfg = card or (in_role.iloc[0] if len(in_role) else None)
    if cfg is None or "nfe" not in s.df:
        return Check(text, NOT_MEASURED, "no classifier-free guided card with NFE", {})
    nfe_cfg = s.ok[s.ok["card"] == cfg]["nfe"].map(_num).dropna()
    nfe_adm = s.ok[s.ok["role"] == "adm"]["nfe"].map(_num).dropna()
    if len(nfe_cfg) and len(nfe_adm):
        r = nfe_cfg.max() / nfe_adm.max()
        nums = {f"{cfg} nfe": float(nfe_cfg.max()), "adm nfe": float(nfe_adm.max()), "ratio": float(r)}
        ev = f"NFE {cfg} {nfe_cfg.max():g} vs adm {nfe_adm.max():g}: ratio {r:g}"
        v = SUPPORTED if r == 2 else CONTRADICTED if r == 1 else INCONCLUSIVE
        return Check(text, v, ev + ("" if v != INCONCLUSIVE else " (different step counts?)"), nums)
    rows = _one_sweep(s, "guidance", cfg)
    if "nfe" in rows:
        n0 = rows[rows["_v"] == 0]["nfe"].map(_num).dropna()
        n1 = rows[rows["_v"] > 0]["nfe"].map(_num).dropna()
        if len(n0) and len(n1):
            r = n1.max() / n0.max()
            ev = f"NFE at w>0 {n1.max():g} vs w=0 {n0.max():g}: ratio {r:g}"
            why = "" if r == 2 else " (w=0 costs as much as w>0 here; an adm run would settle it)"
            return Check(text, SUPPORTED if r == 2 else INCONCLUSIVE, ev + why, {"ratio": float(r)})
    return Check(text, NOT_MEASURED, f"NFE of {cfg} and of adm (or of w=0) missing", {})


def c8(s: Scope) -> list[Check]:
    card = _first_card(s, "guidance", ("adm-cfg",), family="diffusion")
    return [
        _endpoints(s, "guidance", card, "is_mean", True, "IS rises with w"),
        _u_shape(s, card),
        _endpoints(s, "guidance", card, "recall", False, "recall falls with w"),
        _nfe_doubles(s, card),
    ]


ClaimFn = Callable[[Scope], list[Check]]
CLAIMS: dict[str, tuple[str, ClaimFn]] = {
    "C1": ("GANs: higher precision than the VAE, lower recall / fewer modes than diffusion, larger spread "
           "over seeds, more diverged runs", c1),
    "C2": ("VAEs: higher recall or mode coverage than GANs, worse FID and precision", c2),
    "C3": ("VQ-VAE: stable over seeds (no divergence, small spread); the PixelCNN prior gives far better "
           "quality than uniform codes", c3),
    "C4": ("Diffusion sampling is the slowest (img/s and NFE against every other family on the same "
           "device); 1000-step DDPM at least 100x slower per image than the GAN", c4),
    "C5": ("DDPM: epsilon-prediction with fixed variance trains stably and samples well (against learned "
           "variance where both ran)", c5),
    "C6": ("Improved DDPM: learned variance loses less quality as steps drop; cosine beats linear in bits/dim", c6),
    "C7": ("ADM: the ADM network beats the DDPM network at equal budget; classifier guidance raises "
           "precision/IS and lowers recall as the scale grows; ~25 DDIM steps stay close to 250", c7),
    "C8": ("Classifier-free guidance: IS rises with w, FID is U-shaped with its minimum at small w, recall "
           "falls, NFE doubles", c8),
}


# --------------------------------------------------------------------------- entry point


def role_of(row: pd.Series) -> str | None:
    """The ROLES entry a row's family and traits match (None for none)."""
    for role, want in ROLES.items():
        if all(str(row.get("family" if k == "family" else f"trait_{k}")) == v for k, v in want.items()):
            return role
    return None


def _fill_legacy_traits(df: pd.DataFrame) -> pd.DataFrame:
    """Runs recorded before cards declared traits (no trait_* values): their traits from the shipped card
    of the same name, where one exists, so old trees keep their verdicts."""
    from genbench import config
    from genbench.errors import UserError

    trait_cols = [c for c in df.columns if c.startswith("trait_")]
    bare = df[trait_cols].isna().all(axis=1) if trait_cols else pd.Series(True, index=df.index)
    for card in sorted(set(df.loc[bare, "card"].dropna().astype(str))):
        try:
            traits = config._read_yaml(config.shipped_dir("models") / f"{card}.yaml").get("traits") or {}
        except UserError:
            continue
        sel = bare & (df["card"] == card)
        for k, v in traits.items():
            if f"trait_{k}" not in df.columns:
                df[f"trait_{k}"] = pd.Series(dtype=object)
            df.loc[sel, f"trait_{k}"] = v
    return df


def normalize(df: pd.DataFrame | None) -> pd.DataFrame:
    """The columns the claims read, present whatever the tree held, and each row's role (ROLES) from its
    family and traits (old runs without traits take them from the shipped card of their name)."""
    df = pd.DataFrame() if df is None else df.copy()
    for c in ("suite", "dataset", "card", "family", "seed", "status", "eval", "sweep_param", "sweep_value",
              "prov_extractor"):
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    df = _fill_legacy_traits(df)
    df["role"] = [role_of(r) for _, r in df.iterrows()] if len(df) else pd.Series(dtype=object)
    df["eval"] = df["eval"].fillna("main")
    return df


# What makes two numbers comparable in a claim: the same feature space (extractor name and weights
# hash: a retrained classifier is another space) and the same number of samples (FID depends on n).
SCOPE_KEYS = (("prov_extractor", "{}"), ("prov_extractor_sha256", "weights {:.8}"), ("run_n_fake", "n_fake={}"))


def scopes(df: pd.DataFrame) -> list[Scope]:
    """One scope per suite + dataset, split further wherever its rows differ in extractor, extractor
    weights or n_fake; the scope's name says which."""
    out = []
    for (suite, dataset), g in df.groupby(["suite", "dataset"], dropna=False, sort=True):
        keys = [(c, fmt) for c, fmt in SCOPE_KEYS if c in g and g[c].nunique(dropna=True) > 1]
        if not keys:
            out.append(Scope(f"{suite}/{dataset}", g))
            continue
        cols = [c for c, _ in keys]
        for vals, h in g.groupby([g[c].astype(str).where(g[c].notna(), "none") for c in cols], sort=True):
            vals = vals if isinstance(vals, tuple) else (vals,)
            tag = ", ".join(fmt.format(_fmt_num(v)) for (c, fmt), v in zip(keys, vals))
            out.append(Scope(f"{suite}/{dataset} [{tag}]", h))
    return out


def _fmt_num(v: str) -> str:
    try:
        f = float(v)
        return str(int(f)) if f.is_integer() else v
    except ValueError:
        return v


def evaluate_claims(df: pd.DataFrame | None) -> list[ClaimVerdict]:
    """Every claim C1-C8, one verdict each, with per-scope checks, the numbers and the published anchor."""
    df = normalize(df)
    sc = scopes(df)
    out = []
    for cid, (title, fn) in CLAIMS.items():
        per_scope = []
        for s in sc:
            checks = tuple(fn(s))
            per_scope.append(ScopeVerdict(s.name, all_of(list(checks)), checks))
        measured = [p for p in per_scope if p.verdict != NOT_MEASURED]
        verdict = across_scopes([p.verdict for p in per_scope])
        if measured:
            evidence = " || ".join(
                f"[{p.scope}] {p.verdict}: " + "; ".join(f"{c.text}: {c.verdict} ({c.evidence})" for c in p.checks)
                for p in measured)
        else:
            evidence = "the runs this claim needs are missing" + (f" in {len(sc)} scope(s)" if sc else " (no runs)")
        numbers = {f"{p.scope} | {k}": v for p in measured for c in p.checks for k, v in c.numbers.items()}
        out.append(ClaimVerdict(cid, title, verdict, evidence, numbers, anchor_text(cid), tuple(per_scope)))
    return out
