"""Run shard tasks: in-process, on local processes (joblib loky) or on a Dask cluster.

Tasks are pulled lazily from the plan (joblib pre-dispatches only a few per
worker), results come back as they finish, and only paths and settings travel
to workers -- never pixels.  With Dask every worker must see ``out_dir`` and
the references at the same paths (a shared file system).

Workers end with the driver: loky workers watch their parent (the driver) and
exit when it dies, even mid-task (a Dask LocalCluster's workers do so on their
own); temp files they leave carry biqa's mark and go at the next run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from typing import Callable, Iterator

import joblib

from .plan import Plan
from .progress import Report
from .task import DEFAULT_ATTEMPTS, run_task

BACKENDS = ("loky", "dask")


def default_workers() -> int:
    """All cores this process may use (cgroup and affinity aware)."""
    return joblib.cpu_count(only_physical_cores=False)


def effective_workers(requested: int | None, backend: str, scheduler: str | None,
                      n_tasks: int, say: Callable[[str], None]) -> int:
    """Workers to start: the request (default: all cores), never more than there are
    tasks -- idle processes only cost start-up time -- with a warning above the cores."""
    cores = default_workers()
    workers = cores if requested is None else requested
    check_backend(workers, backend, scheduler)
    if scheduler:
        return workers  # the cluster's workers, not ours
    if workers > cores:
        say(f"warning: --workers {workers} is more than the {cores} cores available; "
            "the workers will compete for them")
    return min(workers, n_tasks)


def check_backend(workers: int, backend: str, scheduler: str | None) -> None:
    """Refuse a bad combination before anything is written."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if scheduler and backend != "dask":
        raise ValueError("--scheduler needs --backend dask")


@contextlib.contextmanager
def _dask_client(scheduler: str | None, workers: int):
    """A client to ``scheduler``; without one, a loopback LocalCluster of ``workers``
    single-threaded processes."""
    from dask.distributed import Client, LocalCluster
    if scheduler:
        with Client(scheduler) as client:
            yield client
    else:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            yield client


@functools.cache
def _exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it has died."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="biqa-exit-with-parent").start()


def _run_in_loky_worker(task, attempts: int, report: Report | None) -> dict:
    _exit_with_parent()  # loky workers are the driver's children; left alone they run on
    return run_task(task, attempts, report)


@contextlib.contextmanager
def task_runner(workers: int = 1, backend: str = "loky", scheduler: str | None = None,
                attempts: int = DEFAULT_ATTEMPTS, report: Report | None = None):
    """A function that runs an iterable of tasks, pulling them lazily, and yields each
    task's result (stats or failure record) as it completes.  One pool of workers (or one
    Dask client) serves every call, so a job that runs in rounds starts them once.
    ``report`` receives the running counts of tasks (in-process: any callable; in
    workers: a picklable one such as ``progress.SocketReporter``)."""
    check_backend(workers, backend, scheduler)
    if backend == "loky" and workers == 1:
        yield lambda tasks: (run_task(task, attempts, report) for task in tasks)
        return
    if backend == "loky":
        with joblib.Parallel(n_jobs=workers, backend="loky", batch_size=1,
                             return_as="generator_unordered") as parallel:
            yield lambda tasks: parallel(joblib.delayed(_run_in_loky_worker)(t, attempts, report)
                                         for t in tasks)
        return
    with _dask_client(scheduler, workers), joblib.parallel_config(backend="dask"), \
            joblib.Parallel(n_jobs=-1, batch_size=1, return_as="generator_unordered") as parallel:
        yield lambda tasks: parallel(joblib.delayed(run_task)(t, attempts, report) for t in tasks)


def iter_results(plan: Plan, workers: int = 1, backend: str = "loky",
                 scheduler: str | None = None, attempts: int = DEFAULT_ATTEMPTS,
                 report: Report | None = None) -> Iterator[dict]:
    """Yield the result of every task of ``plan`` outside a walk as it completes."""
    with task_runner(workers, backend, scheduler, attempts, report) as run:
        yield from run(plan.tasks())


def run_plan(plan: Plan, workers: int = 1, backend: str = "loky",
             scheduler: str | None = None, attempts: int = DEFAULT_ATTEMPTS,
             on_result: Callable[[dict], None] | None = None,
             report: Report | None = None) -> list[dict]:
    """Run every task of ``plan`` outside a walk; returns all results (failures included)."""
    results = []
    for result in iter_results(plan, workers, backend, scheduler, attempts, report):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
