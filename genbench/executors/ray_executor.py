"""`--executor ray`: each pending run is one Ray task, on a running cluster (`ray_address`, e.g.
ray://head:10001 or auto) or on a local one started for this invocation, with `cpus_per_task` CPUs
(default 1; also the torch threads of the run), `gpus_per_task` GPUs (fractions allowed) and `mem_gb`.
The results folder must be one every worker sees (a shared file system on a real cluster).

Failures: a run that raises is recorded `failed` in its metrics.json, as with the local executor, and
retried by the next `genbench run` (not by Ray). A task whose worker process dies (killed, out of
memory, node lost) is retried by Ray up to `max_retries` times (default 2): the retry has the same
token, takes the run's lease back (at once when the dead worker was on its host, else once the lease
is stale) and train() resumes from checkpoint.pt. When the retries are spent the run is reported
failed, and the next `genbench run` takes it over.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from genbench.errors import UserError

MISSING = "--executor ray needs Ray: pip install 'genbench[ray]'"


def require_ray():
    try:
        import ray
    except ImportError:
        raise UserError(MISSING) from None
    return ray


def ray_task(plan, ds, card, seed: int, tag: str, token: str, threads: int, run_fn=None) -> tuple[str, str]:
    """What a Ray worker runs for one run (module level: workers import it by name)."""
    import torch

    torch.set_num_threads(max(1, threads))
    if run_fn is None:
        from genbench.runner import execute_run as run_fn
    return run_fn(plan, ds, card, seed, tag, token=token, who="ray task", wait_own=True)


class RayExecutor:
    name = "ray"
    run_fn = None   # a stand-in for runner.execute_run (tests); a function the workers can import by name

    def __init__(self, cluster: dict, run_fn=None):
        self.ray = require_ray()
        self.cluster = dict(cluster)
        if run_fn is not None:
            self.run_fn = run_fn

    def task_options(self) -> dict:
        c = self.cluster
        opts = {"num_cpus": c.get("cpus_per_task", 1), "num_gpus": c.get("gpus_per_task", 0),
                "max_retries": c.get("max_retries", 2), "retry_exceptions": False}
        if c.get("mem_gb"):
            opts["memory"] = int(c["mem_gb"] * 2**30)
        return opts

    def run(self, p, tasks, log) -> Iterator[tuple[str, str]]:
        if not tasks:
            return
        from genbench.lease import new_token

        ray = self.ray
        started = False
        if not ray.is_initialized():
            address = self.cluster.get("ray_address") or os.environ.get("RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address)
                else:
                    ray.init(include_dashboard=False)
            except Exception as e:  # noqa: BLE001 - no cluster there, bad address
                raise UserError(f"--executor ray: cannot start or reach Ray"
                                f"{f' at {address}' if address else ''}: {str(e).strip().splitlines()[0]}") from None
            started = True
        try:
            worker_plan = dataclasses.replace(p, opts=dataclasses.replace(p.opts, progress=False))
            plan_ref = ray.put(worker_plan)
            remote = ray.remote(ray_task).options(**self.task_options())
            threads = int(max(1, self.cluster.get("cpus_per_task", 1)))
            refs = {remote.remote(plan_ref, t.ds, t.card, t.seed, t.tag, new_token(), threads, self.run_fn): t
                    for t in tasks}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    t = refs.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, UserError):   # the same input fails every run
                            for r in refs:
                                ray.cancel(r)
                            raise cause from None
                        last = (str(cause or e).strip().splitlines() or [""])[-1][:300]
                        yield "failed", f"{t.tag}: FAILED on Ray ({type(e).__name__}: {last})"
        finally:
            if started:
                ray.shutdown()
