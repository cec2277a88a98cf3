"""The seam: one metric registration reaches the record, the report and the gate; claims count cards by
family and traits, so a renamed copy of a card counts the same."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from genbench import compare as cmp
from genbench import metrics as registry
from genbench import runner, store
from genbench.claims import NOT_MEASURED, evaluate_claims
from genbench.config import load_suite, shipped_dir
from genbench.record import RecordError, RunRecord
from genbench.report import write_report
from helpers import write_suite
from results_fixtures import frame, seeds, sweep


@pytest.fixture
def dummy_metric():
    """One registration: a group `dummy` computing `dummy_score` from the samples' features."""
    def compute(ctx):
        return {"dummy_score": float(ctx.fid_features.double().abs().mean())}

    registry.register_group(registry.MetricGroup("dummy", registry.FEATURES, "mean |feature|", compute),
                            [registry.Metric("dummy_score", "dummy", True, "dummy score", registry.FEATURES)])
    yield
    registry.unregister("dummy")


def test_a_metric_registered_once_reaches_record_report_and_gate(tmp_path, dummy_metric):
    suite = load_suite(str(write_suite(tmp_path, metrics=["fid", "dummy"])))
    res = tmp_path / "res"
    p = runner.plan(suite, runner.RunOptions(results_dir=res, device="cpu", progress=False))
    assert runner.run_suite(p, log=lambda s: None)["complete"] == 1
    rdir = store.run_dir(res, "tiny", "digits", "vae", 0)
    value = store.read_record(rdir).metrics["dummy_score"]
    assert value > 0
    md = write_report(res, tmp_path / "rep").read_text()
    assert "dummy score ↑ [digits]" in md                            # its label, direction and feature space
    base = cmp.summarize(res)
    assert any(e["metric"] == "dummy_score" for e in base["entries"])
    worse = copy.deepcopy(base)
    for e in worse["entries"]:
        if e["metric"] == "dummy_score":
            e["mean"], e["values"] = value / 2, [value / 2]            # higher is better: halved is a regression
    rows, n_reg = cmp.gate(base, worse)
    assert n_reg == 1 and next(r for r in rows if r["metric"] == "dummy_score")["status"] == "REGRESSION"


def test_an_unknown_metric_group_in_a_suite_is_refused(tmp_path):
    from genbench.errors import UserError

    with pytest.raises(UserError, match="unknown metric 'dummy'"):
        load_suite(str(write_suite(tmp_path, metrics=["fid", "dummy"])))


def test_family_metrics_are_declared_and_registered():
    from genbench.families import builtin_families

    builtin_families()
    for key, higher in (("eps_mse", False), ("recon_mse", False), ("codebook_usage", True),
                        ("prior_bits_per_code", False)):
        assert registry.direction(key) is higher, key
    assert registry.get("eps_mse").source == registry.HELD_OUT


def test_declared_metrics_travel_with_the_record(tmp_path):
    """A tree whose family is not installed here still tells report and gate its metrics' directions."""
    d = {"status": "complete", "suite": "s", "dataset": "digits", "card": "c", "seed": 0, "family": "x",
         "metrics": {"plugin_quality": 3.0},
         "declared_metrics": {"plugin_quality": {"key": "plugin_quality", "group": "plugin", "higher_is_better": False,
                                                 "label": "plugin quality", "source": "held-out"}}}
    rdir = tmp_path / "s" / "digits" / "c" / "seed0"
    rdir.mkdir(parents=True)
    (rdir / "metrics.json").write_text(json.dumps(d))
    try:
        store.read_record(rdir)
        assert registry.direction("plugin_quality") is False
        assert any(e["metric"] == "plugin_quality" for e in cmp.summarize(tmp_path)["entries"])
    finally:
        registry.unregister("plugin")


def test_version_one_records_load_and_bad_ones_are_named(tmp_path):
    v1 = {"status": "complete", "suite": "smoke", "dataset": "digits", "card": "vae", "family": "vae", "seed": 0,
          "metrics": {"fid": 1.0}, "sampling": {"nfe": 1, "sampler": {"temperature": 1.0}}, "sweeps": [
              {"name": "t", "param": "temperature", "value": 0.5, "sampler": {"temperature": 0.5},
               "metrics": {"fid": 2.0}, "sampling": {"nfe": 1}}]}
    rec = RunRecord.from_dict(v1)
    assert rec.record_version == 2 and rec.sampler == {"temperature": 1.0} and rec.sweeps[0].metrics["fid"] == 2.0
    for bad in ({"metrics": {}}, {"status": "done"}, {"status": "complete", "metrics": []}, [], {"status": "complete",
                                                                                                  "record_version": 99}):
        with pytest.raises(RecordError):
            RunRecord.from_dict(bad)


def _renamed(card: str, name: str, tmp_path) -> dict:
    d = yaml.safe_load((shipped_dir("models") / f"{card}.yaml").read_text())
    d["name"] = name
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
    return d["traits"]


def _rows(card: str, traits: dict, loss: float, nll: float, fid: float) -> list[dict]:
    kw = {"family": "diffusion", **{f"trait_{k}": v for k, v in traits.items()}}
    rows = seeds(card, {"fid": [fid, fid + 0.1, fid + 0.2], "nll_bpd": [nll, nll + 0.01, nll + 0.02]}, **kw)
    rows += sweep(card, "steps", "steps_ancestral",
                  {50: [(fid + loss + 0.1 * i,) for i in range(3)], 1000: [(fid + 0.1 * i,) for i in range(3)]},
                  ("fid",), **kw)
    return rows


def test_renamed_copies_of_the_ddpm_cards_still_count_in_c5_and_c6(tmp_path):
    t_ddpm, t_iddpm = _renamed("ddpm", "my-linear-eps", tmp_path), _renamed("iddpm", "my-cosine-learned", tmp_path)
    original = frame(_rows("ddpm", t_ddpm, 20, 3.2, 10.0) + _rows("iddpm", t_iddpm, 5, 3.0, 10.0))
    renamed = frame(_rows("my-linear-eps", t_ddpm, 20, 3.2, 10.0) + _rows("my-cosine-learned", t_iddpm, 5, 3.0, 10.0))
    a = {v.id: v for v in evaluate_claims(original)}
    b = {v.id: v for v in evaluate_claims(renamed)}
    for cid in ("C5", "C6"):
        assert b[cid].verdict != NOT_MEASURED, b[cid].evidence
        assert b[cid].verdict == a[cid].verdict
    # a card named "ddpm" whose traits say it is something else is not counted as DDPM
    other = frame(_rows("ddpm", {**t_ddpm, "architecture": "adm"}, 20, 3.2, 10.0) + _rows("iddpm", t_iddpm, 5, 3.0, 10.0))
    assert {v.id: v for v in evaluate_claims(other)}["C5"].verdict == NOT_MEASURED


def test_a_copied_card_file_loads_by_path_and_runs_under_its_name(tmp_path):
    _renamed("vae", "my-vae", tmp_path)
    s = write_suite(tmp_path, cards=("my-vae.yaml",), overrides={})
    suite = load_suite(str(s))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False, only=()))
    assert [c.name for c in p.cards] == ["my-vae"] and p.cards[0].traits == {"likelihood": "logistic"}


def test_genbench_path_folders_are_searched_before_the_shipped_ones(tmp_path, monkeypatch):
    """A user's folder on $GENBENCH_PATH (suites/ and models/ inside) wins over the shipped files of the
    same name; names not there still come from the shipped folders."""
    from genbench import config

    mine = tmp_path / "mine"
    (mine / "suites").mkdir(parents=True)
    (mine / "models").mkdir()
    d = yaml.safe_load((shipped_dir("models") / "vae.yaml").read_text())
    d["description"] = "my own vae"
    (mine / "models" / "vae.yaml").write_text(yaml.safe_dump(d))
    s = yaml.safe_load(write_suite(tmp_path).read_text())
    s["name"] = "my-suite"
    (mine / "suites" / "my-suite.yaml").write_text(yaml.safe_dump(s))
    monkeypatch.setenv(config.PATH_ENV, f"{tmp_path / 'nothing-here'}:{mine}")
    suite = load_suite("my-suite")
    assert suite.name == "my-suite" and config.load_card("vae").description == "my own vae"
    assert config.load_card("ddpm").path == str(shipped_dir("models") / "ddpm.yaml")
    assert "my-suite" in config.list_names("suites") and "smoke" in config.list_names("suites")
