"""Executors: run independent tasks (one per layer, say) in parallel.

An executor has one method, ``map(fn, tasks) -> results`` (results in task order), so
the code that fans work out does not care where it runs. ``fn`` must be a module-level
function and tasks and results picklable (a process or a cluster node runs them).

Built in: ``local`` (a process pool on this machine, ``spawn`` start method, so workers
never inherit a forked torch/OpenMP runtime; with one worker or one task everything
runs in this process), ``serial`` (in this process, in order) and ``ray`` (one Ray task
per task, on a local Ray instance or the cluster at ``address``; needs the ``ray``
extra). Another engine (Dask, a batch scheduler) is one :func:`register_executor` call.
:func:`configure_executor` sets run-wide keyword arguments of an engine (``convert
--ray-address`` sets the Ray address).

Results must not depend on the executor or on the number of workers: a task that uses
threads (torch, BLAS) should pin them itself (``toolchain.predictor.single_threaded``).
So the options that choose them (:data:`EXECUTION_OPTIONS`) are left out of the pass
cache key, the pass log and the artifact (:func:`result_options`).

An interrupt (Ctrl-C, SIGTERM) while tasks run stops the workers (the local pool's
processes are terminated, Ray tasks cancelled) before it propagates.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

from .interrupt import hold

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
            return [_run_task(fn, t) for t in tasks]
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx)
        try:
            results = list(pool.map(functools.partial(_run_task, fn), tasks))
        except BrokenProcessPool as exc:
            _stop_pool(pool)
            raise RuntimeError(
                "a worker process of the local executor died. Workers start with the 'spawn' method, "
                "which re-imports the main script: guard its entry point with "
                "`if __name__ == '__main__':`, or use one worker") from exc
        except BaseException:  # an interrupt or a failed task: do not wait for the other tasks
            _stop_pool(pool)
            raise
        pool.shutdown(wait=True)
        return results


def _run_task(fn: Callable[[T], R], task: T) -> R:
    """A task in a worker process (``hold`` is the interruption tests' pause point)."""
    hold("task")
    return fn(task)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes now; pending tasks are cancelled."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


class RayExecutor:
    """One Ray task per task (``num_cpus=1`` each), at most ``workers`` in flight (0: as
    many as the cluster schedules). ``address``: an existing cluster (``ray://host:10001``
    or ``host:6379``; default ``$SPARSEFORGE_RAY_ADDRESS``, then ``$RAY_ADDRESS``); without
    one a local Ray instance starts on first use (``num_cpus``: its CPUs, 0: all) and
    stops when the process exits.

    Tasks name files (sample shards, the model's tensors) by path: on a cluster, the
    model, the pass cache and the scratch directory (``$TMPDIR``) must be on a file system
    every node mounts at the same path, and every node needs the same sparseforge."""

    def __init__(self, workers: int = 0, address: str | None = None, num_cpus: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.address = address or os.environ.get("SPARSEFORGE_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
        self.num_cpus = num_cpus
        self._ray = _import_ray()

    def _init(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.address:
            ray.init(address=self.address, **quiet)
        else:
            ray.init(num_cpus=self.num_cpus or cpu_count(), include_dashboard=False, **quiet)

    def map(self, fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
        tasks = list(tasks)
        if not tasks:
            return []
        self._init()
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_task)
        refs: list[Any] = []
        try:
            pending: list[Any] = []
            for t in tasks:
                if self.workers and len(pending) >= self.workers:
                    _, pending = ray.wait(pending, num_returns=1, fetch_local=False)
                refs.append(remote.remote(fn, t))
                pending.append(refs[-1])
            return list(ray.get(refs))
        except BaseException:  # an interrupt or a failed task: stop the rest
            for r in refs:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # noqa: BLE001 - finished or already gone
                    pass
            raise


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        from .errors import InputError

        raise InputError(None, "the ray executor needs Ray: pip install 'sparseforge[ray]'") from None
    return ray


_EXECUTORS: dict[str, ExecutorFactory] = {"local": LocalExecutor, "serial": SerialExecutor, "ray": RayExecutor}
_CONFIG: dict[str, dict[str, Any]] = {}

#: pass options that choose where work runs, never what it computes
EXECUTION_OPTIONS = ("executor", "workers")


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make an execution engine available under ``name`` (e.g. a pass's ``executor`` option)."""
    _EXECUTORS[name] = factory


def configure_executor(name: str, **kwargs: Any) -> None:
    """Run-wide keyword arguments for the executor ``name`` (e.g. ``address`` of ``ray``);
    :func:`make_executor` passes them to its factory."""
    _CONFIG[name] = {**_CONFIG.get(name, {}), **{k: v for k, v in kwargs.items() if v is not None}}


def result_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without :data:`EXECUTION_OPTIONS`: what a pass's result depends on."""
    return {k: v for k, v in options.items() if k not in EXECUTION_OPTIONS}


def executor_names() -> list[str]:
    return sorted(_EXECUTORS)


def make_executor(name: str, workers: int = 0, **kwargs: Any) -> Executor:
    """The executor ``name`` with ``workers`` workers (0: one per core)."""
    try:
        factory = _EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r} (known: {', '.join(executor_names())})") from None
    return factory(workers=workers, **{**_CONFIG.get(name, {}), **kwargs})


def map_in_order(executor: Executor, fn: Callable[[T], R], tasks: Iterable[T]) -> list[R]:
    """``executor.map(fn, list(tasks))`` with a check that it kept one result per task."""
    tasks = list(tasks)
    results = list(executor.map(fn, tasks))
    if len(results) != len(tasks):
        raise RuntimeError(f"executor returned {len(results)} results for {len(tasks)} tasks")
    return results
