"""Milliseconds per call of each full-reference metric on a 512x384 image, one core,
next to the cost of one distortion call measured in the same run.

Times are CPU time of the calling thread.  The baseline is the mean, over the 25
KADID types, of one ``distort(ref, type, 3)`` call (best of ``--repeat`` / 5 each);
every metric is reported as ms and as a fraction of that baseline, alone and in the
combinations a generator would ask for through ``compute_fr_metrics`` (which shares
the luma and the full-scale SSIM terms).
Usage:

    python benchmarks/bench_fr_metrics.py [--repeat 30]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # single core, before numpy loads

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from biqa.data import sample_reference_paths  # noqa: E402
from biqa.distortions import distort, resolve_distortions  # noqa: E402
from biqa.fr_metrics import FR_METRICS, compute_fr_metrics  # noqa: E402

COMBINATIONS = ("psnr,ssim", "psnr,ssim,ms_ssim", "psnr,ssim,ms_ssim,gmsd", "all")


def best_ms(fn, repeat: int) -> float:
    """Least CPU time of the calling thread over ``repeat`` calls, in ms.  All the work
    runs single-threaded in this thread, and CPU time is not inflated by other jobs
    taking the core (on a loaded 2-core VM wall times of calls over a few ms mostly
    measure preemption)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return 1000 * best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="best of N timings per call")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    threadpool_limits(1)
    ref = np.asarray(Image.open(sample_reference_paths()[0]).convert("RGB"))
    assert ref.shape == (384, 512, 3)

    kadid = resolve_distortions("kadid")
    distort_ms = [best_ms(lambda s=s: distort(ref, s.id, 3, rng=0), max(3, args.repeat // 5))
                  for s in kadid]
    baseline = float(np.mean(distort_ms))
    print(f"baseline: one distort() call at level 3, mean over {len(kadid)} KADID types: "
          f"{baseline:.2f} ms (median {np.median(distort_ms):.2f}, "
          f"min {min(distort_ms):.2f}, max {max(distort_ms):.2f})\n")

    dist = distort(ref, "jpeg", 3, rng=0)
    print(f"{'metric':24} {'ms/call':>8} {'/ distort':>10}  direction")
    for name, metric in FR_METRICS.items():
        ms = best_ms(lambda m=metric: m(ref, dist), args.repeat)
        direction = "higher = better" if metric.higher_is_better else "lower = better"
        print(f"{name:24} {ms:8.2f} {ms / baseline:10.2f}  {direction}")
    print()
    for combo in COMBINATIONS:
        ms = best_ms(lambda c=combo: compute_fr_metrics(ref, dist, c), args.repeat)
        print(f"{'compute ' + combo:40} {ms:8.2f} ms {ms / baseline:6.2f} x distort")
    return 0


if __name__ == "__main__":
    sys.exit(main())
