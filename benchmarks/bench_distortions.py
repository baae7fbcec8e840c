"""Milliseconds per call for every type x level on a 512x384 image, on one core.

Prints first the fixed cost of the KADID entry point (min-max stretch, output
stretch, 8-bit conversion) as the time of a call whose pixel work is the identity,
for float pixel work and for pixel work on the 8-bit levels; then, per type, the
five per-level times, the original code's time under Octave (from the reference
stats, where available) and the speed-up; then the total for the 125 KADID
outputs next to the time of PNG-encoding the same outputs, measured in this run.
Times are the CPU time of this process (``--clock cpu``, the default): on a
shared machine that excludes the time other processes held the core, and on an
idle one it equals the wall time of this single-threaded code.  Usage:

    python benchmarks/bench_distortions.py [--repeat 3] [--types all] [--clock cpu|wall]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # single core, before numpy loads

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from biqa.data import sample_reference_paths  # noqa: E402
from biqa.distortions import DistortionNotApplicable, resolve_distortions  # noqa: E402
from biqa.distortions.api import apply_spec, run_stretched  # noqa: E402
from biqa.distortions.extras import clear_ca_cache  # noqa: E402


def original_times(stats_csv: Path) -> dict:
    """(type, level) -> Octave seconds per call for the 512x384 reference (ref01)."""
    if not stats_csv.is_file():
        return {}
    with open(stats_csv, newline="") as f:
        return {(int(r["type"]), int(r["level"])): float(r["time_s"])
                for r in csv.DictReader(f) if r["ref"] == "1" and r["time_s"]}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def time_call(fn, repeat: int) -> float:
    """Best time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings per call")
    ap.add_argument("--types", default="all", help="distortion set (default: all)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="process CPU time (default) or wall time")
    ap.add_argument("--reference", type=Path,
                    default=Path(os.environ.get("BIQA_REFERENCE",
                                                Path(__file__).resolve().parents[2]
                                                / "shared" / "reference")))
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    cv2.setNumThreads(1)
    img = np.asarray(Image.open(sample_reference_paths()[0]).convert("RGB"))
    assert img.shape == (384, 512, 3)
    orig = original_times(args.reference / "stats.csv")

    for label, pixels in (("float pixel work", "float"), ("8-bit level pixel work", "levels")):
        ms = 1000 * time_call(lambda: run_stretched(lambda x: x, img, pixels=pixels),
                              50 * args.repeat)
        print(f"fixed cost, identity {label}: {ms:.2f} ms per call")
    print()
    print(f"{'type':>4} {'name':24} " + " ".join(f"{'L' + str(l):>7}" for l in range(1, 6))
          + f" {'mean ms':>8} {'octave ms':>10} {'speed-up':>9}")
    outputs = {}
    totals: dict[str, float] = {}
    for spec in resolve_distortions(args.types):
        # Levels 1..5 in sequence from a cold cache, as the generator calls them: the
        # chromatic-aberration search (type 27) is paid once, by level 1.
        runs = []
        for _ in range(args.repeat):
            clear_ca_cache()
            run = []
            for level in range(1, 6):
                t0 = clock()
                try:
                    outputs[(spec.id, level)] = apply_spec(spec, img, level,
                                                           np.random.default_rng(level))
                    run.append(1000 * (clock() - t0))
                except DistortionNotApplicable:
                    run.append(float("nan"))
            runs.append(run)
        ms = list(np.min(np.array(runs), axis=0))
        mean = float(np.nanmean(ms))
        totals[spec.family] = totals.get(spec.family, 0.0) + float(np.nansum(ms))
        octave = [orig[(spec.id, l)] * 1000 for l in range(1, 6) if (spec.id, l) in orig]
        o_txt = f"{np.mean(octave):10.1f} {np.mean(octave) / mean:8.1f}x" if octave else \
            f"{'-':>10} {'-':>9}"
        print(f"{spec.id:>4} {spec.name:24} " + " ".join(f"{m:7.1f}" for m in ms)
              + f" {mean:8.1f} {o_txt}")

    kadid = [v for (t, _), v in outputs.items() if t <= 25]
    pil_png_s = time_call(lambda: [Image.fromarray(o).save(io.BytesIO(), format="PNG")
                                   for o in kadid], args.repeat)
    cv_png_s = time_call(lambda: [cv2.imencode(".png", o[..., ::-1]) for o in kadid],
                         args.repeat)
    kadid_s = totals.get("kadid", 0.0) / 1000
    octave_s = sum(v for (t, _), v in orig.items() if t <= 25)
    print()
    for fam, ms in totals.items():
        print(f"total {fam:7}: {ms / 1000:6.2f} s")
    print(f"KADID, {len(kadid)} outputs: compute {kadid_s:.2f} s")
    for label, enc_s in (("Pillow PNG, default level 6", pil_png_s),
                         ("OpenCV PNG, default level 1", cv_png_s)):
        print(f"  PNG-encode the same ({label}): {enc_s:.2f} s | ratio compute/encode "
              f"{kadid_s / enc_s:.2f}")
    if octave_s:
        print(f"original under Octave, the types it ran: {octave_s:.2f} s "
              f"({octave_s / kadid_s:.1f}x biqa's time for all 25 types)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
