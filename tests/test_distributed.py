"""Data-parallel runs under torchrun (genbench/distributed.py): CPU, gloo, 2 ranks, one thread each.

The torchrun jobs (tests/dist_worker.py, `genbench run --nproc 2`) are started as subprocesses with a
timeout, so a hang fails a test instead of the CI job; each takes 15-35 s here, hence `slow`. The rest
checks the pieces in this process (world 1, no process group).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from genbench import distributed as gdist, runner, store
from genbench import train as train_mod
from genbench.cli import main as cli_main, torchrun_argv
from genbench.config import load_suite
from genbench.data import load
from genbench.errors import UserError
from helpers import write_suite

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PY = sys.executable
JOB_TIMEOUT_S = 300


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GENBENCH_INCEPTION_WEIGHTS", "WORLD_SIZE", "RANK",
                                                           "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CI="true", TORCH_HOME=str(tmp / "torch_home"), GENBENCH_DIST_TIMEOUT_S="60",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def _torchrun(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(tmp), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


# --------------------------------------------------------------------------- one torchrun job, many checks


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """tests/dist_worker.py checks at world 2, and the models it samples (built here, world 1)."""
    from genbench.families import get_family

    tmp = tmp_path_factory.mktemp("dist_checks")
    inp, out = tmp / "in", tmp / "out"
    inp.mkdir()
    out.mkdir()
    digits = load("digits", "train", image_size=16)
    gan_params = dict(g_channels=8, d_channels=8, z_dim=8, conditional=True)
    torch.manual_seed(0)
    gan = get_family("gan")(digits.spec, **gan_params)
    torch.save({"replay_x": digits.model_input(slice(0, 300)).float(), "gan_params": gan_params,
                "gan": gan.state_dict(), "gan_params_uncond": dict(g_channels=8, d_channels=8, z_dim=8)},
               inp / "models.pt")
    proc = _torchrun(tmp, str(TESTS / "dist_worker.py"), "checks", str(inp), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = torch.load(out / "checks.pt", weights_only=False)
    res["models"], res["out"] = torch.load(inp / "models.pt", weights_only=False), out
    return res


def _models(res):
    from dist_family import Replay

    from genbench.families import get_family

    digits = load("digits", "train", image_size=16)
    gan = get_family("gan")(digits.spec, **res["models"]["gan_params"])
    gan.load_state_dict(res["models"]["gan"])
    return digits, {"replay": Replay(digits.spec, res["models"]["replay_x"]), "cgan": gan.eval()}


@pytest.mark.slow
def test_sampling_37_images_at_world_2_is_bit_identical_to_one_process(checks):
    from genbench.scoring import sample_stream

    _, models = _models(checks)
    assert checks["world"] == 2
    # batch 8: 5 batches, 3 + 2; batch 32: 32 + 5 (fewer than world x batch); batch 64: rank 1 has none
    assert checks["shard/replay/8"] == [(0, 24), (24, 37)]
    assert checks["shard/replay/32"] == [(0, 32), (32, 37)]
    assert checks["shard/replay/64"] == [(0, 37), (37, 37)]
    for name, m in models.items():   # the conditional GAN: labels k mod C by global image index
        for b in (8, 32, 64):
            one = torch.cat(list(sample_stream(m, 37, 3, b, {})))
            assert torch.equal(checks[f"sample/{name}/{b}"], one), (name, b)


@pytest.mark.slow
def test_evaluation_at_world_2_equals_one_process(checks):
    from dist_family import Replay

    from genbench.evaluation import PointSettings, evaluate_point
    from genbench.evaluators import auto_extractor
    from genbench.scoring import Reference, build_extractor, reference_features

    digits, models = _models(checks)
    extractor = build_extractor(auto_extractor("digits"), torch.device("cpu"))
    ref = reference_features(extractor, digits, 200, None, batch_size=64)
    # sharded on a miss, read from rank 0's cache on a hit: the same bits, on rank 0 only
    for got in (checks["ref_miss"], checks["ref_hit"]):
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert checks["ref_is_none_on"] == [(False, False), (True, True)]
    assert len(list((checks["out"] / "cache").glob("*.pt"))) == 1
    settings = PointSettings(75, 32, ("fid", "isc", "kid", "prc", "modes"), 20)
    one, _, grid = evaluate_point(models["replay"], {}, 5, settings, digits, extractor,
                                  Reference.on(extractor.device, ref), keep=40)
    two = checks["eval_images"]
    assert set(two) == set(one) and one["modes_covered"] > 1 and 0 < one["precision"] < 1
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-10)
    for k in one:
        if k != "fid":
            assert two[k] == one[k], k   # KID subsets, IS splits, precision/recall, modes: exactly
    assert torch.equal(checks["eval_grid"], grid) and grid.shape[0] == 40
    s = checks["eval_sampling"]
    assert s["world_size"] == 2 and len(s["per_rank_img_per_s"]) == 2 and s["timed_images"] > 0
    ring = load("ring8", "train")
    one, _, grid = evaluate_point(Replay(ring.spec, ring.x[:500].float()), {}, 5,
                                  PointSettings(75, 32, ("modes",), 20), ring, None, None, keep=50)
    assert checks["eval_points"] == one and torch.equal(checks["eval_points_grid"], grid)


@pytest.mark.slow
def test_five_steps_at_world_2_equal_one_process_at_the_same_global_batch(checks):
    """Not bit-exact: the loss mean of 8 rows per rank, then the all_reduce of two gradients, rounds
    differently from the mean of 16 rows in one process. Measured: at most 1.5e-7 absolute (relative
    5.7e-7) on weights of scale 0.26, so rtol 1e-5 / atol 1e-6 has margin and still catches a missed
    average (x2) or a clip on the local gradient (the clip at 0.05 is active on every step)."""
    from dist_family import PlainAutoencoder

    digits = load("digits", "train", image_size=16)
    torch.manual_seed(0)
    r = train_mod.train(PlainAutoencoder(digits.spec), digits, budget_kimg=0.08, batch_size=16, seed=0,
                        progress=False)
    assert r.state.steps == checks["ae_steps"] == 5
    for k, v in r.model.state_dict().items():
        torch.testing.assert_close(checks["ae_state"][k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(checks["ae_log"], r.state.log):
        assert a["kimg"] == b["kimg"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm_ae"] == pytest.approx(b["grad_norm_ae"], rel=1e-6) and b["grad_norm_ae"] > 0.05
    r0, r1 = checks["ae_same_on_ranks"]
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))   # the ranks hold the same weights, bit for bit


@pytest.mark.slow
def test_resume_after_three_steps_at_world_2_equals_the_uninterrupted_run(checks):
    """A GAN: training noise from torch's generator (seeded per step and rank: nothing per rank to
    checkpoint), batch-norm buffers, two optimizers and the D-step counter."""
    assert checks["ckpt_steps"] == 3
    full, resumed = checks["gan_full"], checks["gan_resumed"]
    assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full)
    assert checks["gan_full_log"] == checks["gan_resumed_log"] and len(checks["gan_full_log"]) == 5
    a, b = checks["gan_same_on_ranks"]
    assert all(torch.equal(a[k], b[k]) for k in a)   # running statistics included


@pytest.mark.slow
def test_wgan_gp_double_backward_keeps_the_ranks_in_step(checks):
    a, b = checks["wgan_same_on_ranks"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = checks["wgan_log"]
    assert len(log) == 4 and all(math.isfinite(v) for row in log for k, v in row.items() if k not in ("phase",))
    assert all(row["gp"] >= 0 for row in log)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_its_step(checks):
    r0, r1 = checks["nan"]
    assert r0 == r1 or (r0[:3] == r1[:3] and str(r0[3]) == str(r1[3]))
    assert r0[:3] == (3, 0.048, "loss is nan")


# --------------------------------------------------------------------------- whole runs under torchrun


def _card(tmp: Path) -> str:
    path = tmp / "ae.yaml"
    path.write_text("name: ae\nfamily: dist_family:PlainAutoencoder\nparams: {hidden: 16}\nbatch_size: 32\n")
    return str(path)


def _flat(d, prefix=""):
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: d}


TIMINGS = ("sampling.img_per_s", "sampling.ms_per_img", "sampling.peak_mem_mb", "training.wall_s",
           "sampling.timed_images", "sampling.warmup_batches")


@pytest.mark.slow
def test_a_whole_run_at_world_2_gives_the_metrics_of_world_1(tmp_path):
    """`genbench run --nproc 2` (torchrun, gloo) against one process on a tiny suite: every metric of
    the card without training noise is the same number (its weights differ by rounding only); the VAE,
    whose training noise is drawn per rank at world 2, is another draw of the same training."""
    suite = write_suite(tmp_path, cards=(_card(tmp_path), "vae"), every_kimg=0.1, n_likelihood=100,
                        metrics=["fid", "isc", "kid", "prc", "modes", "nll"])
    p = runner.plan(load_suite(str(suite)), runner.RunOptions(results_dir=tmp_path / "w1", device="cpu",
                                                              progress=False))
    assert runner.run_suite(p, log=lambda s: None)["complete"] == 2
    proc = subprocess.run([PY, "-m", "genbench", "run", "--nproc", "2", "--suite", str(suite), "--device", "cpu",
                           "--results-dir", str(tmp_path / "w2"), "--no-progress"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "tiny: 2 complete" in proc.stdout
    one_dir, two_dir = (store.run_dir(tmp_path / w, "tiny", "digits", "ae", 0) for w in ("w1", "w2"))
    one, two = (json.loads((d / store.METRICS_FILE).read_text()) for d in (one_dir, two_dir))
    assert two["metrics"] == one["metrics"] and two["sweeps"] == one["sweeps"]
    assert two["provenance"].pop("world_size") == 2 and two["provenance"].pop("backend") == "gloo"
    assert len(two["provenance"].pop("rank_devices")) == 2
    assert two["provenance"] == one["provenance"]
    assert two["sampling"].pop("world_size") == 2 and len(two["sampling"].pop("per_rank_img_per_s")) == 2
    a, b = _flat(one), _flat(two)
    differ = {k for k in a if a[k] != b.get(k)} - {"model.sha256"} - set(TIMINGS)
    assert not differ, {k: (a[k], b.get(k)) for k in differ}
    for f in (store.CURVES_FILE, store.SAMPLES_FILE, store.CONFIG_FILE):
        assert (one_dir / f).read_bytes() == (two_dir / f).read_bytes(), f
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_csv(one_dir / store.TRAIN_LOG_FILE),
                                  pd.read_csv(two_dir / store.TRAIN_LOG_FILE), rtol=1e-6)
    vae = json.loads((store.run_dir(tmp_path / "w2", "tiny", "digits", "vae", 0) / store.METRICS_FILE).read_text())
    assert vae["status"] == "complete" and set(vae["metrics"]) == set(
        json.loads((store.run_dir(tmp_path / "w1", "tiny", "digits", "vae", 0) / store.METRICS_FILE).read_text())
        ["metrics"])
    assert not list((tmp_path / "w2").rglob("lease*.json")) and not list((tmp_path / "w2").rglob("checkpoint.pt"))


@pytest.mark.slow
def test_a_crash_or_nan_on_one_rank_ends_the_run_with_one_record_not_a_hang(tmp_path):
    """Seed 0 gets a NaN on rank 1 only: recorded diverged at its step, the suite goes on. Seed 1 raises
    on rank 1 only at its third step: rank 0 records it failed with rank 1's error and the job stops on
    both ranks (seed 2 is not started). A later invocation retries the failed run."""
    suite = write_suite(tmp_path, name="faults", seeds=3)
    env = _env(tmp_path, GENBENCH_TEST_NAN_SEED="0", GENBENCH_TEST_CRASH_SEED="1")
    proc = _torchrun(tmp_path, str(TESTS / "dist_worker.py"), "run", "--suite", str(suite), "--device", "cpu",
                     "--results-dir", str(tmp_path / "r"), "--no-progress", env=env)
    assert proc.returncode != 0
    assert "[1/3] faults/digits/vae/seed0: diverged" in proc.stderr
    assert "seed1: FAILED (rank 1: RuntimeError: planted crash on rank 1); the distributed job stops" in proc.stderr
    rdir = lambda s: store.run_dir(tmp_path / "r", "faults", "digits", "vae", s)  # noqa: E731
    m0 = json.loads((rdir(0) / store.METRICS_FILE).read_text())
    assert m0["status"] == "diverged" and m0["training"]["diverged_at_kimg"] == pytest.approx(0.096)
    assert m0["provenance"]["world_size"] == 2
    m1 = json.loads((rdir(1) / store.METRICS_FILE).read_text())
    assert m1["status"] == "failed" and m1["error"] == "rank 1: RuntimeError: planted crash on rank 1"
    assert not rdir(2).exists() or not (rdir(2) / store.METRICS_FILE).exists()
    assert not list((tmp_path / "r").rglob("lease*.json"))
    # the next invocation (here one process) retries the failed run and the one not started
    p = runner.plan(load_suite(str(suite)), runner.RunOptions(results_dir=tmp_path / "r", device="cpu",
                                                              progress=False))
    assert runner.run_suite(p, log=lambda s: None) == {"complete": 2, "diverged": 0, "failed": 0, "skipped": 1}


# --------------------------------------------------------------------------- the pieces, in this process


def test_shards_cover_every_image_once_in_whole_batches():
    for n in (0, 1, 37, 100, 1000):
        for b in (1, 8, 32, 64, 250):
            for world in (1, 2, 3, 8):
                blocks = [gdist.shard(n, b, r, world) for r in range(world)]
                assert blocks[0][0] == 0 and blocks[-1][1] == n
                assert all(x[1] == y[0] for x, y in zip(blocks, blocks[1:]))
                assert all(lo % b == 0 for lo, hi in blocks if hi > lo)   # the batches of one process
                if n:
                    assert blocks[0][1] > 0   # rank 0 always has the first batch
                sizes = [-(-(hi - lo) // b) for lo, hi in blocks]
                assert max(sizes) - min(sizes) <= 1


def test_step_seeds_differ_by_step_and_rank_and_are_fixed():
    seeds = {gdist.step_seed(s, k, r) for s in (0, 1) for k in range(50) for r in range(4)}
    assert len(seeds) == 400 and all(0 <= x < 2**63 for x in seeds)
    assert gdist.step_seed(3, 7, 1) == gdist.step_seed(3, 7, 1)


def test_a_rank_takes_its_slice_of_the_global_batch():
    digits = load("digits", "train", image_size=16)
    whole = train_mod.Batcher(digits, 16, torch.Generator().manual_seed(0), "cpu")
    parts = [train_mod.Batcher(digits, 16, torch.Generator().manual_seed(0), "cpu", part=(r, 2)) for r in range(2)]
    for _ in range(200):   # past a reshuffle: 1437 rows, 89 batches of 16 per epoch
        x = whole.next().x
        assert torch.equal(torch.cat([p.next().x for p in parts]), x)
    with pytest.raises(ValueError, match="does not divide"):
        train_mod.Batcher(digits, 15, torch.Generator(), "cpu", part=(0, 2))


def test_one_process_has_no_process_group():
    assert not gdist.launched() and gdist.current() is None and gdist.world() == 1 and gdist.is_main()
    assert gdist.place(torch.device("cpu")) == torch.device("cpu")


def test_under_torchrun_the_plan_refuses_what_the_ranks_cannot_do(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    suite = load_suite(str(write_suite(tmp_path)))   # vae at batch 32
    with pytest.raises(UserError, match=r"does not divide over 3 ranks.*vae \(32\)"):
        runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--jobs 2"):
        runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", jobs=2))
    with pytest.raises(UserError, match="--executor ray"):
        runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", executor="ray"))
    with pytest.raises(UserError, match="cuda:LOCAL_RANK"):
        gdist.place(torch.device("cuda", 0))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu"))
    assert p.opts.progress is False and runner.effective_jobs(p) == 1   # rank 1: no bars, one run at a time


def test_nproc_starts_torchrun_with_the_same_arguments(tmp_path, monkeypatch):
    suite = write_suite(tmp_path)
    seen = {}

    class Exec(Exception):
        pass

    def fake_exec(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise Exec()

    monkeypatch.setattr(os, "execvpe", fake_exec)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = ["run", "--suite", str(suite), "--device", "cpu", "--results-dir", str(tmp_path / "r"), "--no-bf16",
            "--budget-kimg", "0.1", "--no-progress"]
    res = CliRunner().invoke(cli_main, [*args[:1], "--nproc", "2", *args[1:]])
    assert isinstance(res.exception, Exec), res.output
    assert seen["argv"][:6] == torchrun_argv(2, [])[:6] == [PY, "-m", "torch.distributed.run", "--standalone",
                                                           "--nproc_per_node=2", "-m"]
    rest = seen["argv"][6:]
    assert rest[:2] == ["genbench", "run"] and "--nproc" not in rest
    pairs = {rest[i]: rest[i + 1] for i in range(2, len(rest) - 1) if rest[i].startswith("--")}
    assert pairs["--suite"] == str(suite) and pairs["--device"] == "cpu" and pairs["--budget-kimg"] == "0.1"
    assert "--no-bf16" in rest and "--no-progress" in rest and "--bf16" not in rest
    assert seen["env"]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    # what the ranks would refuse is said once, before anything starts
    res = CliRunner().invoke(cli_main, ["run", "--nproc", "3", *args[1:]])
    assert res.exit_code == 2 and "does not divide over 3 ranks" in res.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli_main, ["run", "--nproc", "2", *args[1:]])
    assert res.exit_code == 2 and "already is one of 2 ranks" in res.output
