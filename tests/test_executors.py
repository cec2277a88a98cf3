"""Executors (genbench/executors/): local, submitit (its local and debug clusters stand in for Slurm) and
Ray. Whatever the executor, the results tree equals a local run's, and no run is trained twice."""
import json
import os
import pickle
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from genbench import lease, runner, store
from genbench.config import load_suite
from genbench.errors import UserError
from helpers import write_suite

TESTS = Path(__file__).resolve().parent


def files(root: Path) -> list[str]:
    """Every file of a results tree but hidden ones (.cache, .submitit, set-aside folders)."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def main_metrics(root: Path) -> dict:
    out = {}
    for m in Path(root).rglob(store.METRICS_FILE):
        d = json.loads(m.read_text())
        out[str(m.parent.relative_to(root))] = (d["status"], d["metrics"], d["sampling"].get("nfe"), d["sweeps"])
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    assert files(a) == files(b)
    ma, mb = main_metrics(a), main_metrics(b)
    assert ma == mb and ma
    for rel in ma:
        wa = torch.load(Path(a) / rel / store.MODEL_FILE, weights_only=True)
        wb = torch.load(Path(b) / rel / store.MODEL_FILE, weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel


def attempts(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def local_reference(tmp_path, suite_path, name="ref", **kw) -> Path:
    """The same suite run locally in this process (one thread, as the jobs below)."""
    suite = load_suite(str(suite_path))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / name, device="cpu", progress=False, **kw))
    counts = runner.run_suite(p, log=lambda s: None)
    assert counts["failed"] == 0
    return tmp_path / name


# --------------------------------------------------------------------------- options and engines


@pytest.mark.parametrize("engine, module, extra", [("ray", "ray", "ray"), ("submitit", "submitit", "slurm")])
def test_missing_engine_is_one_line_before_any_work(tmp_path, monkeypatch, engine, module, extra):
    monkeypatch.setitem(sys.modules, module, None)           # `import ray` now raises ImportError
    suite = load_suite(str(write_suite(tmp_path)))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False,
                                             executor=engine))
    with pytest.raises(UserError) as e:
        runner.run_suite(p, log=lambda s: None)
    assert str(e.value) == f"--executor {engine} needs {'Ray' if engine == 'ray' else 'submitit'}: " \
                           f"pip install 'genbench[{extra}]'"
    assert not (tmp_path / "r").exists()                     # nothing written


def test_bad_executor_options_fail_before_any_work(tmp_path):
    suite = load_suite(str(write_suite(tmp_path)))
    for kw, msg in [({"executor": "k8s"}, "not one of local, submitit, ray"),
                    ({"wait": False}, "--no-wait needs --executor submitit"),
                    ({"cluster": {"gpus": 1}}, "unknown key 'cluster.gpus'"),
                    ({"executor": "submitit", "cluster": {"submitit_cluster": "pbs"}}, "must be one of slurm")]:
        p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False, **kw))
        with pytest.raises(UserError, match=msg):
            runner.run_suite(p, log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_suite_cluster_block_is_checked_when_loaded(tmp_path):
    path = write_suite(tmp_path)
    base = path.read_text()
    path.write_text(base + "cluster: {partition: gpu, gpus_per_task: 1, cpus_per_task: 8, time_min: 240, "
                           "mem_gb: 32, slurm: {exclude: node3}, setup: ['module load cuda']}\n")
    suite = load_suite(str(path))
    assert suite.cluster == {"partition": "gpu", "gpus_per_task": 1, "cpus_per_task": 8, "time_min": 240,
                             "mem_gb": 32, "slurm": {"exclude": "node3"}, "setup": ["module load cuda"]}
    assert load_suite(str(write_suite(tmp_path, name="plain"))).cluster == {}
    for block, msg in [("{gpu: 1}", "unknown key 'cluster.gpu'"), ("{cpus_per_task: 0}", "at least 1"),
                       ("{time_min: soon}", "whole number"), ("[gpu]", "must be a mapping"),
                       ("{setup: module load}", "list of strings")]:
        path.write_text(base + f"cluster: {block}\n")
        with pytest.raises(UserError, match=msg):
            load_suite(str(path))


def test_checkpoint_interval_from_options_or_environment(monkeypatch):
    assert runner.checkpoint_interval(runner.RunOptions()) == 60.0
    monkeypatch.setenv(runner.CHECKPOINT_ENV, "0")
    assert runner.checkpoint_interval(runner.RunOptions()) == 0.0
    assert runner.checkpoint_interval(runner.RunOptions(checkpoint_every_s=5)) == 5.0
    monkeypatch.setenv(runner.CHECKPOINT_ENV, "-1")
    with pytest.raises(UserError, match="GENBENCH_CHECKPOINT_EVERY_S"):
        runner.checkpoint_interval(runner.RunOptions())


# --------------------------------------------------------------------------- submitit


@pytest.mark.slow
def test_submitit_checkpoint_then_resubmit_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    """submitit's checkpointing, as its own tests exercise it: the job's callable is interrupted after a
    checkpoint.pt, its `checkpoint` method gives the DelayedSubmission, which is resubmitted (debug
    executor: in this process) and finishes the run from the checkpoint; the result equals a local run."""
    submitit = pytest.importorskip("submitit")
    from genbench.executors.submitit_executor import SubmititRun

    log = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(runner.ATTEMPT_LOG_ENV, str(log))
    suite_path = write_suite(tmp_path, budget_kimg=0.32)
    ref = local_reference(tmp_path, suite_path)
    suite = load_suite(str(suite_path))
    p = runner.resolved_plan(runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu",
                                                                  progress=False, executor="submitit")))
    ds, card, seed = next(p.runs())
    rdir = p.run_dir(ds, card, seed)
    # The submitter's queued lease, then the job's first incarnation: it takes its lease back by token
    # and trains until submitit signals it (here: half the budget, a checkpoint after every step).
    queued = lease.acquire(rdir, stale_after_s=p.opts.lease_stale_s, state="queued", who="submitit")
    fn = SubmititRun(p, ds, card, seed, "[1/1] tiny", queued.token, "debug", 1)
    first = lease.acquire(rdir, token=fn.token, who="submitit job 1")
    assert first.readopted
    fn._keep(first)
    torch.manual_seed(seed)
    model = runner.build_model(card, p.specs[ds.name], "cpu")
    from genbench import train as train_mod

    train_mod.train(model, runner._load(ds, "train", p.opts), budget_kimg=0.16, batch_size=card.batch_size,
                    seed=seed, run_dir=rdir, ema_decay=card.ema, checkpoint_every_s=0.0, progress=False)
    delayed = fn.checkpoint()                                    # what submitit's signal handler calls
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is fn
    assert json.loads((rdir / lease.LEASE_FILE).read_text())["state"] == "requeued"
    assert first.suspended and not first.released                # heartbeat stopped, lease kept
    resubmitted = pickle.loads(pickle.dumps(delayed))            # as submitit dumps it for the requeue
    job = submitit.DebugExecutor(tmp_path / "jobs").submit(resubmitted.function, *resubmitted.args)
    status, line = job.submission().result()
    assert status == "complete" and "resumes from its checkpoint at 0.16 kimg" in line
    assert [a["resumed_from_kimg"] for a in attempts(log) if a["results_dir"].endswith("/r")] == [0.16]
    assert not (rdir / lease.LEASE_FILE).exists() and not (rdir / store.CHECKPOINT_FILE).exists()
    assert_same_tree(ref, tmp_path / "r")


def test_submitit_slurm_job_script_carries_the_cluster_block(tmp_path, monkeypatch):
    """No Slurm here: the sbatch script submitit would submit, built from a suite's cluster block."""
    pytest.importorskip("submitit")
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")     # as on a login node
    path = write_suite(tmp_path)
    path.write_text(path.read_text() + "cluster: {partition: gpu, gpus_per_task: 1, cpus_per_task: 8, time_min: 240, "
                                       "mem_gb: 0.5, array_parallelism: 16, account: proj, max_requeues: 5, "
                                       "setup: ['module load cuda'], slurm: {exclude: node3}}\n")
    p = runner.plan(load_suite(str(path)), runner.RunOptions(results_dir=tmp_path / "r", device="cpu",
                                                             executor="submitit", cluster={"time_min": 30}))
    from genbench.executors import get_executor

    ex = get_executor(p).make_executor(p)
    script = ex._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ["--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=30", "--mem=512M",
                 "--account=proj", "--exclude=node3", "--signal=USR2@", "--ntasks-per-node=1", "module load cuda"]:
        assert line in script, line
    assert ex.max_num_timeout == 5 and ex.parameters["array_parallelism"] == 16
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="no `sbatch` on this machine's PATH"):
        get_executor(p)


@pytest.mark.slow
def test_submitit_debug_cluster_runs_in_this_process_and_matches_local(tmp_path):
    pytest.importorskip("submitit")
    suite_path = write_suite(tmp_path, budget_kimg=0.1)
    ref = local_reference(tmp_path, suite_path)
    p = runner.plan(load_suite(str(suite_path)), runner.RunOptions(
        results_dir=tmp_path / "r", device="cpu", progress=False, executor="submitit",
        cluster={"submitit_cluster": "debug"}))
    lines = []
    assert runner.run_suite(p, log=lines.append)["complete"] == 1, lines
    assert_same_tree(ref, tmp_path / "r")


@pytest.mark.slow
def test_submitit_local_jobs_no_wait_then_collect_equal_a_local_run(tmp_path, monkeypatch):
    """Two runs as two submitit jobs (local processes): --no-wait returns at once, a later run_suite
    finds them in their leases, waits for them without submitting again, and the tree equals a local
    run's (same files, same metrics, same weights)."""
    pytest.importorskip("submitit")
    log = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(runner.ATTEMPT_LOG_ENV, str(log))
    suite_path = write_suite(tmp_path, seeds=2, budget_kimg=0.1)
    ref = local_reference(tmp_path, suite_path)
    suite = load_suite(str(suite_path))
    cluster = {"submitit_cluster": "local", "cpus_per_task": 1, "time_min": 10, "poll_s": 0.5}
    opts = runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False, executor="submitit",
                             cluster=cluster, wait=False)
    p = runner.plan(suite, opts)
    lines = []
    assert runner.run_suite(p, log=lines.append) == {"complete": 0, "diverged": 0, "failed": 0, "skipped": 0,
                                                     "submitted": 2}
    assert sum("submitted as submitit job" in ln for ln in lines) == 2
    for seed in (0, 1):
        h = lease.holder(store.run_dir(tmp_path / "r", "tiny", "digits", "vae", seed))
        assert h is not None and h.job["engine"] == "submitit" and h.state in ("queued", "running")
    lines = []
    import dataclasses

    counts = runner.run_suite(dataclasses.replace(p, opts=dataclasses.replace(opts, wait=True)), log=lines.append)
    assert counts["complete"] == 2 and counts.get("submitted", 0) == 0, lines
    assert sum("already submitted" in ln for ln in lines) == 2
    assert sorted(a["run"] for a in attempts(log) if a["results_dir"].endswith("/r")) == \
        ["tiny/digits/vae/seed0", "tiny/digits/vae/seed1"]                 # each trained once, by its job
    assert runner.run_suite(p, log=lines.append)["skipped"] == 2
    assert_same_tree(ref, tmp_path / "r")


@pytest.mark.slow
def test_submitit_job_interrupted_near_its_time_limit_is_requeued_and_resumes(tmp_path, monkeypatch):
    """The signal submitit's controller sends when a job nears its time limit (USR2), sent once the run
    has a checkpoint: the job checkpoints, is requeued, takes its lease back by token and finishes from
    checkpoint.pt; the result equals an uninterrupted local run."""
    pytest.importorskip("submitit")
    from submitit.local.local import LocalJobEnvironment

    log = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(runner.ATTEMPT_LOG_ENV, str(log))
    suite_path = write_suite(tmp_path, budget_kimg=1.6)
    ref = local_reference(tmp_path, suite_path)
    suite = load_suite(str(suite_path))
    opts = runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False, executor="submitit",
                             checkpoint_every_s=0.0,
                             cluster={"submitit_cluster": "local", "cpus_per_task": 1, "time_min": 10,
                                      "max_requeues": 2, "poll_s": 0.2})
    p = runner.plan(suite, opts)
    rdir = store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 0)
    out = {"lines": []}
    waiter = threading.Thread(target=lambda: out.update(counts=runner.run_suite(p, log=out["lines"].append)))
    waiter.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        h = lease.holder(rdir)
        if h is not None and h.state == "running" and (rdir / store.CHECKPOINT_FILE).exists():
            break
        time.sleep(0.02)
    else:
        pytest.fail("the job never started training")
    os.kill(h.pid, LocalJobEnvironment._usr_sig())            # "your time is nearly up"
    waiter.join(300)
    assert out["counts"]["complete"] == 1, out
    tries = [a for a in attempts(log) if a["results_dir"].endswith("/r")]
    assert len(tries) == 2 and tries[0]["resumed_from_kimg"] is None
    assert 0 < tries[1]["resumed_from_kimg"] < 1.6 and tries[0]["token"] == tries[1]["token"]
    assert tries[0]["pid"] != tries[1]["pid"]                 # a new process: the requeued job
    logs = "".join(f.read_text() for f in (tmp_path / "r" / ".submitit").rglob("*.out"))
    assert "checkpointing for a requeue" in logs and "Requeued job" in "".join(
        f.read_text() for f in (tmp_path / "r" / ".submitit").rglob("*.err")) + logs
    assert not (rdir / lease.LEASE_FILE).exists()
    assert_same_tree(ref, tmp_path / "r")


# --------------------------------------------------------------------------- Ray


def crash_once(plan, ds, card, seed, tag, **kw):
    """Ray's stand-in for execute_run (imported by the workers from this file): the first attempt at seed 2
    trains half its budget, checkpointing, and then its worker process dies."""
    marker = Path(os.environ["GENBENCH_TEST_CRASH_MARKER"])
    if seed == 2 and not marker.exists():
        marker.write_text(str(os.getpid()))
        real = runner.train

        def train_then_die(model, data, **tkw):
            real(model, data, **{**tkw, "budget_kimg": tkw["budget_kimg"] / 2, "checkpoint_every_s": 0.0})
            os._exit(1)

        runner.train = train_then_die
    return runner.execute_run(plan, ds, card, seed, tag, **kw)


@pytest.mark.slow
def test_ray_runs_four_runs_and_retries_a_dead_worker_from_its_checkpoint(tmp_path, monkeypatch):
    """ray.init(num_cpus=2), four runs; seed 2's worker dies mid-training once. Ray retries that task, whose
    retry takes its own lease back (same token, dead pid) and resumes from the checkpoint: every run
    complete, none trained twice at once, the tree equal to a local run's."""
    ray = pytest.importorskip("ray")
    from genbench.executors import ray_executor

    log = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(runner.ATTEMPT_LOG_ENV, str(log))
    monkeypatch.setenv("GENBENCH_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    suite_path = write_suite(tmp_path, seeds=4, budget_kimg=0.32)
    ref = local_reference(tmp_path, suite_path)
    monkeypatch.setattr(ray_executor.RayExecutor, "run_fn", staticmethod(crash_once))
    suite = load_suite(str(suite_path))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False,
                                             executor="ray", cluster={"cpus_per_task": 1, "max_retries": 1}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lines = []
        counts = runner.run_suite(p, log=lines.append)
    finally:
        ray.shutdown()
    assert counts == {"complete": 4, "diverged": 0, "failed": 0, "skipped": 0}, lines
    assert (tmp_path / "crashed").exists()
    tries = [a for a in attempts(log) if a["results_dir"].endswith("/r")]
    by_run = {}
    for a in tries:
        by_run.setdefault(a["run"], []).append(a)
    assert sorted(by_run) == [f"tiny/digits/vae/seed{s}" for s in range(4)]
    assert all(len(v) == 1 for k, v in by_run.items() if not k.endswith("seed2"))
    first, retry = by_run["tiny/digits/vae/seed2"]                 # the crash and Ray's retry, one after the other
    assert first["token"] == retry["token"] and first["pid"] != retry["pid"]
    assert first["resumed_from_kimg"] is None and retry["resumed_from_kimg"] == pytest.approx(0.16)
    assert_same_tree(ref, tmp_path / "r")
