"""The bad-input battery: every class of user mistake ends before any work with exit code 2, one line on
stderr starting "error:", no traceback, and nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from genbench.cli import main
from helpers import TINY_VAE

BASE = {"name": "tiny", "version": 1, "datasets": [{"name": "digits", "image_size": 16}], "cards": ["vae"],
        "seeds": 1, "budget_kimg": 0.2,
        "eval": {"extractor": "auto", "n_fake": 200, "batch_size": 100, "cheap_n_fake": 100, "kid_subset_size": 100,
                 "ref_split": "train"},
        "overrides": {"vae": TINY_VAE}}


def suite(tmp: Path, change=None, raw: str | None = None, name="s.yaml") -> Path:
    p = tmp / name
    if raw is not None:
        p.write_text(raw)
        return p
    d = yaml.safe_load(yaml.safe_dump(BASE))
    if change:
        change(d)
    p.write_text(yaml.safe_dump(d))
    return p


def _set(path: str, value):
    def change(d):
        *parents, last = path.split(".")
        node = d
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[last] = value
    return change


def _run(*extra):
    return lambda s: ["run", "--suite", s, "--results-dir", "out", "--device", "cpu", *extra]


SUITE_CASES = {
    "budget zero in the file": (_set("budget_kimg", 0), "'budget_kimg' must be positive"),
    "budget negative": (_set("budget_kimg", -1), "'budget_kimg' must be positive"),
    "budget nan": (_set("budget_kimg", float("nan")), "'budget_kimg' must be a finite number"),
    "budget a string": (_set("budget_kimg", "lots"), "'budget_kimg' must be a finite number"),
    "negative batch size": (_set("overrides.vae.batch_size", -4), "'batch_size' must be in [1,"),
    "ema of one": (_set("overrides.vae.ema", 1.0), "'ema' must be below 1.0"),
    "negative ema": (_set("overrides.vae.ema", -0.1), "'ema' must be at least 0.0"),
    "n_fake zero": (_set("eval.n_fake", 0), "'n_fake' must be in [1,"),
    "kid subset above n_fake": (_set("eval.kid_subset_size", 500), "n_fake 200 is fewer than metric 'kid' needs (500)"),
    "n_real below prc's need": (_set("eval.n_real", 3), "n_real 3 is fewer than metric"),
    "image size zero": (_set("datasets.0.image_size", 0), "'datasets.image_size' must be in [1,"),
    "image size a word": (_set("datasets.0.image_size", "big"), "'datasets.image_size' must be a whole number"),
    "seed count past an int": (_set("seeds", 3_000_000_000), "'seeds' must be in [1,"),
    "no datasets": (_set("datasets", []), "'datasets' must not be empty"),
    "no cards": (_set("cards", []), "'cards' must not be empty"),
    "tolerances a list": (_set("tolerances", [1, 2]), "'tolerances' must be a mapping"),
    "negative tolerance": (_set("tolerances", {"fid": -1}), "'tolerances.fid' must be at least 0.0"),
    "tolerance of an unknown metric": (_set("tolerances", {"fvd": 1}), "unknown metric 'fvd'"),
    "params the family does not take": (_set("overrides.vae.params.bogus_param", 1), "bogus_param"),
    "a param value the family refuses": (_set("overrides.vae.params.likelihood", "poisson"), "likelihood"),
    "unknown suite key": (_set("epochs", 3), "unknown key 'epochs'"),
    "unknown card key": (_set("overrides.vae.optimizer", "sgd"), "unknown key 'optimizer'"),
    "suite name with path syntax": (_set("name", "../../x"), "not a plain name"),
    "suite name with a slash": (_set("name", "a/b"), "not a plain name"),
    "card entry with path syntax": (lambda d: d.update(cards=["../models/vae"], overrides={}), "not a plain name"),
    "card file outside the suite's folder": (lambda d: d.update(cards=["../elsewhere.yaml"], overrides={}),
                                             "outside the suite's folder"),
    "metric named twice": (_set("eval.metrics", ["fid", "fid"]), "names a group twice"),
    "metrics not a list": (_set("eval.metrics", "fid"), "'metrics' must be a list"),
    "unknown reference split": (_set("eval.ref_split", "val"), "'ref_split' must be one of train, test"),
    "cheap interval zero": (_set("eval.every_kimg", 0), "'every_kimg' must be positive"),
    "version zero": (_set("version", 0), "'version' must be in [1,"),
    "jobs zero in the file": (_set("jobs", 0), "'jobs' must be in [1,"),
    "unknown dataset": (_set("datasets.0.name", "imagenet"), "unknown dataset 'imagenet'"),
    "folder dataset that is not there": (_set("datasets.0.name", "folder:/nonexistent/x"), "no such file or folder"),
    "unknown family": (_set("overrides.vae.family", "normalizing-flow"), "unknown family 'normalizing-flow'"),
    "family import path that does not import": (_set("overrides.vae.family", "no_such_pkg.models:Flow"),
                                                "module 'no_such_pkg.models' does not import"),
    "family that is not a GenerativeModel": (_set("overrides.vae.family", "collections:OrderedDict"),
                                             "not a genbench GenerativeModel"),
    "sweep of a value the sampler refuses": (lambda d: d.update(cards=["ddpm"], overrides={"ddpm": {
        "params": {"ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "timesteps": 50}}},
        sweeps=[{"name": "s", "param": "steps", "values": [60], "cards": ["ddpm"]}]), "steps must be an integer in [1, T=50]"),
    "main sampler option the family lacks": (_set("overrides.vae.sampler", {"steps": 10}), "sampler option 'steps'"),
    "sweep naming a card not in the suite": (_set("sweeps", [{"name": "s", "param": "temperature", "values": [5],
                                                              "cards": ["ddpm"]}]), "names card 'ddpm'"),
}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check(tmp: Path, args: list, needle: str):
    before = _files(tmp)
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout == "", r.stdout
    assert needle in lines[0], lines[0]
    assert _files(tmp) == before, f"written: {sorted(_files(tmp) - before)}"


@pytest.mark.parametrize("case", list(SUITE_CASES), ids=list(SUITE_CASES))
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_suite_values_checked_before_work(in_tmp, case, dry):
    change, needle = SUITE_CASES[case]
    s = suite(in_tmp, change)
    check(in_tmp, _run(*(["--dry-run"] if dry else []))(s), needle)


RAW_CASES = {
    "malformed yaml": ("name: [unclosed\n", "not valid YAML"),
    "yaml list at the top": ("- a\n- b\n", "expected a mapping at the top level"),
    "empty file": ("", "expected a mapping at the top level"),
}


@pytest.mark.parametrize("case", list(RAW_CASES), ids=list(RAW_CASES))
def test_unreadable_suite_files(in_tmp, case):
    raw, needle = RAW_CASES[case]
    check(in_tmp, _run()(suite(in_tmp, raw=raw)), needle)


CLI_CASES = {
    "--only with no name": (lambda s: _run("--only", ",")(s), "names no card"),
    "--only unknown card": (lambda s: _run("--only", "biggan")(s), "'biggan' is not in suite"),
    "--seeds zero": (lambda s: _run("--seeds", "0")(s), "--seeds must be"),
    "--first-seed negative": (lambda s: _run("--first-seed", "-1")(s), "--first-seed must be"),
    "--budget-kimg infinite": (lambda s: _run("--budget-kimg", "inf")(s), "--budget-kimg must be positive and finite"),
    "--device unknown": (lambda s: _run()(s)[:-2] + ["--device", "tpu"], "--device"),
    "--jobs negative": (lambda s: _run("--jobs", "-1")(s), "--jobs must be"),
    "--results-dir under a file": (lambda s: ["run", "--suite", s, "--results-dir", "afile/r", "--device", "cpu"],
                                   "is a file, not a folder"),
    "unknown option": (lambda s: ["run", "--nosuch"], "No such option"),
    "option value of the wrong type": (lambda s: ["run", "--seeds", "abc"], "'abc' is not a valid integer"),
    "unknown command": (lambda s: ["fly"], "No such command"),
    "unknown suite name": (lambda s: ["run", "--suite", "nosuch"], "unknown suite 'nosuch'"),
    "suite name with path syntax on the command line": (lambda s: ["run", "--suite", "../suites/smoke"],
                                                        "not a plain name"),
    "compare with a missing baseline": (lambda s: ["compare", "nothing.json", "nothere"], "not found"),
    "compare --summary-out under a file": (lambda s: ["compare", "x", "y", "--summary-out", "afile/s.md"],
                                           "is a file, not a folder"),
    "compare false-alarm rate out of range": (lambda s: ["compare", "x", "y", "--false-alarm-rate", "2"],
                                              "--false-alarm-rate must be in (0, 1)"),
    "report --out under a file": (lambda s: ["report", "--results-dir", ".", "--out", "afile/rep"], "is a file"),
    "report on a missing folder": (lambda s: ["report", "--results-dir", "nothere"], "no such folder"),
    "summarize out under a file": (lambda s: ["summarize", ".", "afile/s.json"], "is a file"),
    "bench --out under a file": (lambda s: ["bench", "--suite", s, "--device", "cpu", "--out", "afile/b.json"],
                                 "is a file"),
    "evaluator train --out under a file": (lambda s: ["evaluator", "train", "--dataset", "digits", "--out",
                                                      "afile/w.pt"], "is a file"),
    "eval with neither source": (lambda s: ["eval", "--dataset", "digits"], "exactly one of"),
    "eval --samples of floats": (lambda s: ["eval", "--samples", "floats.npz", "--dataset", "digits",
                                            "--results-dir", "out", "--device", "cpu"], "float32"),
    "eval --run on a folder that is no run": (lambda s: ["eval", "--run", ".", "--device", "cpu"], "not a run folder"),
    "sample --n zero": (lambda s: ["sample", "--run", ".", "--n", "0", "--out", "x.npz", "--device", "cpu"], "--n"),
    "cifar10 without data or weights names both": (
        lambda s: ["run", "--suite", "cifar10", "--dry-run", "--data-root", "nodata", "--device", "cpu"],
        "3 inputs are not usable"),
}


@pytest.mark.parametrize("case", list(CLI_CASES), ids=list(CLI_CASES))
def test_command_line_mistakes(in_tmp, case, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "no_torch_home"))
    (in_tmp / "afile").write_text("x")
    np.savez(in_tmp / "floats.npz", arr_0=np.zeros((4, 16, 16, 1), np.float32))
    make, needle = CLI_CASES[case]
    check(in_tmp, make(suite(in_tmp)), needle)


def test_the_battery_is_big_enough():
    assert len(SUITE_CASES) * 2 + len(RAW_CASES) + len(CLI_CASES) >= 40
