"""Families from outside genbench: a card's `family:` as an import path (`package.module:Class`) or an
entry point (group `genbench.families`) works wherever a built-in family does (run, --jobs N, eval --run,
sample, bench, report, claims); `genbench check-family` passes on good plug-ins and names the check a
broken one fails (exit 1); a plug-in whose samples break the contract is recorded `failed` with that
message while the suite goes on; a family that does not resolve is one line, exit 2, before training.

The plug-in classes below live in this module, so cards name them `test_plugins:NAME` (pytest puts
tests/ on sys.path). The example package (examples/pixelgmm) is used by import path here; the test that
needs it installed (entry point, spawned workers) skips with its reason when it is not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from genbench import store
from genbench.cli import main
from genbench.families import Batch, DataSpec, GenerativeModel, Phase
from helpers import TINY_VAE, assert_one_line_error, invoke, write_suite

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pixelgmm"


# --------------------------------------------------------------------------- plug-ins for the tests


class TinyGaussian(GenerativeModel):
    """One Gaussian per pixel (a learned mean image and one scale), fitted by maximum likelihood:
    the smallest model that keeps the whole contract."""
    sampler_options = ("temperature",)
    sampler_examples = {"temperature": [0.0, 1.0]}
    conformance_params = {"lr": 0.05}

    def __init__(self, spec: DataSpec, lr: float = 0.05):
        super().__init__(spec)
        self.lr = lr
        self.mu = nn.Parameter(torch.zeros(spec.shape))
        self.log_s = nn.Parameter(torch.zeros(()))

    def configure_optimizers(self, phase: Phase):
        return {"opt": torch.optim.Adam(self.parameters(), lr=self.lr)}

    def train_step(self, batch: Batch, phase: Phase, optimizers):
        x = batch.x.to(self.device)
        loss = (((x - self.mu) * torch.exp(-self.log_s)) ** 2 / 2 + self.log_s).mean()
        optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        optimizers["opt"].step()
        return {"loss": loss.item()}

    def _temperature(self, temperature: float = 1.0, **unknown) -> float:
        if unknown:
            raise ValueError(f"unknown sampler option {sorted(unknown)[0]!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return float(temperature)

    def nfe(self, **sampler) -> int:
        self._temperature(**sampler)
        return 1

    def sample(self, rng, labels=None, **sampler):
        t = self._temperature(**sampler)
        x = self.mu + t * torch.exp(self.log_s) * rng.randn(*self.spec.shape).to(self.device)
        return x.clamp(-1, 1) if self.spec.is_image else x


class WrongShape(TinyGaussian):
    def sample(self, rng, labels=None, **sampler):
        return super().sample(rng, labels, **sampler).flatten(1)          # [n, C*H*W]


class OutOfRange(TinyGaussian):
    def sample(self, rng, labels=None, **sampler):
        return (super().sample(rng, labels, **sampler) + 1) * 127.5       # [0, 255], not [-1, 1]


class BatchDependent(TinyGaussian):
    def sample(self, rng, labels=None, **sampler):
        x = super().sample(rng, labels, **sampler)
        return (x - x.mean(0, keepdim=True)).clamp(-1, 1)                # batch statistics: depends on the split


class GanLike(TinyGaussian):
    """Declares the family claims count it in."""
    family = "gan"


def write_card(tmp_path: Path, name: str, family: str, params=None, sampler=None, **extra) -> Path:
    d = {"name": name, "family": family, "params": params or {}, "sampler": sampler or {}, "batch_size": 32, **extra}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


# --------------------------------------------------------------------------- check-family


def test_check_family_passes_on_a_plugin_by_import_path():
    r = invoke("check-family", "test_plugins:TinyGaussian")
    assert r.exit_code == 0, r.output
    assert "all " in r.output.splitlines()[-1] and "no declared family" in r.output


@pytest.mark.parametrize("cls,check", [("WrongShape", "sample-shape"), ("OutOfRange", "sample-range"),
                                       ("BatchDependent", "batch-split")])
def test_check_family_fails_on_a_broken_plugin_naming_the_check(cls, check):
    r = invoke("check-family", f"test_plugins:{cls}")
    assert r.exit_code == 1, r.output
    last = r.output.splitlines()[-1]
    assert last.startswith("FAILED: ") and last[len("FAILED: "):].split(" (")[0].split(", ")[0] == check, r.output
    row = next(ln for ln in r.output.splitlines() if ln.startswith(check + " "))
    assert " FAIL " in row, row


def test_check_family_on_cards_and_its_bad_input(tmp_path):
    path = write_card(tmp_path, "tg", "test_plugins:TinyGaussian", sampler={"temperature": 0.5})
    r = invoke("check-family", path, "--shape", "3x8x8", "--classes", "0")
    assert r.exit_code == 0 and "data 3x8x8, 0 classes" in r.output and "card tg" in r.output, r.output
    r = invoke("check-family", "test_plugins:TinyGaussian", "--shape", "2")
    assert r.exit_code == 0 and "data 2," in r.output, r.output
    assert_one_line_error(invoke("check-family", "no-such-family"), "unknown family 'no-such-family'")
    assert_one_line_error(invoke("check-family", tmp_path / "missing.yaml"), "missing.yaml")
    assert_one_line_error(invoke("check-family", "vae", "--shape", "1x16"), "--shape '1x16'")
    assert_one_line_error(invoke("check-family", "vae", "--shape", "1x8x8", "--dataset", "digits"), "--dataset")
    bad = write_card(tmp_path, "bad", "test_plugins:TinyGaussian", params={"no_such_param": 1})
    assert_one_line_error(invoke("check-family", bad), "no_such_param")


# --------------------------------------------------------------------------- samples that break the contract


def test_a_broken_plugin_is_recorded_failed_and_the_suite_goes_on(tmp_path):
    cards = [write_card(tmp_path, "wrong-shape", "test_plugins:WrongShape").name,
             write_card(tmp_path, "out-of-range", "test_plugins:OutOfRange").name, "vae"]
    s = write_suite(tmp_path, cards=cards, overrides={"vae": TINY_VAE}, metrics=["fid"], n_fake=100,
                    cheap_n_fake=100)
    res = tmp_path / "res"
    r = CliRunner().invoke(main, ["run", "--suite", str(s), "--results-dir", str(res), "--device", "cpu",
                                  "--no-progress"])
    assert r.exit_code == 1, r.output                                # failed runs: exit 1, the suite finished
    assert "2 failed" in r.output and "1 complete" in r.output, r.output
    msgs = {c: store.read_record(store.run_dir(res, "tiny", "digits", c, 0)) for c in ("wrong-shape", "out-of-range")}
    assert msgs["wrong-shape"].status == "failed"
    assert "WrongShape.sample() returned shape [100, 256] for 100 samples; expected [100, 1, 16, 16]" \
        in msgs["wrong-shape"].error
    assert msgs["out-of-range"].status == "failed" and "images must lie in [-1, 1]" in msgs["out-of-range"].error
    assert store.read_record(store.run_dir(res, "tiny", "digits", "vae", 0)).status == "complete"


# --------------------------------------------------------------------------- families that do not resolve


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    (tmp_path / "plugin_that_raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def broken_entry_point(monkeypatch):
    import genbench.families as fam

    ep = EntryPoint(name="broken-ep", value="no_such_module_for_ep:Model", group=fam.ENTRY_POINT_GROUP)
    real = fam._entry_points
    monkeypatch.setattr(fam, "_entry_points", lambda: {**real(), "broken-ep": ep})


UNRESOLVED = {
    "missing-module": ("no_such_pkg_xyz.models:MyGAN", "module 'no_such_pkg_xyz.models' does not import"),
    "raising-module": ("plugin_that_raises:Model", "(RuntimeError: boom at import)"),
    "missing-class": ("test_plugins:NoSuchClass", "has no 'NoSuchClass'"),
    "not-a-model": ("collections:OrderedDict", "not a genbench GenerativeModel subclass"),
    "entry-point": ("broken-ep", "entry point 'no_such_module_for_ep:Model'"),
    "unknown-name": ("no-such-family", "unknown family 'no-such-family'"),
}


@pytest.mark.parametrize("case", sorted(UNRESOLVED))
def test_a_family_that_does_not_resolve_is_one_line_before_training(tmp_path, case, broken_module,
                                                                     broken_entry_point):
    family, needle = UNRESOLVED[case]
    path = write_card(tmp_path, "plug", family)
    s = write_suite(tmp_path, cards=[path.name], overrides={})
    res = tmp_path / "res"
    for extra in ([], ["--jobs", "2"], ["--dry-run"]):
        r = CliRunner().invoke(main, ["run", "--suite", str(s), "--results-dir", str(res), "--device", "cpu",
                                      "--no-progress", *extra])
        assert_one_line_error(r, needle, str(path))
        assert not res.exists()
    assert_one_line_error(CliRunner().invoke(main, ["check-family", str(path)]), needle, str(path))


# --------------------------------------------------------------------------- everywhere a built-in works


@pytest.fixture
def example_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    for m in [m for m in sys.modules if m.startswith("genbench_pixelgmm")]:
        sys.modules.pop(m)


def test_plugins_work_in_run_eval_sample_bench_report_and_claims(tmp_path, example_importable):
    from genbench.claims import NOT_MEASURED, evaluate_claims

    card = yaml.safe_load((EXAMPLE / "pixel-gmm.yaml").read_text())
    card.update(family="genbench_pixelgmm.model:PixelGMM", params={**card["params"], "components": 8}, batch_size=32)
    (tmp_path / "pgmm.yaml").write_text(yaml.safe_dump(card))
    write_card(tmp_path, "ganlike", "test_plugins:GanLike")
    s = write_suite(tmp_path, cards=["pgmm.yaml", "ganlike.yaml", "vae"], overrides={"vae": TINY_VAE},
                    metrics=["fid", "prc", "nll"], n_fake=100, cheap_n_fake=100, n_likelihood=50)
    d = yaml.safe_load(s.read_text())
    d["sweeps"] = [{"name": "temperature", "param": "temperature", "values": [0.5], "cards": ["pixel-gmm"]}]
    s.write_text(yaml.safe_dump(d))
    res = tmp_path / "res"
    r = invoke("run", "--suite", s, "--results-dir", res, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and "3 complete" in r.output, r.output
    rdir = store.run_dir(res, "tiny", "digits", "pixel-gmm", 0)
    rec = store.read_record(rdir)
    assert rec.family == "mixture"                                  # the class's declared family
    assert rec.metrics["nll_bpd"] > 0 and 0 < rec.metrics["components_used"] <= 1
    assert [p.value for p in rec.sweeps] == [0.5] and rec.declared_metrics["components_used"]["higher_is_better"]
    assert store.read_record(store.run_dir(res, "tiny", "digits", "ganlike", 0)).family == "gan"

    r = invoke("eval", "--run", rdir, "--option", "temperature=0.25", "--n-fake", 100, "--device", "cpu",
               "--no-progress")
    assert r.exit_code == 0, r.output
    assert any(p.sampler.get("temperature") == 0.25 for p in store.read_record(rdir).points())

    out = tmp_path / "s.npz"
    r = invoke("sample", "--run", rdir, "--n", 10, "--out", out, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert np.load(out)["arr_0"].shape == (10, 16, 16, 1)

    r = invoke("bench", "--suite", s, "--only", "pixel-gmm,ganlike", "--device", "cpu", "--batch-sizes", 16,
               "--batches", 1, "--out", tmp_path / "bench.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {row["card"] for row in rows} == {"pixel-gmm", "ganlike"} and all(row["nfe"] == 1 for row in rows)

    r = invoke("report", "--results-dir", res)
    assert r.exit_code == 0, r.output
    md = (res / "report.md").read_text()
    assert "| pixel-gmm | mixture |" in md and "| ganlike | gan |" in md, md

    df = store.load_results(res)
    verdicts = {v.id: v for v in evaluate_claims(df)}
    assert verdicts["C1"].verdict != NOT_MEASURED, verdicts["C1"].evidence   # GanLike counts as a GAN ...
    df.loc[df["card"] == "ganlike", "family"] = "test_plugins:GanLike"
    assert {v.id: v for v in evaluate_claims(df)}["C1"].verdict == NOT_MEASURED   # ... by its declared family


def test_the_example_passes_check_family_by_import_path(example_importable):
    r = invoke("check-family", "genbench_pixelgmm.model:PixelGMM")
    assert r.exit_code == 0, r.output
    assert "family 'mixture'" in r.output


def _installed_example() -> bool:
    return any(ep.name == "pixel-gmm" for ep in entry_points(group="genbench.families"))


@pytest.mark.slow
@pytest.mark.skipif(not _installed_example(), reason="the example plug-in is not installed "
                                                     "(pip install -e examples/pixelgmm)")
def test_the_installed_example_runs_by_entry_point_with_spawned_workers(tmp_path):
    """From a folder outside the clone, with nothing on PYTHONPATH: the entry point is the only way to the
    plug-in, in this process and in the --jobs 2 workers (spawned: they import nothing of their parent)."""
    genbench = Path(sys.executable).with_name("genbench")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CI="true")
    suite = tmp_path / "ex"
    shutil.copytree(EXAMPLE, suite, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "genbench_pixelgmm"))

    def run(*args):
        return subprocess.run([str(genbench), *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)

    p = run("check-family", "pixel-gmm")
    assert p.returncode == 0, p.stdout + p.stderr
    res = tmp_path / "res"
    p = run("run", "--suite", suite / "suite.yaml", "--results-dir", res, "--jobs", "2", "--no-progress",
            "--device", "cpu", "--budget-kimg", "0.5")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 complete" in p.stdout, p.stdout + p.stderr
    for card, family in (("pixel-gmm", "mixture"), ("dcgan", "gan")):
        rec = store.read_record(store.run_dir(res, "pixelgmm-example", "digits", card, 0))
        assert rec.status == "complete" and rec.family == family
    p = run("report", "--results-dir", res)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (res / "report.md").read_text()
    assert "| pixel-gmm | mixture |" in md and "| dcgan | gan |" in md
