"""`--executor local` (the default): runs one after another in this process, or with `--jobs N` in N
spawned worker processes that share the CPU threads evenly. Each run goes through execute_run, which
takes its lease, so two `genbench run` started together on one results folder split the runs."""
from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator


class LocalExecutor:
    name = "local"

    def __init__(self, cluster: dict | None = None):
        self.cluster = dict(cluster or {})

    def run(self, p, tasks, log) -> Iterator[tuple[str, str]]:
        import torch

        from genbench.runner import effective_jobs, execute_run

        jobs = min(effective_jobs(p), len(tasks)) if tasks else 1
        if jobs <= 1:
            for t in tasks:
                yield execute_run(p, t.ds, t.card, t.seed, t.tag, log=log)
            return
        # Bars from several processes would overwrite each other: one line per finished run instead.
        worker_plan = dataclasses.replace(p, opts=dataclasses.replace(p.opts, progress=False))
        threads = max(1, torch.get_num_threads() // jobs)
        # spawned, so no thread pool is forked; the Plan is a plain dataclass and travels by pickle
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            pending = {pool.submit(execute_run, worker_plan, t.ds, t.card, t.seed, t.tag) for t in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:   # a UserError: the same input fails every run
                        for f in pending:
                            f.cancel()
                        raise fut.exception()
                    yield fut.result()
