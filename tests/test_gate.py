"""The CI gate on the committed smoke baseline (results/baselines/smoke.json, many seeds): equivalent runs
(other seeds) pass, real regressions (a quartered training budget, a sampler with its steps cut) fail.

The fast tests use measured numbers only: the baseline's own per-seed values and the committed summary of
a quarter-budget smoke run (results/baselines/smoke-quarter-budget.json, made by the command in
results/baselines/README.md). The slow ones train the regressions for real."""
from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genbench import compare as cmp

BASELINES = Path(__file__).resolve().parent.parent / "results" / "baselines"
BASELINE = BASELINES / "smoke.json"
QUARTER = BASELINES / "smoke-quarter-budget.json"


def _subset(summary: dict, keep) -> dict:
    """The summary of only the seeds in `keep` (recomputed from the stored per-seed values)."""
    out = copy.deepcopy(summary)
    entries = []
    for e in out["entries"]:
        pairs = [(s, v) for s, v in zip(e["seeds"], e["values"]) if s in keep]
        if not pairs:
            continue
        v = np.array([x for _, x in pairs])
        e.update(n=len(v), mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else None,
                 values=v.tolist(), seeds=[s for s, _ in pairs])
        entries.append(e)
    out["entries"] = entries
    for r in out["runs"]:
        r["n_runs"] = r["n_complete"] = len(keep)
    return out


@pytest.fixture(scope="module")
def baseline() -> dict:
    b = cmp.load_summary(BASELINE)
    assert b["version"] == 2 and min(e["n"] for e in b["entries"]) >= 10, "the baseline holds many seeds"
    return b


def test_held_out_seeds_pass(baseline):
    """Leave three seeds out and gate them against a baseline of the rest: an equivalent run from other
    seeds, as CI runs three. The gate's nominal false-alarm rate is 1% for the whole tree (under
    normality); over a spread of 120 of the 560 triples of the 16 seeds at most 2% may fail
    (measured: none of 200 triples; with two held-out seeds 1 of all 120 pairs)."""
    seeds = sorted(next(e for e in baseline["entries"] if e["eval"] == "main")["seeds"])
    triples = list(itertools.combinations(seeds, 3))[::4][:120]
    failing = 0
    for held in triples:
        rest = [s for s in seeds if s not in held]
        failing += cmp.gate(_subset(baseline, rest), _subset(baseline, held))[1] > 0
    assert len(triples) == 120
    assert failing / len(triples) <= 0.02, failing


def test_one_chaotic_seed_of_three_does_not_fail_the_committed_baseline(baseline):
    """Seed 16 of the smoke suite trains a VQ-VAE 4 standard deviations worse than the baseline's 16 seeds
    (FD 27.9, KID 0.41): with seeds 16 and 17 alone the mean gate failed on KID; with the median of three
    it passes, as an unchanged tree must. The values are measured ones, committed as
    results/baselines/smoke-seeds16-18.json (seeds 16 and 17 from a CI run, 18 from the same code)."""
    extra = cmp.load_summary(BASELINES / "smoke-seeds16-18.json")
    assert sorted(next(e for e in extra["entries"] if e["eval"] == "main")["seeds"]) == [16, 17, 18]
    assert cmp.gate(baseline, extra)[1] == 0
    kid = next(e for e in extra["entries"] if e["card"] == "vqvae-pixelcnn" and e["eval"] == "main"
               and e["metric"] == "kid_mean")
    assert max(kid["values"]) > 0.4                  # the chaotic seed is in there


def test_a_quartered_training_budget_fails(baseline):
    quarter = cmp.load_summary(QUARTER)
    rows, n = cmp.gate(baseline, quarter)
    failed = {(r["card"], r["metric"]) for r in rows if r["status"] == "REGRESSION"}
    assert n >= 3, failed
    assert ("ddpm", "fid") in failed           # the clearest signal of an undertrained model


def test_a_sampler_with_its_steps_cut_fails(baseline):
    """ddpm's main point samples DDIM 20 steps; its stored steps=5 sweep point (same model, same seeds) is
    exactly what a run with the sampler cut to 5 steps gives. Put it in the main point's place."""
    current = copy.deepcopy(baseline)
    five = {e["metric"]: e for e in baseline["entries"] if e["card"] == "ddpm" and e.get("sweep_value") == 5}
    assert five, "the baseline has ddpm's steps=5 point"
    entries = []
    for e in current["entries"]:
        if e["card"] == "ddpm" and e["eval"] == "main" and e["metric"] in five:
            e = {**five[e["metric"]], "eval": "main", "sweep_param": None, "sweep_value": None}
        entries.append(e)
    current["entries"] = entries
    current = _subset(current, set(sorted(five["fid"]["seeds"])[:3]))
    rows, n = cmp.gate(baseline, current)
    failed = {(r["card"], r["metric"], r["status"]) for r in rows if r["status"].startswith("REGRESSION")}
    assert ("ddpm", "fid", "REGRESSION") in failed and ("ddpm", "nfe", "REGRESSION: changed") in failed


def test_unstable_metrics_are_reported_not_gated(baseline):
    rows, _ = cmp.gate(baseline, _subset(baseline, {0, 1, 2}))
    unstable = {(r["card"], r["metric"]) for r in rows if r["status"].startswith("unstable")}
    gated = {(r["card"], r["metric"]) for r in rows if r["status"] in ("ok", "better")}
    assert unstable and gated
    assert ("ddpm", "fid") in gated


def _genbench(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "genbench", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_real_quarter_budget_run_fails_the_gate(tmp_path):
    r = _genbench("run", "--suite", "smoke", "--seeds", 3, "--first-seed", 16, "--jobs", 2, "--budget-kimg", 1.5,
                  "--results-dir", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr
    c = _genbench("compare", BASELINE, tmp_path)
    assert c.returncode == 1, c.stdout
    assert "| smoke | digits | ddpm | main | fid |" in c.stdout


@pytest.mark.slow
def test_a_real_run_with_its_steps_cut_fails_the_gate(tmp_path):
    import yaml

    from genbench.config import shipped_dir

    s = yaml.safe_load((shipped_dir("suites") / "smoke.yaml").read_text())
    s["overrides"]["ddpm"]["sampler"]["steps"] = 5
    s["cards"], s["sweeps"] = ["ddpm"], []
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(s))
    r = _genbench("run", "--suite", tmp_path / "smoke.yaml", "--seeds", 3, "--first-seed", 16, "--jobs", 2,
                  "--results-dir", tmp_path / "r", "--no-progress")
    assert r.returncode == 0, r.stderr
    c = _genbench("compare", BASELINE, tmp_path / "r")
    assert c.returncode == 1
    fid = next(l for l in c.stdout.splitlines() if "| ddpm | main | fid |" in l)
    assert "REGRESSION" in fid, fid
