"""The runner and training loop: divergence, resume, CIFAR-10's path with a stand-in extractor."""
import json
import math

import pytest
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from genbench import evaluators, runner, store, train as train_mod
from genbench.config import load_suite
from genbench.data import load
from genbench.families import get_family
from helpers import TINY_VAE, write_suite
from test_data import write_fake_cifar10


def test_forced_nan_is_recorded_diverged_and_suite_goes_on(tmp_path, monkeypatch):
    real_train = train_mod.train

    def train_nan_on_seed0(model, data, **kw):
        return real_train(model, data, inject_nan_at_step=2 if kw["seed"] == 0 else None, **kw)

    monkeypatch.setattr(runner, "train", train_nan_on_seed0)
    suite = load_suite(str(write_suite(tmp_path, seeds=2)))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False))
    counts = runner.run_suite(p, log=lambda s: None)
    assert counts["diverged"] == 1 and counts["complete"] == 1
    m0 = json.loads((store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 0) / "metrics.json").read_text())
    assert m0["status"] == "diverged" and m0["training"]["diverged_at_kimg"] == pytest.approx(0.096)
    assert m0["metrics"] == {}
    # A diverged run is final: a rerun skips it.
    assert runner.run_suite(p, log=lambda s: None)["skipped"] == 2


def test_training_precision_reaches_train_and_is_recorded(tmp_path, monkeypatch):
    real_train, seen = train_mod.train, []
    monkeypatch.setattr(runner, "train",
                        lambda model, data, **kw: seen.append(kw["bf16"]) or real_train(model, data, **kw))
    suite = load_suite(str(write_suite(tmp_path)))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False))
    assert runner.run_suite(p, log=lambda s: None)["complete"] == 1
    m = json.loads((store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 0) / "metrics.json").read_text())
    assert seen == [False] and m["training"]["bf16"] is False      # a CPU run never autocasts training


def test_resume_continues_from_checkpoint(tmp_path):
    data = load("digits", "train")
    vae = get_family("vae")

    def fresh():
        torch.manual_seed(0)
        return vae(data.spec, **TINY_VAE["params"])

    full = train_mod.train(fresh(), data, budget_kimg=0.32, batch_size=32, seed=0, progress=False)
    # Interrupted run: checkpoint after 0.16 kimg (every step), then a new process resumes.
    part = train_mod.train(fresh(), data, budget_kimg=0.16, batch_size=32, seed=0, run_dir=tmp_path,
                           checkpoint_every_s=0.0, progress=False)
    assert (tmp_path / store.CHECKPOINT_FILE).is_file() and part.state.steps == 5
    resumed = train_mod.train(fresh(), data, budget_kimg=0.32, batch_size=32, seed=0, run_dir=tmp_path,
                              progress=False)
    assert resumed.state.steps == full.state.steps == 10
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_ema_warm_up_follows_the_model_on_short_runs():
    """A 0.9999 EMA without warm-up would still be ~99.9% the random initial weights after 10
    steps (samples: noise); with warm-up it tracks the recent weights."""
    assert train_mod.ema_decay_at(0.9999, 1) == pytest.approx(2 / 11)
    assert train_mod.ema_decay_at(0.9999, 10**6) == 0.9999
    assert train_mod.ema_decay_at(0.995, 300) < train_mod.ema_decay_at(0.995, 3000) == 0.995
    data = load("digits", "train")
    torch.manual_seed(0)
    model = get_family("vae")(data.spec, **TINY_VAE["params"])
    init = [p.detach().clone() for p in model.parameters()]
    res = train_mod.train(model, data, budget_kimg=0.32, batch_size=32, seed=0, ema_decay=0.9999, progress=False)
    assert res.model is not model and res.state.steps == 10
    moved = sum((p - q).norm() ** 2 for p, q in zip(model.parameters(), init)).sqrt()
    ema_moved = sum((p - q).norm() ** 2 for p, q in zip(res.model.parameters(), init)).sqrt()
    assert ema_moved > 0.5 * moved


class StandIn(FeatureExtractorBase):
    """Random-weight conv features: the CIFAR-10 path without Inception weights (not offline here)."""

    def __init__(self, name, features_list, **kw):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "pool"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        h = torch.relu(self.conv(x.float() / 255))          # [B, 16, H/4, W/4]
        out = {"pool": h.mean((2, 3)), "logits": h.amax((2, 3))}
        return tuple(out[f] for f in self.features_list)


def test_cifar10_suite_path_with_standin_extractor(tmp_path):
    write_fake_cifar10(tmp_path / "data", n_per_batch=60)
    evaluators.register_extractor(evaluators.ExtractorSpec("standin", "standin-test", "pool", "logits", None, None),
                                  StandIn)
    suite = load_suite(str(write_suite(tmp_path, dataset="cifar10", extractor="inception-v3-compat",
                                       ref_split="test", n_fake=100)))
    opts = runner.RunOptions(results_dir=tmp_path / "r", data_root=tmp_path / "data", device="cpu",
                             extractor="standin", progress=False)
    counts = runner.run_suite(runner.plan(suite, opts), log=lambda s: None)
    assert counts["complete"] == 1
    m = json.loads((store.run_dir(tmp_path / "r", "tiny", "cifar10", "vae", 0) / "metrics.json").read_text())
    assert m["provenance"]["extractor"] == "standin" and m["provenance"]["n_real"] == 60
    assert math.isfinite(m["metrics"]["fid"]) and m["metrics"]["fid"] > 0
    assert "modes_covered" not in m["metrics"]          # a stand-in's logits are no data modes


def test_parallel_jobs_give_the_same_results_as_one_job(tmp_path):
    """--jobs runs in spawned worker processes; every run must come out bit-identical (the smallest
    suite that still trains, samples, scores and computes a likelihood: the cost is the two spawns)."""
    suite = load_suite(str(write_suite(tmp_path, seeds=2, budget_kimg=0.064, n_fake=100, cheap_n_fake=50,
                                       kid_subset_size=50, n_likelihood=64)))
    lines = []
    counts = {}
    for jobs in (1, 2):
        p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / f"j{jobs}", device="cpu", progress=False,
                                                 jobs=jobs))
        counts[jobs] = runner.run_suite(p, log=lines.append)
    assert counts[1] == counts[2] == {"complete": 2, "diverged": 0, "failed": 0, "skipped": 0}
    a = store.load_results(tmp_path / "j1").sort_values("seed").reset_index(drop=True)
    b = store.load_results(tmp_path / "j2").sort_values("seed").reset_index(drop=True)
    for col in ("fid", "kid_mean", "precision", "nll_bpd"):
        assert a[col].tolist() == b[col].tolist(), col
    assert sum("complete in" in ln for ln in lines) == 4
