"""What biqa-gen's progress reporting and content-keyed resume cost.

    .venv/bin/python benchmarks/bench_gen_progress.py            # 5 repeats, 2 workers

Prints, each measured in this run (minimum over the repeats):

* the job with per-group progress reporting (a local socket) against the same job
  with none (``progress=False``), as a ratio;
* the cost of one progress message in a worker, against the mean time of a group;
* how soon the first running count reaches the main process on the default job
  (all types, the bundled references, 2 workers), worker start-up included;
* a full resume of that job, and the part of it spent hashing the references.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import warnings

from joblib.externals.loky import get_reusable_executor

from biqa.data import sample_reference_paths
from biqa.generator import generate, make_plan
from biqa.generator.distribute import iter_results
from biqa.generator.outdir import prepare_out_dir
from biqa.generator.progress import SocketReporter, progress_channel
from biqa.generator.refs import reference_digest

JOB = dict(distortions="1-12", resize="256x192", per_shard=60)


def job_seconds(progress: bool, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        manifest = generate(out=out, workers=workers, progress=progress, **JOB)
        return time.perf_counter() - start, manifest["totals"]["samples"]


def message_seconds(n: int = 20000) -> float:
    received = []
    with progress_channel(lambda *m: received.append(m)) as report:
        assert isinstance(report, SocketReporter)
        start = time.perf_counter()
        for i in range(n):
            report(0, i, 0, 0)
        return (time.perf_counter() - start) / n


def first_count_seconds(out: str, workers: int) -> float:
    """From starting the tasks (worker processes not yet running, as in a fresh
    ``biqa-gen``) to the first running count in the main process."""
    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    plan = make_plan(distortions="all", out=out)
    prepare_out_dir(plan, False, print)
    first = []
    start = time.perf_counter()
    with progress_channel(lambda *m: first or first.append(time.perf_counter())) as report, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib's note on the tasks cancelled below
        for _ in iter_results(plan, workers, report=report):
            if first:
                break
    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    return first[0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    on, off = [], []
    for i in range(args.repeats):  # interleaved, in turns first, so load changes hit both
        for progress in (True, False) if i % 2 else (False, True):
            seconds, samples = job_seconds(progress, args.workers)
            (on if progress else off).append(seconds)
    print(f"job ({samples} samples, {args.workers} workers): with progress {min(on):.2f} s, "
          f"without {min(off):.2f} s, ratio {min(on) / min(off):.3f}")
    group = min(on) * args.workers / (samples / 5)
    per_message = min(message_seconds() for _ in range(args.repeats))
    print(f"one progress message: {per_message * 1e6:.1f} us; a group takes ~{group * 1e3:.0f} "
          f"ms of a worker, so at most one message per group costs "
          f"{per_message / group:.2e} of it")

    with tempfile.TemporaryDirectory() as out:
        first = min(first_count_seconds(f"{out}/{i}", args.workers)
                    for i in range(args.repeats))
        print(f"default job: first running count {first:.2f} s after the tasks were started "
              "(worker start-up included)")
        generate(out=out, distortions="all", workers=args.workers, progress=False)
        resume = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            manifest = generate(out=out, distortions="all", workers=args.workers,
                                progress=False)
            resume.append(time.perf_counter() - start)
            assert manifest["run"]["samples_new"] == 0
    paths = sample_reference_paths()
    hashing = min(_timed(lambda: [reference_digest(p) for p in paths])
                  for _ in range(args.repeats))
    print(f"full resume of the default job: {min(resume):.2f} s; hashing its {len(paths)} "
          f"references: {hashing * 1e3:.1f} ms ({hashing / min(resume):.1%})")
    size = sum(len(open(p, "rb").read()) for p in paths)
    raw = min(_timed(lambda: hashlib.sha256(b"\0" * size).digest()) for _ in range(3))
    print(f"  ({size / 1e6:.1f} MB of references; sha256 alone {raw * 1e3:.1f} ms)")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
