"""The verdicts the README states for the reference set, kept in one place (verdicts.json beside this
file), and the check that the committed tree still gives them.

    python results/reference/verdicts.py --check    # recompute from results/reference; exit 1 on a difference
    python results/reference/verdicts.py --write    # record the tree's verdicts and key numbers in verdicts.json
    python results/reference/verdicts.py --table    # print the README's "Claims on real data" table

verdicts.json holds, per claim: the overall verdict, the verdict of every scope that measured it
(suite/dataset), and its key numbers (means with 95% t-intervals over seeds, as the claims engine
computes them; formatted here). The README table is rendered from verdicts.json by `--table`, and
tests/test_reference_claims.py checks all three against each other: evaluate_claims(load_results(
results/reference)) == verdicts.json, and the README table == the table rendered from it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERDICTS_FILE = HERE / "verdicts.json"
README_HEADING = "## Claims on real data"

# Short names of the published anchors printed beside each claim in the README table (the full text
# is genbench/anchors.py, printed in the report).
ANCHOR_SHORT = {
    "C1": "PacGAN Table 1: GAN 6.3/8 ring, 17.3/25 grid modes; stacked MNIST DCGAN 99/1000 modes; "
          "ADM Table 5: BigGAN-deep recall 0.28 vs ADM 0.63",
    "C2": "PacGAN Table 1 (GAN modes as in C1)",
    "C3": "none (a property of this benchmark's runs)",
    "C4": "DDIM Table 1: S=10 FID 13.36 ... S=1000 4.04 (1000 network passes per image)",
    "C5": "DDPM Tables 1-2: FID 3.17, fixed variance + L_simple best, learned variance unstable",
    "C6": "iDDPM Sec. 3-4: learned variances keep FID at 50-100 steps; cosine improves NLL",
    "C7": "ADM Tables 1-5: architecture lowers FID; scale 1.0: precision 0.69 -> 0.82, recall 0.63 -> 0.52; "
          "25 DDIM steps FID 5.44 vs 4.59 at 250",
    "C8": "CFG Table 1: IS rises with w, FID lowest at small w; 2 passes per step",
}


def _g(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3g}"


def _interval(nums: dict, prefix: str) -> str:
    m = nums.get(f"{prefix} mean")
    lo, hi, n = nums.get(f"{prefix} ci_lo"), nums.get(f"{prefix} ci_hi"), nums.get(f"{prefix} n")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return f"{prefix}: no runs"
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{prefix} {_g(m)} (n={int(n or 0)})"
    return f"{prefix} {_g(m)} [{_g(lo)}, {_g(hi)}] (n={int(n)})"


def check_numbers(check) -> str:
    """A check's numbers in one short line: every `X mean` with its interval, then the test's figures."""
    nums = check.numbers
    prefixes = list(dict.fromkeys(k[: -len(" mean")] for k in nums if k.endswith(" mean")))
    parts = [_interval(nums, p) for p in prefixes]
    used = {f"{p} {s}" for p in prefixes for s in ("mean", "ci_lo", "ci_hi", "n")}
    rest = [k for k in nums if k not in used]
    if "shortfall" in nums:
        parts.append(f"shortfall {_g(nums['shortfall'])} [{_g(nums['shortfall ci_lo'])}, "
                     f"{_g(nums['shortfall ci_hi'])}] vs margin {_g(nums['margin'])}")
    std_keys = [k for k in rest if k.endswith(" seed std")]
    for k in std_keys:
        label = k[: -len(" seed std")].rsplit(" ", 1)[0]      # "<label> <metric> seed std" -> "<label>"
        df = nums.get(f"{label} df")
        parts.append(f"{k} {_g(nums[k])}" + (f" (df {int(df)})" if df is not None and not math.isnan(df) else ""))
    div = [k for k in rest if k.endswith(" diverged")]
    for k in div:
        who = k[: -len(" diverged")]
        runs = nums.get(f"{who} runs")
        parts.append(f"{who} {int(nums[k])}/{int(runs) if runs is not None else '?'} diverged")
    for k, label in (("p larger", "F-test p"), ("p greater", "Fisher p"), ("ratio", "ratio"),
                     ("diffusion min nfe", "diffusion min NFE"), ("others max nfe", "others max NFE")):
        if k in nums:
            ci = (f" [{_g(nums[k + ' ci_lo'])}, {_g(nums[k + ' ci_hi'])}]" if f"{k} ci_lo" in nums else "")
            parts.append(f"{label} {_g(nums[k])}{ci}")
    return "; ".join(parts)


def summarize(results_dir: Path) -> dict:
    """{claim id: {verdict, title, scopes: {scope: verdict}, key: [...]}} of the tree."""
    from genbench.claims import NOT_MEASURED, evaluate_claims
    from genbench.store import load_results

    out = {}
    for v in evaluate_claims(load_results(results_dir)):
        scopes = {s.scope: s.verdict for s in v.scopes if s.verdict != NOT_MEASURED}
        key = []
        for s in v.scopes:
            if s.verdict == NOT_MEASURED:
                continue
            for c in s.checks:
                if c.verdict == NOT_MEASURED:
                    continue
                key.append({"scope": s.scope, "check": c.text, "verdict": c.verdict, "numbers": check_numbers(c)})
        out[v.id] = {"verdict": v.verdict, "title": v.title, "scopes": scopes, "key": key,
                     "anchor": ANCHOR_SHORT.get(v.id, "")}
    return out


def load_expected(path: Path = VERDICTS_FILE) -> dict:
    return json.loads(Path(path).read_text())


def differences(expected: dict, got: dict) -> list[str]:
    """Lines naming every claim, scope or key number where `got` differs from `expected`."""
    out = []
    exp = expected.get("claims", expected)
    for cid in sorted(set(exp) | set(got)):
        e, g = exp.get(cid), got.get(cid)
        if e is None or g is None:
            out.append(f"{cid}: {'missing from verdicts.json' if e is None else 'not computed'}")
            continue
        if e["verdict"] != g["verdict"]:
            out.append(f"{cid}: verdict {g['verdict']!r}, verdicts.json says {e['verdict']!r}")
        if e["scopes"] != g["scopes"]:
            out.append(f"{cid}: scope verdicts {g['scopes']}, verdicts.json says {e['scopes']}")
        if e["key"] != g["key"]:
            for a, b in zip(e["key"], g["key"]):
                if a != b:
                    out.append(f"{cid}: [{b['scope']}] {b['check']}: {b['verdict']} ({b['numbers']}); "
                               f"verdicts.json: {a['verdict']} ({a['numbers']})")
            if len(e["key"]) != len(g["key"]):
                out.append(f"{cid}: {len(g['key'])} measured checks, verdicts.json has {len(e['key'])}")
    return out


def _scope_short(scope: str) -> str:
    """claims-digits/digits -> digits; claims-mixtures/ring8 -> ring8 (extractor / n tags kept)."""
    suite, _, rest = scope.partition("/")
    return rest or suite


def readme_table(expected: dict) -> str:
    """The README's table, one row per claim, from verdicts.json."""
    claims = expected.get("claims", expected)
    lines = ["| claim | verdict | per dataset | key numbers (mean [95% t-interval] (n seeds)) | published anchor |",
             "|---|---|---|---|---|"]
    for cid in sorted(claims):
        c = claims[cid]
        per = ", ".join(f"{_scope_short(s)}: {v}" for s, v in c["scopes"].items()) or "–"
        key = " · ".join(f"{_scope_short(k['scope'])}: {k['check']} — {k['verdict']}: {k['numbers']}"
                         for k in c.get("readme_key", c["key"]))
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {cid}: {cell(c['title'])} | **{c['verdict']}** | {cell(per)} | {cell(key)} | "
                     f"{cell(c['anchor'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    if (a.write or a.check) and not any(Path(a.results_dir).rglob("metrics.json")):
        print(f"verdicts.py: no run records under {a.results_dir}", file=sys.stderr)
        return 2
    if a.write:
        got = summarize(a.results_dir)
        old = load_expected() if VERDICTS_FILE.is_file() else {}
        for cid, c in got.items():   # keep the README's choice of key checks where it still applies
            pick = (old.get("claims", {}).get(cid) or {}).get("readme_checks")
            if pick:
                c["readme_checks"] = pick
        doc = {"results_dir": "results/reference",
               "how": "python results/reference/verdicts.py --write (after results/reference/regenerate.sh)",
               "claims": got}
        _apply_readme_checks(doc)
        VERDICTS_FILE.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {VERDICTS_FILE}")
    if a.check:
        if not VERDICTS_FILE.is_file():
            print(f"{VERDICTS_FILE} is missing; write it with --write", file=sys.stderr)
            return 1
        exp = load_expected()
        got = summarize(a.results_dir)
        diff = differences(exp, got)
        for line in diff:
            print(line)
        if diff:
            return 1
        print("verdicts.json matches the tree: " + ", ".join(f"{k} {v['verdict']}" for k, v in sorted(got.items())))
    if a.table:
        print(readme_table(load_expected()))
    return 0


def _apply_readme_checks(doc: dict) -> None:
    """readme_key: the key checks the README table shows (readme_checks: their check texts, in order,
    as "scope | check"; all measured checks when not set)."""
    for c in doc["claims"].values():
        pick = c.get("readme_checks")
        if pick:
            by = {f"{k['scope']} | {k['check']}": k for k in c["key"]}
            c["readme_key"] = [by[p] for p in pick if p in by]
        else:
            c.pop("readme_key", None)


if __name__ == "__main__":
    sys.exit(main())
