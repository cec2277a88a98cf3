"""Where a suite's runs execute: `local` worker processes (the default), Slurm through `submitit`, or
`ray` tasks. The runner decides what to run (finished runs are skipped before any executor is asked);
an executor only fans the pending runs out and reports each one's outcome as it ends.

Every executor calls the same function for a run, `genbench.runner.execute_run`, in whatever process
the engine gives it: that function takes the run's lease (genbench/lease.py), checks the run again
under it, trains and evaluates through the same code as a local run, and releases the lease. So the
results tree is the same whatever the executor, and no two claimants ever train one run at once.

API (what `run_suite` uses):

    get_executor(plan) -> Executor        UserError (one line) when the engine is not installed or an
                                          option is bad: before any work
    Executor.run(plan, tasks, log)        yields (status, line) per task as it ends; status is one of
                                          complete, diverged, failed, skipped, or submitted (--no-wait)

Resources and options come from the suite's `cluster:` block, overlaid by RunOptions.cluster (the
command line); `check_cluster` is the one place that knows the keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from genbench.errors import UserError

EXECUTORS = ("local", "submitit", "ray")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")

# key -> (kind, help). Kinds: str, int0 (>= 0), int1 (>= 1), num (> 0), num0 (>= 0), strlist, map.
CLUSTER_KEYS: dict[str, tuple[str, str]] = {
    "partition": ("str", "Slurm partition"),
    "account": ("str", "Slurm account"),
    "qos": ("str", "Slurm quality of service"),
    "constraint": ("str", "Slurm node constraint (features)"),
    "gpus_per_task": ("num0", "GPUs per run (one Slurm job or Ray task per run)"),
    "cpus_per_task": ("int1", "CPUs per run; also the torch threads a run uses"),
    "mem_gb": ("num", "memory per run, GB"),
    "time_min": ("int1", "Slurm time limit per job, minutes (a timed-out job is requeued and resumes)"),
    "array_parallelism": ("int1", "at most this many array tasks of one submission run at once"),
    "max_requeues": ("int0", "time-outs after which a job is not requeued again (preemptions do not count)"),
    "signal_delay_s": ("int1", "seconds before the time limit the job is told to checkpoint (submitit's USR2)"),
    "setup": ("strlist", "shell lines run before each job (e.g. module load cuda)"),
    "slurm": ("map", "further sbatch parameters, e.g. {exclude: node3, mail-type: END}"),
    "submitit_cluster": ("str", "slurm (default), local (jobs as local processes) or debug (in this process)"),
    "folder": ("str", "submitit's job folder (pickles, logs); default RESULTS_DIR/.submitit"),
    "ray_address": ("str", "address of a running Ray cluster; unset: start a local one"),
    "max_retries": ("int0", "Ray: times a run's task is retried after its worker process dies"),
    "poll_s": ("num", "how often a waiting `genbench run` looks at submitted jobs, seconds"),
}


def check_cluster(block: Any, where: str) -> dict:
    """The `cluster:` block of a suite (or the command line's), every key and value checked."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise UserError(f"{where}: 'cluster' must be a mapping, got {type(block).__name__}")
    out = {}
    for k, v in block.items():
        if k not in CLUSTER_KEYS:
            raise UserError(f"{where}: unknown key 'cluster.{k}' (valid: {', '.join(sorted(CLUSTER_KEYS))})")
        if v is None:
            continue
        kind = CLUSTER_KEYS[k][0]
        key = f"cluster.{k}"
        if kind == "str":
            if not isinstance(v, str) or not v.strip():
                raise UserError(f"{where}: {key!r} must be a non-empty string, got {v!r}")
        elif kind in ("int0", "int1"):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if kind == "int0" else 1):
                raise UserError(f"{where}: {key!r} must be a whole number of at least "
                                f"{0 if kind == 'int0' else 1}, got {v!r}")
        elif kind in ("num", "num0"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v <= 0 if kind == "num" else v < 0):
                raise UserError(f"{where}: {key!r} must be a {'positive' if kind == 'num' else 'non-negative'} "
                                f"number, got {v!r}")
        elif kind == "strlist":
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise UserError(f"{where}: {key!r} must be a list of strings, got {v!r}")
            v = list(v)
        elif kind == "map":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v) or \
                    not all(isinstance(x, (str, int, float, bool)) for x in v.values()):
                raise UserError(f"{where}: {key!r} must map sbatch option names to values, got {v!r}")
            v = dict(v)
        out[k] = v
    if out.get("submitit_cluster") not in (None, *SUBMITIT_CLUSTERS):
        raise UserError(f"{where}: 'cluster.submitit_cluster' must be one of {', '.join(SUBMITIT_CLUSTERS)}, "
                        f"got {out['submitit_cluster']!r}")
    return out


def cluster_options(p) -> dict:
    """The suite's `cluster:` block overlaid by the command line's (RunOptions.cluster)."""
    merged = dict(getattr(p.suite, "cluster", None) or {})
    merged.update(check_cluster(p.opts.cluster or {}, "the command line"))
    return merged


@dataclass(frozen=True)
class RunTask:
    """One pending run: dataset, card and seed of the plan, and its log tag ("[i/n] suite/ds/card/seedK")."""
    ds: Any
    card: Any
    seed: int
    tag: str


class Executor(Protocol):
    name: str

    def run(self, p, tasks: list[RunTask], log) -> Iterator[tuple[str, str]]: ...


def check_engine(name: str) -> None:
    """UserError (one line) unless executor `name` exists and its engine imports: for the command line to
    call before it plans anything."""
    if name not in EXECUTORS:
        raise UserError(f"--executor: {name!r} is not one of {', '.join(EXECUTORS)}")
    if name == "submitit":
        from genbench.executors.submitit_executor import require_submitit

        require_submitit()
    elif name == "ray":
        from genbench.executors.ray_executor import require_ray

        require_ray()


def get_executor(p) -> Executor:
    """The plan's executor, its engine imported and its options checked: UserError otherwise, before any
    run starts."""
    name = p.opts.executor or "local"
    check_engine(name)
    cluster = cluster_options(p)
    if not p.opts.wait and name != "submitit":
        raise UserError(f"--no-wait needs --executor submitit (--executor {name} runs live as long as this process)")
    if name == "local":
        from genbench.executors.local import LocalExecutor

        return LocalExecutor(cluster)
    if name == "submitit":
        from genbench.executors.submitit_executor import SubmititExecutor

        return SubmititExecutor(cluster, wait=p.opts.wait)
    from genbench.executors.ray_executor import RayExecutor

    return RayExecutor(cluster)
