"""Run leases (genbench/lease.py): atomic claims, heartbeats, staleness, takeover, token re-adoption,
and the runner skipping, taking over and releasing runs through them."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from genbench import lease, runner, store
from genbench.config import load_suite
from helpers import write_suite


def fake_holder(run_dir, *, host="elsewhere", pid=4242, age_s=0.0, state="running", token="t-old", job=None,
                heartbeat_s=0.1, name=lease.LEASE_FILE):
    """A lease file as another process would have written it, last touched `age_s` ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    h = lease.Holder(token=token, host=host, pid=pid, state=state, since=time.time() - age_s, who="genbench run",
                     job=job, heartbeat_s=heartbeat_s, run="x")
    path = run_dir / name
    path.write_bytes(h.to_json())
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_acquire_writes_a_complete_lease_and_release_removes_it(tmp_path):
    got = lease.acquire(tmp_path / "run", stale_after_s=5, who="test", run="s/d/c/seed0")
    assert isinstance(got, lease.Lease)
    d = json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())
    assert d["host"] == lease.HOST and d["pid"] == os.getpid() and d["token"] == got.token
    assert d["state"] == "running" and d["since"] <= time.time() and d["who"] == "test"
    assert d["heartbeat_s"] == pytest.approx(0.5)
    again = lease.acquire(tmp_path / "run", stale_after_s=5)
    assert isinstance(again, lease.Holder) and again.token == got.token      # held: the holder comes back
    assert f"{lease.HOST} pid {os.getpid()} (test) since " in again.describe()
    got.release()
    assert list((tmp_path / "run").iterdir()) == []                           # nothing left behind


def test_heartbeat_keeps_a_lease_fresh_and_release_stops_it(tmp_path):
    run = tmp_path / "run"
    with lease.acquire(run, stale_after_s=0.5) as got:                        # heartbeat every 0.05 s
        t0 = (run / lease.LEASE_FILE).stat().st_mtime
        time.sleep(1.0)                                                       # twice the stale time
        assert (run / lease.LEASE_FILE).stat().st_mtime > t0
        other = lease.acquire(run, stale_after_s=0.5)
        assert isinstance(other, lease.Holder) and other.token == got.token   # renewed: not stale
    assert not (run / lease.LEASE_FILE).exists() and not got._thread.is_alive()


def test_silent_lease_is_stale_after_the_stale_time_and_taken_over(tmp_path):
    run = tmp_path / "run"
    fake_holder(run, age_s=1.0)
    held = lease.acquire(run, stale_after_s=5)
    assert isinstance(held, lease.Holder) and held.host == "elsewhere" and held.pid == 4242
    assert "elsewhere pid 4242 (genbench run) since" in held.describe()
    got = lease.acquire(run, stale_after_s=0.5)                               # a reader with a shorter time
    assert isinstance(got, lease.Lease) and got.took_over.token == "t-old" and "no heartbeat" in got.why
    assert got.path.name == "lease.after-t-old.json"
    assert lease.holder(run).token == got.token
    got.release()
    assert list(run.iterdir()) == []                                          # the whole chain is gone


def test_reader_never_calls_a_holder_stale_before_three_of_its_heartbeats(tmp_path):
    run = tmp_path / "run"
    fake_holder(run, age_s=2.0, heartbeat_s=60.0)     # renews every minute: 2 s of silence is normal
    assert isinstance(lease.acquire(run, stale_after_s=0.5), lease.Holder)
    assert lease.staleness(lease.holder(run), 0.5, now=time.time() + 200) is not None


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                               # a pid nobody has now
    run = tmp_path / "run"
    fake_holder(run, host=lease.HOST, pid=proc.pid, age_s=0.0)
    h = lease.holder(run)
    h.pidns = lease._pidns()
    (run / lease.LEASE_FILE).write_bytes(h.to_json())
    got = lease.acquire(run, stale_after_s=600)
    assert isinstance(got, lease.Lease) and f"process {proc.pid} is gone" == got.why
    got.release()


@pytest.mark.parametrize("fresh", [True, False])
def test_only_one_of_many_claimants_wins(tmp_path, fresh):
    """Eight threads claim at once, twenty times over: a free run, or a stale lease to take over."""
    for round_ in range(20):
        run = tmp_path / f"run{round_}"
        if not fresh:
            fake_holder(run, age_s=10.0)
        barrier = threading.Barrier(8)
        results = []

        def claim():
            barrier.wait()
            results.append(lease.acquire(run, stale_after_s=1.0))

        threads = [threading.Thread(target=claim) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if isinstance(r, lease.Lease)]
        assert len(winners) == 1, [type(r).__name__ for r in results]
        assert all(r.token == winners[0].token for r in results if isinstance(r, lease.Holder))
        assert lease.holder(run).token == winners[0].token


def test_lost_lease_is_noticed_and_never_released_over_the_new_holder(tmp_path):
    run = tmp_path / "run"
    old = lease.acquire(run, stale_after_s=0.5)
    old.on_lost = lambda ls: None                     # no interrupt of this test's main thread
    os.utime(old.path, (time.time() - 10, time.time() - 10))   # as if it had been silent (stalled)
    new = lease.acquire(run, stale_after_s=0.5)
    assert isinstance(new, lease.Lease)
    assert old.renew() is False and old.lost.token == new.token
    old.release()
    assert lease.holder(run).token == new.token       # the new holder's files are untouched
    new.release()
    assert list(run.iterdir()) == []


def test_lost_lease_interrupts_the_main_thread(tmp_path):
    run = tmp_path / "run"
    got = lease.acquire(run, stale_after_s=0.5)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        with got:
            lease._link_new(lease._successor(run, got.token), lease.Holder(token="thief").to_json())
            for _ in range(300):                      # work (in Python: the interrupt lands between steps)
                time.sleep(0.01)                      # the heartbeat (0.05 s) notices and interrupts
    assert got.interrupted and got.lost.token == "thief" and time.time() - t0 < 2.0
    assert lease.holder(run).token == "thief"


def test_same_token_takes_its_queued_or_requeued_lease_back(tmp_path):
    for state in ("queued", "requeued"):
        run = tmp_path / state
        fake_holder(run, state=state, token="job-token", job={"engine": "none"}, age_s=0.0)
        assert isinstance(lease.acquire(run, stale_after_s=60), lease.Holder)   # others: held
        got = lease.acquire(run, stale_after_s=60, token="job-token", who="submitit job 1")
        assert isinstance(got, lease.Lease) and got.readopted and got.path.name == lease.LEASE_FILE
        d = json.loads(got.path.read_text())
        assert d["state"] == "running" and d["pid"] == os.getpid() and d["who"] == "submitit job 1"
        got.release()


def test_same_token_waits_for_its_previous_incarnation_to_go_stale(tmp_path):
    run = tmp_path / "run"
    fake_holder(run, token="task-token", age_s=0.0)              # fresh, on another host
    t0 = time.time()
    assert isinstance(lease.acquire(run, stale_after_s=1.0, token="task-token"), lease.Holder)
    got = lease.acquire(run, stale_after_s=1.0, token="task-token", wait_own=True)
    assert isinstance(got, lease.Lease) and got.readopted and 0.9 < time.time() - t0 < 10
    got.release()


def test_unreadable_lease_goes_stale_by_its_mtime(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / lease.LEASE_FILE).write_text("{not json")
    assert isinstance(lease.acquire(run, stale_after_s=60), lease.Holder)
    t = time.time() - 120
    os.utime(run / lease.LEASE_FILE, (t, t))
    got = lease.acquire(run, stale_after_s=60)
    assert isinstance(got, lease.Lease)
    got.release()


def test_stale_time_from_the_environment(monkeypatch):
    assert lease.stale_after() == 600.0
    monkeypatch.setenv(lease.STALE_ENV, "2.5")
    assert lease.stale_after() == 2.5 and lease.stale_after(7) == 7.0
    monkeypatch.setenv(lease.STALE_ENV, "soon")
    with pytest.raises(Exception, match="GENBENCH_LEASE_STALE_S"):
        lease.stale_after()


# --------------------------------------------------------------------------- the runner through leases


def test_runner_skips_a_held_run_then_takes_it_over_when_stale(tmp_path, monkeypatch):
    attempts = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(runner.ATTEMPT_LOG_ENV, str(attempts))
    suite = load_suite(str(write_suite(tmp_path, seeds=2, budget_kimg=0.1)))
    opts = runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False, lease_stale_s=1.0)
    p = runner.plan(suite, opts)
    seed1 = store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 1)
    fake_holder(seed1, age_s=0.0, heartbeat_s=10.0)                # another host trains seed 1 right now
    lines = []
    counts = runner.run_suite(p, log=lines.append)
    assert counts == {"complete": 1, "diverged": 0, "failed": 0, "skipped": 1}
    held = [ln for ln in lines if "seed1" in ln]
    assert len(held) == 1 and "held by elsewhere pid 4242 (genbench run) since" in held[0] and "skipped" in held[0]
    assert not (seed1 / store.METRICS_FILE).exists()
    t = time.time() - 60                                          # its holder went silent
    os.utime(seed1 / lease.LEASE_FILE, (t, t))
    lines = []
    counts = runner.run_suite(p, log=lines.append)
    assert counts == {"complete": 1, "diverged": 0, "failed": 0, "skipped": 1}
    assert any("took over the stale lease of elsewhere pid 4242" in ln for ln in lines)
    assert sorted(os.listdir(seed1)) == sorted(os.listdir(seed1.parent / "seed0"))   # no lease left
    runs = [json.loads(ln)["run"] for ln in attempts.read_text().splitlines()]
    assert runs == ["tiny/digits/vae/seed0", "tiny/digits/vae/seed1"]           # each trained once
    assert runner.run_suite(p, log=lines.append)["skipped"] == 2


def test_runner_finished_meanwhile_is_skipped_under_the_lease(tmp_path):
    """A run another process finished between the look at the tree and the claim is not redone."""
    suite = load_suite(str(write_suite(tmp_path, budget_kimg=0.1)))
    p = runner.resolved_plan(runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu",
                                                                  progress=False)))
    ds, card, seed = next(p.runs())
    assert runner.execute_run(p, ds, card, seed, "t")[0] == "complete"
    status, line = runner.execute_run(p, ds, card, seed, "t")
    assert status == "skipped" and "finished meanwhile" in line
    assert not (p.run_dir(ds, card, seed) / lease.LEASE_FILE).exists()


def test_rerun_sets_the_old_run_aside_under_its_lease(tmp_path):
    suite = load_suite(str(write_suite(tmp_path, budget_kimg=0.1)))
    p = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False))
    assert runner.run_suite(p, log=lambda s: None)["complete"] == 1
    p2 = runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "r", device="cpu", progress=False,
                                              budget_kimg=0.13, rerun=True))
    lines = []
    assert runner.run_suite(p2, log=lines.append)["complete"] == 1
    assert any("redone (--rerun); the old folder is now .replaced-seed0-1" in ln for ln in lines), lines
    rdir = store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 0)
    old = rdir.parent / ".replaced-seed0-1"
    assert sorted(os.listdir(old)) == sorted(os.listdir(rdir))                  # all of it, and no lease
    assert json.loads((old / store.METRICS_FILE).read_text())["training"]["budget_kimg"] == 0.1
    assert json.loads((rdir / store.METRICS_FILE).read_text())["training"]["budget_kimg"] == 0.13


# --------------------------------------------------------------------------- the real CLI, several processes

GENBENCH = [sys.executable, "-m", "genbench"]


def cli_env(tmp_path, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="true", GENBENCH_ATTEMPT_LOG=str(tmp_path / "attempts.jsonl"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli_run(suite, results, env, **kw):
    return subprocess.Popen([*GENBENCH, "run", "--suite", str(suite), "--results-dir", str(results), "--device", "cpu",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def tree_of(root):
    from test_executors import files, main_metrics

    return files(root), main_metrics(root)


@pytest.mark.slow
def test_two_cli_runs_on_one_results_folder_train_every_run_once(tmp_path):
    suite = write_suite(tmp_path, seeds=4, budget_kimg=0.1)
    env = cli_env(tmp_path)
    a, b = cli_run(suite, tmp_path / "r", env), cli_run(suite, tmp_path / "r", env)
    (ra, oa, ea), (rb, ob, eb) = finish(a), finish(b)
    assert ra == 0 and rb == 0, ea + eb
    runs = [json.loads(ln)["run"] for ln in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert sorted(runs) == [f"tiny/digits/vae/seed{s}" for s in range(4)]      # 4 trainings for 4 runs
    summary = oa + ob
    assert sum(int(n) for n in re.findall(r"(\d+) complete", summary)) == 4, summary
    held = [ln for ln in (ea + eb).splitlines() if "held by" in ln]
    assert all(f"{lease.HOST} pid " in ln and " since " in ln and ln.endswith("skipped") for ln in held)
    (tmp_path / "attempts.jsonl").unlink()
    rc, _, err = finish(cli_run(suite, tmp_path / "single", env))
    assert rc == 0, err
    assert tree_of(tmp_path / "r") == tree_of(tmp_path / "single")
    assert not list((tmp_path / "r").rglob("lease*.json"))


@pytest.mark.slow
def test_kill_9_holder_then_next_run_takes_over_once_stale_and_resumes(tmp_path):
    """A `genbench run` killed with SIGKILL mid-training leaves its lease and checkpoint. As if it had run on
    another host (its pid cannot be checked from here), the lease holds until it is stale: a run with the
    default stale time skips the run, naming the holder; one with a short stale time takes it over and
    resumes from the checkpoint, and the result equals an uninterrupted run's."""
    suite = write_suite(tmp_path, budget_kimg=1.6)
    env = cli_env(tmp_path, GENBENCH_CHECKPOINT_EVERY_S=0, GENBENCH_LEASE_STALE_S=3)
    rdir = store.run_dir(tmp_path / "r", "tiny", "digits", "vae", 0)
    victim = cli_run(suite, tmp_path / "r", env)
    deadline = time.time() + 300
    while not (rdir / store.CHECKPOINT_FILE).exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.kill()
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    h = lease.holder(rdir)
    assert h is not None and h.pid == victim.pid and (rdir / store.CHECKPOINT_FILE).exists()
    assert not (rdir / store.METRICS_FILE).exists()
    moved = json.loads((rdir / lease.LEASE_FILE).read_text())
    moved["host"] = "node17"                                  # the holder lived on another machine
    (rdir / lease.LEASE_FILE).write_text(json.dumps(moved))   # (touched now: fresh)
    rc, out, err = finish(cli_run(suite, tmp_path / "r", dict(env, GENBENCH_LEASE_STALE_S="600")))
    assert rc == 0 and f"held by node17 pid {victim.pid} (genbench run) since " in err and "1 skipped" in out, err
    time.sleep(3.5)
    rc, out, err = finish(cli_run(suite, tmp_path / "r", env))
    assert rc == 0 and "1 complete" in out, err
    assert f"took over the stale lease of node17 pid {victim.pid}" in err and "no heartbeat for" in err
    tries = [json.loads(ln) for ln in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert len(tries) == 2 and tries[0]["resumed_from_kimg"] is None and 0 < tries[1]["resumed_from_kimg"] < 1.6
    assert f"resumes from its checkpoint at {tries[1]['resumed_from_kimg']:.4g} kimg" in err
    rc, _, err = finish(cli_run(suite, tmp_path / "whole", env))
    assert rc == 0, err
    assert tree_of(tmp_path / "r") == tree_of(tmp_path / "whole")
    a = torch.load(rdir / store.MODEL_FILE, weights_only=True)
    b = torch.load(store.run_dir(tmp_path / "whole", "tiny", "digits", "vae", 0) / store.MODEL_FILE, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "r").rglob("lease*.json"))


def test_lost_lease_interrupts_a_process_that_ignores_sigint(tmp_path):
    """A process started in the background by a script (`cmd &` without job control, nohup) inherits
    SIGINT ignored, where interrupt_main() alone does nothing: the lease still stops the duplicate work,
    and an outside Ctrl-C stays ignored, inside the lease and after it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from genbench import lease
        run = {str(tmp_path / "run")!r}
        got = lease.acquire(run, stale_after_s=0.5)
        try:
            with got:
                os.kill(os.getpid(), signal.SIGINT)        # an outside Ctrl-C: still ignored
                time.sleep(0.2)
                lease._link_new(lease._successor(got.run_dir, got.token), lease.Holder(token="thief").to_json())
                for _ in range(300):
                    time.sleep(0.01)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", got.interrupted)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        print("after: ignored")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["interrupted True", "after: ignored"], out.stdout
