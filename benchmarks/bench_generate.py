"""biqa-gen throughput: end-to-end images/s per core next to the encode-only floor.

    .venv/bin/python benchmarks/bench_generate.py                 # VIPNet set, 3 refs, 1 core
    .venv/bin/python benchmarks/bench_generate.py --refs 7 --workers 2
    .venv/bin/python benchmarks/bench_generate.py --compare-formats   # png vs webp

End to end = read and validate references, distort, PSNR, encode, write tar
shards and stats (``biqa.generator.generate``).  The floor = encode + tar
write of the very same output images, timed in the same run: what the job
would cost with free distortions.  Also prints the time per type, which is
where end-to-end time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from biqa.data import sample_reference_paths
from biqa.distortions import DistortionNotApplicable, get, resolve_distortions
from biqa.distortions.api import apply_spec
from biqa.distortions.extras import clear_ca_cache
from biqa.generator import generate
from biqa.generator.plan import DEFAULT_IMAGE_FORMAT
from biqa.generator.refs import load_reference
from biqa.generator.task import limit_threads
from biqa.shards.reader import iter_samples
from biqa.shards.writer import ShardWriter, encode_image


def per_type_seconds(img: np.ndarray, type_ids: list[int]) -> dict[int, float]:
    """CPU seconds for the five levels of each type on one reference."""
    out = {}
    for t in type_ids:
        clear_ca_cache()  # type 27's search is paid once per image, as in a real job
        start = time.process_time()
        for level in range(1, 6):
            try:
                apply_spec(get(t), img, level, np.random.default_rng(level))
            except DistortionNotApplicable:
                pass
        out[t] = time.process_time() - start
    return out


def encode_floor(out_dir: str, image_format: str) -> tuple[int, float, float]:
    """(images, wall s, CPU s) to encode and tar-write the generated images again."""
    samples = [(img, meta) for img, meta in iter_samples(out_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        with ShardWriter(f"{tmp}/floor.tar") as writer:
            for img, meta in samples:
                key = f"{meta['ref']}_{meta['type']:02d}_{meta['level']:02d}"
                writer.add(key, {image_format: encode_image(img, image_format),
                                 "json": repr(meta).encode(), "cls": str(meta["class"]).encode()})
            writer.commit()
        return len(samples), time.perf_counter() - wall, time.process_time() - cpu


def compare_formats(type_ids=(1, 11, 21)) -> None:
    """Encode/decode speed and size of the lossless formats on the bundled refs,
    originals plus a blurred, a noisy and a pixelated version of each (best of 3,
    CPU time, so a codec that spreads over threads does not look cheaper than it is)."""
    from biqa.shards.reader import decode_image
    images = []
    for path in sample_reference_paths():
        ref = load_reference(str(path))
        images.append(ref)
        images += [apply_spec(get(t), ref, 3, np.random.default_rng(0)) for t in type_ids]
    for fmt in ("png", "webp"):
        encoded = [encode_image(img, fmt) for img in images]
        enc = min(_seconds(lambda: [encode_image(img, fmt) for img in images]) for _ in range(3))
        dec = min(_seconds(lambda: [decode_image(b) for b in encoded]) for _ in range(3))
        kib = sum(map(len, encoded)) / len(images) / 1024
        print(f"{fmt:5s} encode {len(images) / enc:6.1f} images/s  decode "
              f"{len(images) / dec:6.1f} images/s  {kib:6.1f} KiB/image "
              f"({len(images)} images, 512x384)")


def _seconds(fn) -> float:
    """CPU seconds of this process: per-core cost, robust to other load on the machine."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distortions", default="vipnet")
    ap.add_argument("--refs", type=int, default=3, help="how many bundled references (1-7)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--image-format", default=DEFAULT_IMAGE_FORMAT, choices=["png", "webp"])
    ap.add_argument("--compare-formats", action="store_true",
                    help="only compare png and webp encoding on the bundled refs")
    args = ap.parse_args()
    limit_threads()
    if args.compare_formats:
        compare_formats()
        return
    refs = [str(p) for p in sample_reference_paths()[: args.refs]]
    probe = load_reference(refs[0])
    types = [spec.id for spec in resolve_distortions(args.distortions)]
    with tempfile.TemporaryDirectory() as out:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = generate(refs=refs, distortions=",".join(map(str, types)), out=out,
                            workers=args.workers, image_format=args.image_format,
                            progress=False)
        e2e_wall, e2e_cpu = time.perf_counter() - wall, time.process_time() - cpu
        images = manifest["totals"]["samples"]
        floor_images, floor_wall, floor_cpu = encode_floor(out, args.image_format)
    h, w = probe.shape[:2]
    print(f"{len(refs)} refs {w}x{h}, {len(types)} types x 5 levels = {images} images "
          f"({manifest['totals']['not_applicable']} not applicable), workers={args.workers}, "
          f"{args.image_format}")
    print(f"end to end  : wall {e2e_wall:7.2f} s = {images / e2e_wall / args.workers:6.1f} "
          f"images/s/core" + (f"; CPU {e2e_cpu:7.2f} s = {images / e2e_cpu:6.1f} images/s/core"
                              if args.workers == 1 else ""))
    print(f"encode floor: wall {floor_wall:7.2f} s = {floor_images / floor_wall:6.1f} "
          f"images/s/core; CPU {floor_cpu:7.2f} s = {floor_images / floor_cpu:6.1f} "
          "images/s/core")
    e2e_per_image = (e2e_cpu if args.workers == 1 else e2e_wall * args.workers) / images
    print(f"end-to-end / floor time per image: {e2e_per_image / (floor_cpu / floor_images):.2f}")
    slowest = sorted(per_type_seconds(probe, types).items(), key=lambda kv: -kv[1])
    print("CPU ms per image by type (slowest first): " + ", ".join(
        f"{t} {get(t).name} {1000 * s / 5:.0f}" for t, s in slowest))


if __name__ == "__main__":
    main()
