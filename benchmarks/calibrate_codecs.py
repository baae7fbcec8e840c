"""Calibrate the codec family's five levels and measure KADID types 9 and 10.

For every codec type this measures the codec's floor (mean PSNR over the bundled
sample references at its coarsest setting), derives five targets from it
(``level_targets``: 38 -> 24 dB, or -> the floor where the format cannot reach
24 dB), searches the encoder setting closest to each target, and prints per
level: setting, mean PSNR, mean bits per pixel and CPU milliseconds per call
(encode + decode of one 512x384 image; CPU time, because the machine is shared
and every encoder is pinned to one thread).  The settings and targets go
literally into ``_LEVELS`` in compression.py; the tables into docs/codecs.md.

    .venv/bin/python benchmarks/calibrate_codecs.py            # search + tables
    .venv/bin/python benchmarks/calibrate_codecs.py --check    # current table only
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache

import numpy as np
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.distortions import distort, get
from biqa.distortions._matlab import mapmm, psnr
from biqa.distortions.compression import (CALIBRATION_TARGETS_DB, CODEC_SPECS, CODECS,
                                          _kadid_uint8, encode_jpeg2000, level_targets)

IMAGES = [np.asarray(Image.open(p).convert("RGB")) for p in sample_reference_paths()]


@lru_cache(maxsize=None)
def mean_psnr(codec: str, param: float) -> float:
    c = CODECS[codec]
    return float(np.mean([psnr(im, c(im, param)) for im in IMAGES]))


def search_quality(codec: str, target: float) -> int:
    """Integer quality 0..100 whose mean PSNR is closest to target (PSNR rises with q)."""
    lo, hi = 0, 100
    while lo < hi:  # smallest q reaching the target
        mid = (lo + hi) // 2
        if mean_psnr(codec, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = [q for q in (lo - 1, lo) if 0 <= q <= 100]
    return min(candidates, key=lambda q: abs(mean_psnr(codec, q) - target))


def search_db(codec: str, target: float) -> float:
    """Target-PSNR setting (0.1 dB steps) whose achieved mean PSNR is closest to target."""
    lo, hi = target - 6.0, target + 6.0
    for _ in range(7):
        mid = round((lo + hi) / 2, 1)
        if mean_psnr(codec, mid) >= target:
            hi = mid
        else:
            lo = mid
    candidates = {round(v, 1) for v in (lo, hi)}
    return min(candidates, key=lambda d: abs(mean_psnr(codec, d) - target))


def ms_per_call(fn, param) -> float:
    """CPU milliseconds per call, averaged over the references."""
    t = time.process_time()
    for im in IMAGES:
        fn(im, param)
    return 1000.0 * (time.process_time() - t) / len(IMAGES)


def mean_bpp(codec: str, param: float) -> float:
    c = CODECS[codec]
    return float(np.mean([8.0 * len(c.encode(im, param)) / (im.shape[0] * im.shape[1])
                          for im in IMAGES]))


def codec_table(check: bool) -> None:
    print("| id | codec | level | setting | target dB | mean PSNR dB | mean bpp | ms/call |")
    print("|---|---|---|---|---|---|---|---|")
    found = []
    for spec in CODEC_SPECS:
        name = spec.name.removeprefix("codec_")
        if check:
            targets, params = CALIBRATION_TARGETS_DB[spec.id], spec.params
        elif name == "jpeg2000_db":  # the setting is a PSNR: no floor above 24 dB
            targets = level_targets(0.0)
            params = tuple(search_db(name, t) for t in targets)
        else:
            targets = level_targets(mean_psnr(name, 0))
            params = tuple(search_quality(name, t) for t in targets)
        found.append((spec.id, name, params, targets))
        for level, (param, target) in enumerate(zip(params, targets), 1):
            print(f"| {spec.id} | {name} | {level} | {param} | {target} | "
                  f"{mean_psnr(name, param):.2f} | {mean_bpp(name, param):.3f} | "
                  f"{ms_per_call(CODECS[name], param):.0f} |", flush=True)
    if not check:
        print("\n_LEVELS = (")
        for type_id, name, params, targets in found:
            print(f"    ({type_id}, {name!r}, {params}, {targets}),")
        print(")")


def kadid_table() -> None:
    """Types 9 and 10 through ``distort`` (KADID stretch included), on the sample refs."""
    print("| type | level | parameter | achieved ratio mean (min-max) | mean PSNR dB | ms/call |")
    print("|---|---|---|---|---|---|")
    for type_id in (9, 10):
        spec = get(type_id)
        for level, param in enumerate(spec.params, 1):
            ratio = ""
            if type_id == 9:
                r = [im.size / len(encode_jpeg2000(_kadid_uint8(mapmm(im.astype(np.float64))), param, "rates"))
                     for im in IMAGES]
                ratio = f"{np.mean(r):.1f} ({min(r):.1f}-{max(r):.1f})"
            p = np.mean([psnr(im, distort(im, type_id, level)) for im in IMAGES])
            ms = ms_per_call(lambda im, lv: distort(im, type_id, lv), level)
            print(f"| {type_id} {spec.name} | {level} | {param} | {ratio} | {p:.2f} | {ms:.0f} |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="measure the levels in CODEC_SPECS instead of searching new ones")
    args = ap.parse_args()
    print(f"{len(IMAGES)} sample references, {IMAGES[0].shape[1]}x{IMAGES[0].shape[0]}\n")
    kadid_table()
    print()
    codec_table(args.check)


if __name__ == "__main__":
    main()
