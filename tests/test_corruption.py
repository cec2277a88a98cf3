"""Runs that survive corrupted state: a truncated model.pt is never taken for a finished run, a garbage
checkpoint or reference cache is set aside and rebuilt (the message names the file), a finished run made
with other settings is named and kept (or redone with --rerun), and report names malformed records."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from genbench import store
from genbench.cli import main
from genbench.scoring import wait_for_cache_writes
from helpers import write_suite


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def finished(tmp_path):
    suite = write_suite(tmp_path)
    res = tmp_path / "res"
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    wait_for_cache_writes()
    return suite, res, store.run_dir(res, "tiny", "digits", "vae", 0)


def test_a_truncated_model_is_never_taken_for_a_finished_run(finished):
    suite, res, rdir = finished
    good = store.read_record(rdir)
    assert good.model["bytes"] == (rdir / "model.pt").stat().st_size and len(good.model["sha256"]) == 64
    data = (rdir / "model.pt").read_bytes()
    (rdir / "model.pt").write_bytes(data[: len(data) // 3])
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "truncated" in r.stderr and "redone" in r.stderr
    again = store.read_record(rdir)
    assert store.model_problem(rdir, again) is None
    assert again.metrics == good.metrics           # the same seed trains the same run
    assert list(rdir.parent.glob(".replaced-seed0-*"))   # the damaged folder is kept aside, not deleted


@pytest.mark.slow
def test_a_garbage_checkpoint_is_set_aside_and_training_starts_over(finished, tmp_path):
    suite, res, rdir = finished
    good = store.read_record(rdir).metrics
    res2 = tmp_path / "res2"
    rdir2 = store.run_dir(res2, "tiny", "digits", "vae", 0)
    rdir2.mkdir(parents=True)
    (rdir2 / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    r = invoke("run", "--suite", suite, "--results-dir", res2, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"checkpoint {rdir2 / 'checkpoint.pt'} could not be used" in r.stderr
    assert (rdir2 / "checkpoint.pt.corrupt-1").read_bytes() == b"not a checkpoint at all"
    assert store.read_record(rdir2).metrics == good


@pytest.mark.slow
def test_a_garbage_reference_cache_is_rebuilt(finished, tmp_path):
    suite, res, rdir = finished
    good = store.read_record(rdir).metrics
    cache = next((res / ".cache").glob("*.pt"))
    cache.write_bytes(b"garbage")
    res2 = tmp_path / "res2"
    (res2 / ".cache").mkdir(parents=True)
    (res2 / ".cache" / cache.name).write_bytes(b"garbage")
    r = invoke("run", "--suite", suite, "--results-dir", res2, "--device", "cpu", "--no-progress")
    wait_for_cache_writes()
    assert r.exit_code == 0, r.output
    assert f"reference-feature cache {res2 / '.cache' / cache.name} could not be read" in r.stderr
    assert store.read_record(store.run_dir(res2, "tiny", "digits", "vae", 0)).metrics == good
    import torch

    assert isinstance(torch.load(res2 / ".cache" / cache.name, weights_only=True), dict)   # rewritten whole


@pytest.mark.slow
def test_a_finished_run_made_with_other_settings_is_named_and_kept_unless_rerun(finished):
    suite, res, rdir = finished
    before = (rdir / "metrics.json").read_bytes()
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu", "--budget-kimg", "0.3",
               "--no-progress")
    assert r.exit_code == 0
    line = next(l for l in r.stderr.splitlines() if "seed0" in l)
    assert "budget_kimg 0.2 (now 0.3)" in line and "--rerun" in line
    assert (rdir / "metrics.json").read_bytes() == before
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu", "--budget-kimg", "0.3", "--rerun",
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert store.read_record(rdir).training["budget_kimg"] == 0.3
    assert list(rdir.parent.glob(".replaced-seed0-*"))


def test_report_names_each_malformed_record(finished, tmp_path):
    suite, res, rdir = finished
    bad = store.run_dir(res, "tiny", "digits", "vae", 1)
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{truncated")
    worse = store.run_dir(res, "tiny", "digits", "vae", 2)
    worse.mkdir(parents=True)
    (worse / "metrics.json").write_text(json.dumps({"status": "exploded"}))
    r = invoke("report", "--results-dir", res, "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 2
    assert str(bad / "metrics.json") in warnings[0] and "not valid JSON" in warnings[0]
    assert str(worse / "metrics.json") in warnings[1] and "exploded" in warnings[1]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "2 run record(s) could not be read" in md
