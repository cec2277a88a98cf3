"""The command line through click's CliRunner: the happy path, resume, and every bad input."""
import json

import torch

from genbench import store

from helpers import assert_one_line_error, invoke, write_suite


def test_list_names_everything():
    r = invoke("list")
    assert r.exit_code == 0
    for needle in ("suites:", "smoke", "model cards:", "vae", "datasets:", "cifar10", "ring8",
                   "feature extractors:", "inception-v3-compat", "digits", "fid"):
        assert needle in r.output


def test_dry_run_prints_resolved_config(tmp_path):
    r = invoke("run", "--suite", write_suite(tmp_path), "--dry-run", "--device", "cpu",
               "--results-dir", tmp_path / "res")
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["runs"] == ["digits/vae/seed0"] and cfg["cards"][0]["params"]["z_dim"] == 4
    assert cfg["budget_kimg"] == cfg["suite"]["budget_kimg"] and cfg["fast_path"]["compile"] == "off"
    r = invoke("run", "--suite", write_suite(tmp_path), "--dry-run", "--device", "cpu", "--budget-kimg", "0.25",
               "--compile", "default", "--results-dir", tmp_path / "res")
    cfg = json.loads(r.output)   # the overrides, not the suite's values, are what would run
    assert cfg["budget_kimg"] == 0.25 != cfg["suite"]["budget_kimg"] and cfg["fast_path"]["compile"] == "default"
    assert not (tmp_path / "res").exists()


def test_train_bf16_is_on_by_default_on_cuda_and_switchable(tmp_path, monkeypatch):
    """--no-train-bf16 reaches the plan; on a CPU training never autocasts (planned on a pretend CUDA
    device: a dry run builds nothing on it)."""
    from genbench import runner

    def dry(*flags, device="cpu"):
        monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device(device))
        r = invoke("run", "--suite", write_suite(tmp_path), "--dry-run", *flags)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["train_bf16"]

    assert dry(device="cuda") is True and dry("--no-train-bf16", device="cuda") is False
    assert dry() is False and dry("--train-bf16") is False


def test_channels_last_and_feature_cache_are_switchable(tmp_path, monkeypatch):
    from genbench import runner

    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device("cuda"))   # a dry run only plans
    on = json.loads(invoke("run", "--suite", write_suite(tmp_path), "--dry-run", "--results-dir", tmp_path).output)
    off = json.loads(invoke("run", "--suite", write_suite(tmp_path), "--dry-run", "--no-channels-last",
                            "--no-feature-cache").output)
    assert on["fast_path"]["channels_last"] is True and on["feature_cache"] == str(tmp_path / ".cache")
    assert off["fast_path"]["channels_last"] is False and off["feature_cache"] is None


def test_no_feature_cache_writes_no_cache(tmp_path):
    from genbench.scoring import wait_for_cache_writes

    for flag, cached in (("--no-feature-cache", False), ("--feature-cache", True)):
        res = tmp_path / flag
        r = invoke("run", "--suite", write_suite(tmp_path), "--results-dir", res, "--device", "cpu", flag)
        assert r.exit_code == 0, r.output
        wait_for_cache_writes()     # the cache file is written by a thread
        assert len(list(res.glob(".cache/*.pt"))) == int(cached)


def test_run_then_rerun_skips(tmp_path):
    suite = write_suite(tmp_path, every_kimg=0.1)
    res = tmp_path / "res"
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu")
    assert r.exit_code == 0, r.output
    rdir = store.run_dir(res, "tiny", "digits", "vae", 0)
    m = json.loads((rdir / "metrics.json").read_text())
    assert m["status"] == "complete"
    for key in ("fid", "is_mean", "kid_mean", "precision", "recall", "modes_covered", "nll_bpd"):
        assert isinstance(m["metrics"][key], float | int), key
    assert m["sampling"]["nfe"] == 1 and m["sampling"]["img_per_s"] > 0
    assert m["provenance"]["extractor"] == "digits" and len(m["provenance"]["extractor_sha256"]) == 64
    assert m["provenance"]["metric_code"].startswith("genbench.device_metrics/")
    assert m["provenance"]["extractor_compiled"] is False          # --compile only compiles on CUDA
    assert m["provenance"]["extractor_forward"] is None   # the digits classifier: no forward replaced
    for f in ("config.json", "curves.csv", "train_log.csv", "samples.png", "model.pt"):
        assert (rdir / f).is_file(), f
    assert not (rdir / "checkpoint.pt").exists()
    assert (rdir / "curves.csv").read_text().count("\n") >= 2    # cheap evals every 0.1 kimg
    before = (rdir / "metrics.json").stat().st_mtime_ns
    r = invoke("run", "--suite", suite, "--results-dir", res, "--device", "cpu")
    assert r.exit_code == 0 and "skipped" in r.output
    assert (rdir / "metrics.json").stat().st_mtime_ns == before
    df = store.load_results(res)
    assert len(df) == 1 and df.loc[0, "card"] == "vae" and df.loc[0, "fid"] == m["metrics"]["fid"]


def test_unknown_suite(tmp_path):
    assert_one_line_error(invoke("run", "--suite", "nosuch"), "unknown suite 'nosuch'", "smoke")


def test_unknown_card_in_only(tmp_path):
    assert_one_line_error(invoke("run", "--suite", write_suite(tmp_path), "--only", "biggan"), "biggan", "vae")


def test_unknown_dataset_and_extractor(tmp_path):
    r = invoke("run", "--suite", write_suite(tmp_path, dataset="imagenet"), "--results-dir", tmp_path / "r",
               "--device", "cpu")
    assert_one_line_error(r, "unknown dataset 'imagenet'")
    assert not (tmp_path / "r").exists()
    r = invoke("run", "--suite", write_suite(tmp_path), "--extractor", "clip", "--dry-run")
    assert_one_line_error(r, "unknown extractor 'clip'", "inception-v3-compat")


def test_unknown_metric(tmp_path):
    p = write_suite(tmp_path, metrics=["fid", "fvd"])
    assert_one_line_error(invoke("run", "--suite", p, "--dry-run"), "unknown metric 'fvd'")


def test_missing_data_says_where_it_looked(tmp_path):
    p = write_suite(tmp_path, dataset="cifar10", extractor="digits")
    r = invoke("run", "--suite", p, "--data-root", tmp_path / "nodata", "--results-dir", tmp_path / "r",
               "--device", "cpu")
    assert_one_line_error(r, "cifar-10-batches-py", "--data-root")
    assert not (tmp_path / "r").exists(), "nothing may be half-written on bad input"


def test_missing_inception_weights_fails_before_training(tmp_path):
    p = write_suite(tmp_path, dataset="cifar10", extractor="inception-v3-compat")
    r = invoke("run", "--suite", p, "--results-dir", tmp_path / "r", "--device", "cpu")
    assert_one_line_error(r, "--inception-weights PATH", "GENBENCH_INCEPTION_WEIGHTS")
    assert not (tmp_path / "r").exists()
    r = invoke("run", "--suite", "cifar10", "--dry-run")
    assert_one_line_error(r, "--inception-weights PATH")


def test_bad_device():
    assert_one_line_error(invoke("run", "--device", "tpu", "--dry-run"), "--device")


def test_report_on_missing_dir(tmp_path):
    assert_one_line_error(invoke("report", "--results-dir", tmp_path / "none"), "no such folder")


def test_bad_jobs(tmp_path):
    assert_one_line_error(invoke("run", "--suite", write_suite(tmp_path), "--jobs", "0", "--dry-run"), "--jobs")
    p = tmp_path / "j.yaml"
    p.write_text(write_suite(tmp_path).read_text() + "jobs: two\n")
    assert_one_line_error(invoke("run", "--suite", p, "--dry-run"), "'jobs'", "whole number")


def test_bad_budget(tmp_path):
    for bad in ("0", "-1", "nan"):
        assert_one_line_error(invoke("run", "--suite", write_suite(tmp_path), "--budget-kimg", bad, "--dry-run"),
                              "--budget-kimg must be positive")


def test_bench_times_every_card_and_steps_reach_only_diffusion(tmp_path):
    out = tmp_path / "bench.json"
    r = invoke("bench", "--suite", "smoke", "--device", "cpu", "--batch-sizes", "2", "--batches", "1",
               "--steps", "3", "--out", out)
    assert r.exit_code == 0, r.output
    rows = {row["card"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"vae", "dcgan", "vqvae-pixelcnn", "ddpm"}
    assert rows["ddpm"]["nfe"] == 3 and rows["ddpm"]["sampler"]["steps"] == 3
    assert rows["dcgan"]["nfe"] == 1 and "steps" not in rows["dcgan"]["sampler"]
    assert all(row["img_per_s"] > 0 for row in rows.values()) and "| digits | ddpm | 2 |" in r.output


def test_bench_bad_input(tmp_path):
    out = tmp_path / "bench.json"
    base = ("bench", "--suite", "smoke", "--device", "cpu", "--batches", "1", "--out", out)
    assert_one_line_error(invoke(*base, "--steps", "0"), "--steps must be at least 1")
    assert_one_line_error(invoke(*base, "--steps", "5000"), "card 'ddpm'", "steps must be an integer in [1, T=")
    assert_one_line_error(invoke(*base, "--batch-sizes", "x"), "--batch-sizes")
    assert not out.exists()


def test_evaluator_train_refuses_zero_epochs(tmp_path):
    assert_one_line_error(invoke("evaluator", "train", "--dataset", "digits", "--epochs", "0",
                                 "--out", tmp_path / "w.pt"), "--epochs must be at least 1")
    assert not (tmp_path / "w.pt").exists()
