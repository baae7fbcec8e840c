"""Run shard tasks: in-process, on local processes (joblib loky) or on a Dask cluster.

Tasks are pulled lazily from the plan (joblib pre-dispatches only a few per
worker), results come back as they finish, and only paths and settings travel
to workers -- never pixels.  With Dask every worker must see ``out_dir`` and
the references at the same paths (a shared file system).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

import joblib

from .plan import Plan
from .task import DEFAULT_ATTEMPTS, run_task

BACKENDS = ("loky", "dask")


def default_workers() -> int:
    """All cores this process may use (cgroup and affinity aware)."""
    return joblib.cpu_count(only_physical_cores=False)


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


def iter_results(plan: Plan, workers: int = 1, backend: str = "loky",
                 scheduler: str | None = None,
                 attempts: int = DEFAULT_ATTEMPTS) -> Iterator[dict]:
    """Yield every task's result (stats or failure record) as it completes."""
    check_backend(workers, backend, scheduler)
    if backend == "loky" and workers == 1:
        yield from (run_task(task, attempts) for task in plan.tasks())
        return
    calls = (joblib.delayed(run_task)(task, attempts) for task in plan.tasks())
    if backend == "loky":
        yield from joblib.Parallel(n_jobs=workers, backend="loky", batch_size=1,
                                   return_as="generator_unordered")(calls)
        return
    with _dask_client(scheduler, workers):
        with joblib.parallel_config(backend="dask"):
            yield from joblib.Parallel(n_jobs=-1, batch_size=1,
                                       return_as="generator_unordered")(calls)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 \
        else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, total_samples: int, total_shards: int, enabled: bool = True,
                 stream=None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.total_samples, self.total_shards = total_samples, total_shards
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.perf_counter()
        self.samples = self.shards = self.failed = 0
        self._bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total_samples, unit="img", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, result: dict) -> None:
        self.shards += 1
        self.failed += result["status"] == "failed"
        self.samples += result["planned"]
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(shards=f"{self.shards}/{self.total_shards}",
                                  failed=self.failed, refresh=False)
            self._bar.update(result["planned"])
            return
        elapsed = time.perf_counter() - self.start
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        eta = (self.total_samples - self.samples) / rate if rate > 0 else 0.0
        print(f"biqa-gen: {result['shard']} {result['status']}"
              f"{' (already done)' if result.get('resumed') else ''}; "
              f"{self.shards}/{self.total_shards} shards, {self.samples}/{self.total_samples} "
              f"images, {rate:.1f} images/s, ETA {_fmt_seconds(eta)}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_plan(plan: Plan, workers: int = 1, backend: str = "loky",
             scheduler: str | None = None, attempts: int = DEFAULT_ATTEMPTS,
             on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every task of ``plan``; returns all results (failures included)."""
    results = []
    for result in iter_results(plan, workers, backend, scheduler, attempts):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
