"""Where the data pipeline's shard tasks run: in this process, in local processes, or on Ray.

Every executor runs the same top-level function over the same picklable tasks and returns the
results in task order, so the output does not depend on where the work ran. One `TaskRunner`
serves a whole run, so worker processes start once, not once per pipeline segment.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

EXECUTORS = ("local", "ray")


class TaskRunner:
    """`map(fn, tasks)` on the chosen executor; use as a context manager."""

    def __init__(self, executor: str, workers: int, max_tasks: int, ray_address: str = ""):
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        self.executor, self.ray_address = executor, ray_address
        self.workers = workers if executor == "ray" else \
            max(1, min(workers or os.cpu_count() or 1, max_tasks))
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> TaskRunner:
        if self.executor == "local" and self.workers > 1:
            # spawn, not fork: the parent may hold torch threads or Ray state fork would corrupt
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any],
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        """fn(task) for every task, results in task order; `on_done(n_finished)` as they end."""
        if self.executor == "ray":
            return _run_ray(fn, tasks, self.workers, self.ray_address, on_done)
        if self.pool is None:
            results = []
            for task in tasks:
                results.append(fn(task))
                if on_done:
                    on_done(len(results))
            return results
        results: list[Any] = [None] * len(tasks)
        futures = {self.pool.submit(fn, task): i for i, task in enumerate(tasks)}
        for n, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if on_done:
                on_done(n)
        return results


def _run_ray(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, address: str,
             on_done: Callable[[int], None] | None) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise ValueError("executor: ray needs the ray package: pip install 'llmforge[ray]'") \
            from None
    if not ray.is_initialized():
        ray.init(address=address or None, num_cpus=(workers or None) if not address else None,
                 include_dashboard=False, log_to_driver=False)
    remote = ray.remote(fn)
    refs = [remote.remote(task) for task in tasks]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(tasks)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[index[done[0]]] = ray.get(done[0])
        if on_done:
            on_done(len(tasks) - len(pending))
    return results
