"""`--executor submitit`: each pending run is one Slurm job (one job array per invocation), through
submitit. Options come from the suite's `cluster:` block and the command line (partition, GPUs and
CPUs per run, time limit, memory, ...); `submitit_cluster: local` runs the same jobs as local
processes and `debug` in this process (both for trying things out and for the tests).

Claiming: before submitting, this process takes each run's lease in state `queued` with a fresh token,
then writes the job's id into it; the job takes the lease back by that token when it starts (state
`running`, heartbeat). A later `genbench run` sees queued and running runs in their lease files: it
skips them (and, waiting, watches them until they end), never submits them twice; a queued lease is
stale only once its job is known to have ended (sacct, through submitit).

Requeue: the job is a callable object with a `checkpoint` method (submitit's checkpointing). When Slurm
preempts it or its time limit nears, submitit calls `checkpoint`, which leaves the lease to the job's
next incarnation (state `requeued`) and returns the same callable as a DelayedSubmission; submitit
requeues the job, which takes its lease back by its token and train() resumes from checkpoint.pt (saved
every checkpoint_every_s). A job that times out more than `max_requeues` times records the run
`failed`; the next `genbench run` retries it from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Iterator

from genbench.errors import UserError

MISSING = "--executor submitit needs submitit: pip install 'genbench[slurm]'"
ALIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                      "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED", "RESV_DEL_HOLD"}


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(MISSING) from None
    return submitit


def job_alive(job: dict) -> bool | None:
    """Whether a submitted job still lives (queued, running, requeued): True, False, or None when it
    cannot be told from here. Used by the lease rules for queued and requeued leases."""
    from genbench.lease import HOST, _pid_gone

    cluster = job.get("cluster")
    if cluster in ("local", "debug"):
        # local: the job id is its controller's pid; debug: it runs inside the submitting process
        pid = job.get("pid")
        if job.get("host") != HOST or not isinstance(pid, int):
            return None
        return not _pid_gone(pid)
    try:
        import submitit
    except ImportError:
        return None
    try:
        state = submitit.SlurmJob(job["folder"], str(job["job_id"])).get_info(mode="standard").get("State") or "UNKNOWN"
    except Exception:  # noqa: BLE001 - no sacct here, or it failed: unknown
        return None
    state = state.split()[0].upper()
    if state == "UNKNOWN":
        return None
    return state in ALIVE_SLURM_STATES


class SubmititRun:
    """The callable a job runs: one run of the plan, claimed by `token` (kept across requeues)."""

    def __init__(self, plan, ds, card, seed: int, tag: str, token: str, cluster_name: str, threads: int | None):
        self.plan, self.ds, self.card, self.seed, self.tag = plan, ds, card, seed, tag
        self.token, self.cluster_name, self.threads = token, cluster_name, threads
        self.requeues = 0
        self._lease = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_lease"] = None        # a live lease (thread, lock) stays in the process that holds it
        return d

    def _job(self) -> dict:
        import socket

        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") and \
            f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        job_id = job_id or os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or \
            os.environ.get("SUBMITIT_DEBUG_JOB_ID") or "?"
        info = {"engine": "submitit", "cluster": self.cluster_name, "job_id": job_id, "host": socket.gethostname(),
                "folder": os.environ.get("SUBMITIT_FOLDER")}
        if self.cluster_name == "local" and job_id.isdigit():
            info["pid"] = int(job_id)          # the local controller, which restarts a requeued job
        elif self.cluster_name == "debug":
            info["pid"] = os.getpid()
        return info

    def __call__(self) -> tuple[str, str]:
        import torch

        from genbench.runner import execute_run

        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0)
        if threads:
            torch.set_num_threads(threads)
        job = self._job()
        status, line = execute_run(self.plan, self.ds, self.card, self.seed, self.tag, token=self.token,
                                   who=f"submitit job {job['job_id']}", job=job, wait_own=True,
                                   on_lease=self._keep)
        print(line, flush=True)   # the job's own log
        return status, line

    def _keep(self, lease) -> None:
        self._lease = lease

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or near the time limit: leave the lease to the requeued job
        (same token) and resubmit this same callable; train() resumes from checkpoint.pt."""
        from submitit.helpers import DelayedSubmission

        if self._lease is not None:
            self._lease.suspend("requeued")
        self.requeues += 1
        print(f"{self.tag}: checkpointing for a requeue (#{self.requeues}); the run resumes from its "
              "last checkpoint.pt", flush=True)
        return DelayedSubmission(self, *args, **kwargs)


class SubmititExecutor:
    name = "submitit"

    def __init__(self, cluster: dict, wait: bool = True):
        self.submitit = require_submitit()
        self.cluster = dict(cluster)
        self.wait = wait
        self.which = self.cluster.get("submitit_cluster", "slurm")
        self.poll_s = float(self.cluster.get("poll_s") or (2.0 if self.which != "slurm" else 10.0))
        if self.which == "slurm":
            import shutil

            missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
            if missing:
                raise UserError(f"--executor submitit: no `{missing[0]}` on this machine's PATH (run from a Slurm "
                                "login node, or --submitit-cluster local to run the jobs as local processes)")

    # ---- building submitit's executor

    def folder(self, p) -> Path:
        return Path(self.cluster.get("folder") or Path(p.opts.results_dir) / ".submitit")

    def make_executor(self, p):
        sub, c = self.submitit, self.cluster
        folder = self.folder(p) / "%j"
        gpus = c.get("gpus_per_task")
        if gpus is not None and gpus != int(gpus):
            raise UserError(f"cluster.gpus_per_task: {gpus} is not a whole number of GPUs (Slurm)")
        if self.which == "debug":
            return sub.DebugExecutor(folder)
        if self.which == "local":
            ex = sub.LocalExecutor(folder, max_num_timeout=c.get("max_requeues", 3))
            ex.update_parameters(timeout_min=c.get("time_min", 60), tasks_per_node=1,
                                 gpus_per_node=int(gpus or 0), signal_delay_s=c.get("signal_delay_s", 30),
                                 **({"setup": c["setup"]} if c.get("setup") else {}))
            return ex
        ex = sub.SlurmExecutor(folder, max_num_timeout=c.get("max_requeues", 3))
        params = {"job_name": f"genbench-{p.suite.name}", "time": c.get("time_min", 60), "nodes": 1,
                  "ntasks_per_node": 1, "cpus_per_task": c.get("cpus_per_task"),
                  "gpus_per_node": int(gpus) if gpus else None, "partition": c.get("partition"),
                  "account": c.get("account"), "qos": c.get("qos"), "constraint": c.get("constraint"),
                  "mem": f"{math.ceil(c['mem_gb'] * 1024)}M" if c.get("mem_gb") else None,
                  "array_parallelism": c.get("array_parallelism"), "signal_delay_s": c.get("signal_delay_s"),
                  "setup": c.get("setup"), "additional_parameters": c.get("slurm")}
        try:
            ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        except (ValueError, TypeError) as e:
            raise UserError(f"--executor submitit: {str(e).splitlines()[0]}") from None
        return ex

    def _job_info(self, job) -> dict:
        from genbench.lease import HOST

        info = {"engine": "submitit", "cluster": self.which, "job_id": str(job.job_id), "host": HOST,
                "folder": str(job.paths.folder)}
        if self.which == "local":
            info["pid"] = int(job.job_id)
        elif self.which == "debug":
            info["pid"] = os.getpid()
        return info

    # ---- running

    def run(self, p, tasks, log) -> Iterator[tuple[str, str]]:
        from genbench import lease as lease_mod
        from genbench.runner import finished_state, run_key

        worker_plan = dataclasses.replace(p, opts=dataclasses.replace(p.opts, progress=False))
        threads = self.cluster.get("cpus_per_task")
        ex = self.make_executor(p) if tasks else None   # bad options fail here, before any claim
        claimed, watched = [], []
        for t in tasks:
            rdir = p.run_dir(t.ds, t.card, t.seed)
            got = lease_mod.acquire(rdir, stale_after_s=p.opts.lease_stale_s, state="queued",
                                    who=f"submitit ({self.which}), being submitted",
                                    run=run_key(p, t.ds, t.card, t.seed))
            if isinstance(got, lease_mod.Holder):
                if self.wait and (got.job or {}).get("engine") == "submitit":
                    log(f"{t.tag}: already submitted (submitit job {got.job.get('job_id')}, {got.state}); "
                        "waiting for it")
                    watched.append((t, rdir))
                else:
                    yield "skipped", f"{t.tag}: held by {got.describe()}; skipped"
                continue
            state, line = finished_state(p, t.ds, t.card, t.seed)
            if state == "skip":   # finished by another process between our look and the claim
                got.release()
                yield "skipped", f"{t.tag}: {line or 'finished meanwhile by another process, skipped'}"
                continue
            claimed.append((t, got))
        jobs = []
        if claimed:
            fns = [SubmititRun(worker_plan, t.ds, t.card, t.seed, t.tag, got.token, self.which, threads)
                   for t, got in claimed]
            try:
                jobs = ex.submit_array(fns)   # one job array on Slurm; one process per run locally
            except BaseException as e:
                for _, got in claimed:
                    got.release()
                if isinstance(e, UserError) or not isinstance(e, Exception):
                    raise
                raise UserError(f"--executor submitit: submitting failed: {str(e).strip().splitlines()[-1]}") from None
            for (t, got), job in zip(claimed, jobs):
                self._note_job(got, job)
        if not self.wait:
            for (t, _), job in zip(claimed, jobs):
                yield "submitted", f"{t.tag}: submitted as submitit job {job.job_id} ({self.which})"
            return
        yield from self._wait(p, [(t, job) for (t, _), job in zip(claimed, jobs)], watched)

    def _run_debug(self, t, job) -> tuple[str, str]:
        # DebugJob.result() opens pdb on an exception; run the submission itself, as its job would
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = str(job.job_id)
        try:
            return job.submission().result()
        except Exception as e:  # noqa: BLE001
            return "failed", f"{t.tag}: FAILED (submitit debug job: {type(e).__name__}: {str(e)[:300]})"
        finally:
            os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)

    def _note_job(self, got, job) -> None:
        """Write the job's id into our queued lease, unless the job has taken it already."""
        from genbench.lease import Holder

        try:
            h = Holder.read(got.path)
        except FileNotFoundError:
            return
        if h.token == got.token and h.state == "queued" and h.pid == os.getpid():
            got.update(who=f"submitit job {job.job_id}", job=self._job_info(job))

    def _wait(self, p, own, watched) -> Iterator[tuple[str, str]]:
        if self.which == "debug":   # runs in this process when asked for its result
            for t, job in own:
                yield self._run_debug(t, job)
            own = []
        while own or watched:
            still = []
            for t, job in own:
                if job.done():
                    yield self._outcome(t, job)
                else:
                    still.append((t, job))
            own = still
            left = []
            for t, rdir in watched:
                out = self._watch(t, rdir, p.opts.lease_stale_s)
                if out is None:
                    left.append((t, rdir))
                else:
                    yield out
            watched = left
            if own or watched:
                time.sleep(self.poll_s)

    @staticmethod
    def _outcome(t, job) -> tuple[str, str]:
        try:
            return job.result()
        except Exception as e:  # noqa: BLE001 - the job failed outside the run (import, kill, timeouts)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
            why = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else type(e).__name__)
            return "failed", f"{t.tag}: FAILED (submitit job {job.job_id}: {why.strip()[:300]})"

    @staticmethod
    def _watch(t, rdir: Path, stale_s: float) -> tuple[str, str] | None:
        """A run submitted by an earlier invocation: its outcome once it has one, else None."""
        from genbench import lease as lease_mod, store

        rec = store.try_read_record(rdir)
        h = lease_mod.holder(rdir)
        if rec is not None and rec.finished and h is None:
            return rec.status, f"{t.tag}: {rec.status} (by a job submitted earlier)"
        if h is not None and (h.job or {}).get("engine") == "submitit" and \
                lease_mod.staleness(h, stale_s) is None:
            return None
        if h is None and rec is not None and rec.status == "failed":
            return "failed", f"{t.tag}: FAILED in a job submitted earlier ({rec.error}); the next run retries it"
        if h is None:
            return "failed", f"{t.tag}: its job ended without a result; the next genbench run takes it over"
        if (h.job or {}).get("engine") != "submitit":
            return "skipped", f"{t.tag}: now held by {h.describe()}; skipped"
        return "failed", (f"{t.tag}: its job stopped without releasing the run ({h.describe()}); the next "
                          "genbench run takes it over once its lease is stale")
