"""`genbench bench --train`'s function: training-step cost per card and phase, FLOPs of forward and backward,
MFU against a known peak (None on a CPU unless a peak is given)."""
import math
import sys
from pathlib import Path

import pytest
import torch

from genbench import bench
from genbench.config import load_suite
from genbench.errors import UserError
from genbench.families import get_family
from genbench.families.base import DataSpec
from genbench.train import TrainFastPath

ROW_KEYS = {"mode", "dataset", "card", "family", "phase", "batch_size", "steps", "warmup_steps", "img_per_s",
            "ms_per_step", "peak_mem_mb", "warmup_s", "gflop_per_step", "tflops", "peak_tflops", "peak_source",
            "mfu", "params_m", "device", "device_name", "diverged", "fast_path"}


def test_training_bench_times_every_phase_of_the_smoke_cards():
    rows = bench.bench_training(load_suite("smoke"), "cpu", [4], steps=1, warmup=1, log=lambda s: None)
    assert [(r["card"], r["phase"]) for r in rows] == [
        ("vae", "main"), ("dcgan", "main"), ("vqvae-pixelcnn", "autoencoder"), ("vqvae-pixelcnn", "prior"),
        ("ddpm", "diffusion")]
    for r in rows:
        assert set(r) == ROW_KEYS and r["dataset"] == "digits" and r["batch_size"] == 4
        assert r["img_per_s"] > 0 and math.isclose(r["img_per_s"] * r["ms_per_step"], 4000)
        assert r["gflop_per_step"] > 0 and r["mfu"] is None and r["peak_tflops"] is None   # a CPU: no peak
        assert r["fast_path"]["bf16"] is False and r["fast_path"]["compiled"] == []
        assert not r["diverged"]
    md = bench.table(rows)
    assert md.count("\n") == len(rows) + 1 and "| digits | ddpm | diffusion | 4 |" in md and "| – |" in md


def test_training_bench_defaults_to_the_cards_batch_size_and_mfu_with_a_given_peak():
    rows = bench.bench_training(load_suite("smoke"), "cpu", None, steps=1, warmup=0, only=("dcgan",),
                                peak_tflops=0.5, log=lambda s: None)
    (r,) = rows
    assert r["batch_size"] == 64 and r["peak_source"] == "given (--peak-tflops)"
    step_s = r["ms_per_step"] / 1000
    assert r["mfu"] == pytest.approx(r["gflop_per_step"] * 1e9 / step_s / 0.5e12)
    assert r["tflops"] == pytest.approx(r["mfu"] * 0.5)


def test_flops_cover_forward_and_backward():
    """A training step counts about three forwards (backward: grads of inputs and of weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = DataSpec((1, 16, 16), 10)
    torch.manual_seed(0)
    model = get_family("vae")(spec, z_dim=4, channels=8, max_channels=16)
    data = bench.synthetic_data(spec, 32)
    step = bench.train_step_flops(model, data, model.phases()[0], 16)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.neg_elbo(data.model_input(slice(0, 16)))
    assert 2.5 < step / fc.get_total_flops() < 3.5


def test_peak_table_by_device_name(monkeypatch):
    assert bench.peak_tflops_for("cpu") == (None, None)
    assert bench.peak_tflops_for("cpu", 100.0)[0] == 100.0
    with pytest.raises(UserError, match="peak-tflops"):
        bench.peak_tflops_for("cpu", -1.0)
    for name, want in [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                       ("NVIDIA H100 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert bench.peak_tflops_for(torch.device("cuda"))[0] == want, name
    assert bench.mfu(None, 1.0, 989.4) is None and bench.mfu(989.4e12, 1.0, 989.4) == pytest.approx(1.0)


def test_training_bench_bad_input():
    with pytest.raises(UserError, match="at least 1"):
        bench.bench_training(load_suite("smoke"), "cpu", [4], steps=0, log=lambda s: None)
    with pytest.raises(UserError, match="peak-tflops"):
        bench.bench_training(load_suite("smoke"), "cpu", [4], peak_tflops=0.0, log=lambda s: None)


def test_sampling_table_is_unchanged_by_the_dispatch():
    row = {"dataset": "digits", "card": "vae", "batch_size": 2, "img_per_s": 10.0, "ms_per_img": 100.0, "nfe": 1,
           "peak_mem_mb": 1.0, "warmup_s": 0.1, "device": "cpu"}
    assert bench.table([row]) == bench.sampling_table([row])


@pytest.mark.slow
def test_training_vs_diffusers_wiring(tmp_path):
    """bench/training_vs_diffusers.py --tiny on the CPU: both loops run and the JSON has the ratio."""
    pytest.importorskip("diffusers")
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import training_vs_diffusers as tvd

    out = tmp_path / "t.json"
    assert tvd.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--configs",
                     "diffusers-fp32,genbench-bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["diffusers-fp32", "genbench-bf16"]
    assert rows[0]["x_diffusers_fp32"] == 1.0 and rows[1]["x_diffusers_fp32"] > 0 and rows[1]["mfu"] is None
    assert all(r["flop_per_step"] > 0 and r["finite"] for r in rows)
    assert tvd.main(["--configs", "nope"]) == 2
    assert isinstance(tvd.GENBENCH["genbench-bf16"], TrainFastPath)


def test_cifar10_cards_bench_without_the_dataset_files():
    """Neither cost depends on the pixels: a GPU machine without CIFAR-10 still benches the cifar10 suite."""
    assert bench.data_spec("cifar10", None) == DataSpec((3, 32, 32), 10)
    assert bench.data_spec("cifar10", 16) == DataSpec((3, 16, 16), 10)
