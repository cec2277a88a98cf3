"""The CI gate: exit 0 against itself, 1 on a regression, 2 on unusable input; tolerances, directions,
ungated speed metrics, exact NFE, and summary files standing in for trees."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import pytest

from genbench import compare as cmp
from results_fixtures import write_run


def tree(root: Path, *, fid=(10.0, 10.2, 9.8), precision=0.8, nfe=1, img_per_s=1000.0, status=None,
         extractor="digits-classifier", sweep_fid=None, cards=("dcgan", "vae"), suite="gate-test",
         tolerances=None, modes=10) -> Path:
    """A small tree: every card with one seed per entry of `fid` (FID shifted by card). The suite name
    resolves to no suite file: the gate reads only the tree (and the floors its records hold)."""
    for k, card in enumerate(cards):
        for seed, f in enumerate(fid):
            sweeps = []
            if sweep_fid is not None:
                sweeps = [{"name": "steps", "param": "steps", "value": v, "sampler": {"steps": v},
                           "metrics": {"fid": sweep_fid + v / 100}, "sampling": {"nfe": v}} for v in (10, 100)]
            write_run(root, card, seed, suite=suite, status=(status or {}).get((card, seed), "complete"),
                      metrics={"fid": f + 10 * k, "precision": precision, "modes_covered": modes, "is_std": 0.3},
                      sampling={"nfe": nfe, "img_per_s": img_per_s}, sweeps=sweeps, samples=False,
                      extractor=extractor, tolerances=tolerances)
    return root


def test_tree_against_itself_passes(tmp_path):
    t = tree(tmp_path / "t", sweep_fid=5.0)
    r = cmp.compare(t, t)
    assert r.exit_code == 0, r.markdown
    assert "**No regression**" in r.markdown
    assert "| gate-test | digits | dcgan | main | fid | ↓ |" in r.markdown
    assert "steps (steps=10)" in r.markdown          # sweep points compared too
    assert "is_std" not in r.markdown                 # no direction: not a gated quality


def test_baseline_made_better_fails(tmp_path):
    base = tree(tmp_path / "base", fid=(5.0, 5.2, 4.8))   # lower FID is better
    cur = tree(tmp_path / "cur")
    r = cmp.compare(base, cur)
    assert r.exit_code == 1
    line = next(l for l in r.markdown.splitlines() if "| dcgan | main | fid |" in l)
    assert "REGRESSION" in line and "+5" in line and "t-band n=3, m=3" in line
    # the other way round the current is better: no regression
    r2 = cmp.compare(cur, base)
    assert r2.exit_code == 0 and "better" in r2.markdown


def test_band_is_the_t_prediction_bound_with_bonferroni():
    from scipy import stats

    b = cmp.band(2.0, 10, 2, 0.001)
    assert b == pytest.approx(stats.t.ppf(0.999, 9) * 2.0 * (cmp.median_variance(10) + 1 / 2) ** 0.5)
    assert cmp.band(2.0, 10, 1, 0.001) > b > cmp.band(2.0, 40, 2, 0.001)   # more seeds: tighter


def test_median_variance_is_that_of_normal_samples():
    """v(m), the variance of the median of m standard normals: exact 1 and 1/2 for m = 1, 2, close to
    pi/(2m) for large m, and equal to a Monte Carlo estimate for small m (odd and even)."""
    import numpy as np

    assert cmp.median_variance(1) == pytest.approx(1.0, rel=1e-6)
    assert cmp.median_variance(2) == pytest.approx(0.5, rel=1e-6)
    assert cmp.median_variance(401) == pytest.approx(np.pi / 802, rel=1e-9)
    x = np.random.default_rng(0).standard_normal((200_000, 9))
    for m in (3, 4, 5, 8):
        mc = np.median(x[:, :m], axis=1).var()
        assert cmp.median_variance(m) == pytest.approx(mc, rel=0.02), m
    assert cmp.median_variance(99) == pytest.approx(np.pi / (2 * 99), rel=0.03)


def test_one_chaotic_seed_of_three_cannot_fail_the_gate():
    base = {"entries": [{"suite": "s", "dataset": "d", "card": "c", "eval": "main", "metric": "fid", "n": 16,
                         "mean": 20.0, "std": 2.0, "values": [20.0 + 2.0 * z for z in
                                                               np.linspace(-1.7, 1.7, 16)]}], "runs": []}
    def cur(values):
        return {"entries": [dict(base["entries"][0], n=len(values), mean=float(np.mean(values)), std=None,
                                 values=values)], "runs": []}
    assert cmp.gate(base, cur([20.5, 45.0, 19.0]))[1] == 0       # one seed far off: the median holds
    assert cmp.gate(base, cur([30.0, 45.0, 29.0]))[1] == 1       # all seeds worse: a regression
    base = {"entries": [{"suite": "s", "dataset": "d", "card": "c", "eval": "main", "metric": m, "n": 10,
                         "mean": 10.0, "std": 1.0} for m in ("fid", "kid_mean", "mode_kl", "nll_bpd")], "runs": []}
    # 4 band checks at a false-alarm rate of 0.04: each at alpha 0.01
    edge = 10.0 + cmp.band(1.0, 10, 1, 0.01)
    for delta, code in ((-1e-6, 0), (1e-6, 1)):
        cur = {"entries": [dict(e, n=1, mean=edge + delta if e["metric"] == "fid" else 10.0, std=None)
                           for e in base["entries"]], "runs": []}
        assert cmp.gate(base, cur, fwer=0.04)[1] == code


def test_one_seed_baseline_uses_ten_percent(tmp_path):
    base = tree(tmp_path / "base", fid=(10.0,), cards=("dcgan",))
    assert cmp.compare(base, tree(tmp_path / "a", fid=(10.9,), cards=("dcgan",))).exit_code == 0
    r = cmp.compare(base, tree(tmp_path / "b", fid=(11.5,), cards=("dcgan",)))
    assert r.exit_code == 1 and "10% (1-seed baseline)" in r.markdown


def test_higher_is_better_direction(tmp_path):
    base = tree(tmp_path / "base", fid=(10.0,), precision=0.8)
    assert cmp.compare(base, tree(tmp_path / "up", fid=(10.0,), precision=0.95)).exit_code == 0
    assert cmp.compare(base, tree(tmp_path / "down", fid=(10.0,), precision=0.6)).exit_code == 1


def test_floors_come_from_the_records_not_the_suite_file(tmp_path):
    """The suite's tolerances travel in each run's record: the suite file (here: none of that name
    exists) is never read at gate time, so renaming or deleting it cannot change a verdict."""
    base = tree(tmp_path / "base", fid=(10.0,), cards=("dcgan",), tolerances={"fid": 5.0})
    s = cmp.summarize(base)
    assert next(e for e in s["entries"] if e["metric"] == "fid")["floor"] == 5.0
    r = cmp.compare(base, tree(tmp_path / "cur", fid=(14.0,), cards=("dcgan",)))
    assert r.exit_code == 0 and "5 (floor (1-seed baseline))" in r.markdown
    assert cmp.compare(base, tree(tmp_path / "worse", fid=(15.5,), cards=("dcgan",))).exit_code == 1
    # a floor wider than the band from the spread wins
    wide = tree(tmp_path / "wide", tolerances={"fid": 3.0})
    assert cmp.compare(wide, tree(tmp_path / "w2", fid=(12.5, 12.7, 12.3))).exit_code == 0


def test_a_band_wider_than_the_mean_is_unstable_and_not_gated(tmp_path):
    base = tree(tmp_path / "base", fid=(1.0, 30.0, 8.0), cards=("dcgan",))   # mean 13, std ~15
    r = cmp.compare(base, tree(tmp_path / "cur", fid=(60.0,), cards=("dcgan",)))
    assert r.exit_code == 0, r.markdown
    line = next(l for l in r.markdown.splitlines() if "| dcgan | main | fid |" in l)
    assert "unstable (not gated)" in line and "too unstable to gate" in r.markdown


def test_whole_number_metrics_get_a_band_of_at_least_one(tmp_path):
    base = tree(tmp_path / "base", modes=10)                 # 3 seeds, all 10 modes: no spread
    assert cmp.compare(base, tree(tmp_path / "nine", modes=9)).exit_code == 0
    assert cmp.compare(base, tree(tmp_path / "eight", modes=8)).exit_code == 1


def test_speed_is_reported_not_gated(tmp_path):
    base = tree(tmp_path / "base", img_per_s=1000.0)
    r = cmp.compare(base, tree(tmp_path / "slow", img_per_s=100.0))
    assert r.exit_code == 0, r.markdown
    assert "worse (not gated)" in r.markdown


def test_nfe_is_gated_exactly(tmp_path):
    base = tree(tmp_path / "base", nfe=50)
    for nfe in (49, 51):
        r = cmp.compare(base, tree(tmp_path / f"n{nfe}", nfe=nfe))
        assert r.exit_code == 1 and "REGRESSION: changed" in r.markdown


def test_fewer_complete_runs_fail(tmp_path):
    base = tree(tmp_path / "base")
    cur = tree(tmp_path / "cur", status={("dcgan", 2): "diverged"})
    r = cmp.compare(base, cur)
    assert r.exit_code == 1
    assert any("runs complete" in l and "REGRESSION" in l and "2/3" in l for l in r.markdown.splitlines())


def test_missing_card_fails_missing_sweep_does_not(tmp_path):
    base = tree(tmp_path / "base", sweep_fid=5.0)
    r = cmp.compare(base, tree(tmp_path / "cur", cards=("dcgan",), sweep_fid=5.0))
    assert r.exit_code == 1 and "REGRESSION: missing" in r.markdown
    r = cmp.compare(base, tree(tmp_path / "nosweep"))
    assert r.exit_code == 0 and "missing (not gated)" in r.markdown


def test_changed_extractor_fails(tmp_path):
    base = tree(tmp_path / "base")
    cur = tree(tmp_path / "cur")
    m = cur / "gate-test/digits/dcgan/seed0/metrics.json"
    data = json.loads(m.read_text())
    data["provenance"]["extractor_sha256"] = "cd" * 32
    m.write_text(json.dumps(data))
    r = cmp.compare(base, cur)
    assert r.exit_code == 1 and "extractor changed" in r.markdown


def test_summary_file_stands_in_for_the_tree(tmp_path):
    t = tree(tmp_path / "t", sweep_fid=5.0)
    s = cmp.write_summary(t, tmp_path / "baselines" / "smoke.json")
    data = json.loads(s.read_text())
    assert data["format"] == "genbench-summary" and data["version"] == 2
    e = next(x for x in data["entries"] if x["card"] == "dcgan" and x["eval"] == "main" and x["metric"] == "fid")
    assert e["n"] == 3 and e["mean"] == pytest.approx(10.0) and e["std"] == pytest.approx(0.2)
    assert e["values"] == pytest.approx([10.0, 10.2, 9.8]) and e["seeds"] == [0, 1, 2]
    assert cmp.compare(s, t).exit_code == 0
    assert cmp.compare(t, s).exit_code == 0
    assert cmp.compare(s, tree(tmp_path / "worse", fid=(20.0, 20.2, 19.8))).exit_code == 1


@pytest.mark.parametrize("case", ["missing", "empty", "bad-json", "no-status", "bad-summary", "wrong-format",
                                  "entry-without-mean", "not-json-file"])
def test_unusable_input_exits_2(tmp_path, case):
    good = tree(tmp_path / "good")
    bad = tmp_path / "bad"
    if case == "empty":
        bad.mkdir()
    elif case in ("bad-json", "no-status"):
        tree(bad)
        m = bad / "gate-test/digits/vae/seed1/metrics.json"
        m.write_text("{not json" if case == "bad-json" else json.dumps({"metrics": {}}))
    elif case == "bad-summary":
        bad = tmp_path / "s.json"
        bad.write_text("{")
    elif case == "wrong-format":
        bad = tmp_path / "s.json"
        bad.write_text(json.dumps({"format": "other", "entries": []}))
    elif case == "entry-without-mean":
        bad = tmp_path / "s.json"
        bad.write_text(json.dumps({"format": "genbench-summary", "version": 1,
                                   "entries": [{"suite": "s", "dataset": "d", "card": "c", "eval": "main",
                                                "metric": "fid", "n": 1}], "runs": []}))
    elif case == "not-json-file":
        bad = tmp_path / "results.txt"
        bad.write_text("hello")
    for a, b in ((bad, good), (good, bad)):
        r = cmp.compare(a, b)
        assert r.exit_code == 2, (case, r.markdown)
        assert "Unusable input" in r.markdown and str(bad) in r.markdown


def test_summarize_raises_user_error_on_bad_tree(tmp_path):
    from genbench.errors import UserError

    with pytest.raises(UserError):
        cmp.summarize(tmp_path / "nothing")
