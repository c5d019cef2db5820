"""Executors: run independent tasks (one per layer, say) in parallel.

An executor has one method, ``map(fn, tasks) -> results`` (results in task order), so
the code that fans work out does not care where it runs. ``fn`` must be a module-level
function and tasks and results picklable (a process or a cluster node runs them).

Built in: ``local`` (a process pool on this machine, ``spawn`` start method, so workers
never inherit a forked torch/OpenMP runtime; with one worker or one task everything
runs in this process) and ``serial`` (in this process, in order). Another engine (Ray,
Dask, a batch scheduler) is one :func:`register_executor` call::

    class RayExecutor:
        def __init__(self, workers: int = 0) -> None: ...
        def map(self, fn, tasks): return ray.get([ray.remote(fn).remote(t) for t in tasks])

    register_executor("ray", RayExecutor)

Results must not depend on the executor or on the number of workers: a task that uses
threads (torch, BLAS) should pin them itself (``toolchain.predictor.single_threaded``).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs ``fn`` on every task; returns the results in task order. Raises the first
    exception a task raised."""

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]: ...


ExecutorFactory = Callable[..., Executor]
"""``factory(workers=N) -> Executor`` (``workers`` 0: as many as there are cores)."""


def cpu_count() -> int:
    """Cores this process may use (affinity-aware when the platform says)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


class SerialExecutor:
    """Every task in this process, in order."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = 1

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        return [fn(t) for t in tasks]


class LocalExecutor:
    """A pool of ``workers`` processes on this machine (0: one per core), never more
    than there are tasks; one worker (or one task) runs in this process."""

    def __init__(self, workers: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers or cpu_count()

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        tasks = list(tasks)
        n = min(self.workers, len(tasks))
        if n <= 1:
            return [fn(t) for t in tasks]
        ctx = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                return list(pool.map(fn, tasks))
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a worker process of the local executor died. Workers start with the 'spawn' method, "
                "which re-imports the main script: guard its entry point with "
                "`if __name__ == '__main__':`, or use one worker") from exc


_EXECUTORS: dict[str, ExecutorFactory] = {"local": LocalExecutor, "serial": SerialExecutor}


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make an execution engine available under ``name`` (e.g. a pass's ``executor`` option)."""
    _EXECUTORS[name] = factory


def executor_names() -> list[str]:
    return sorted(_EXECUTORS)


def make_executor(name: str, workers: int = 0, **kwargs: Any) -> Executor:
    """The executor ``name`` with ``workers`` workers (0: one per core)."""
    try:
        factory = _EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r} (known: {', '.join(executor_names())})") from None
    return factory(workers=workers, **kwargs)


def map_in_order(executor: Executor, fn: Callable[[T], R], tasks: Iterable[T]) -> list[R]:
    """``executor.map(fn, list(tasks))`` with a check that it kept one result per task."""
    tasks = list(tasks)
    results = list(executor.map(fn, tasks))
    if len(results) != len(tasks):
        raise RuntimeError(f"executor returned {len(results)} results for {len(tasks)} tasks")
    return results
