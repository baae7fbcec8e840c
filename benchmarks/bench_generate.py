"""biqa-gen throughput: end-to-end images/s per core next to the encode-and-write floor.

    python benchmarks/bench_generate.py                       # KADID types, 2 refs, 1 core
    python benchmarks/bench_generate.py --distortions vipnet --refs 3 --repeat 3
    python benchmarks/bench_generate.py --refs 7 --workers 2
    python benchmarks/bench_generate.py --compare-formats     # png vs webp

End to end = read and validate references, distort, PSNR, draws, encode, write tar
shards and stats (``biqa.generator.generate``, in this process with one worker, so its
CPU time is the cost per core).  The floor = encode + tar write of the very same
output images, timed in the same run: what the job would cost with free distortions.
Both are CPU times of this process (robust to other load on a shared machine), the
minimum over ``--repeat`` runs.  Where the rest goes: the distortions alone (the same
samples, same seeds, nothing else) and the remainder, the generator's own work; the
distortions alone bound the ratio from below.  Then the time per type.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from biqa.data import sample_reference_paths
from biqa.distortions import DistortionNotApplicable, get, resolve_distortions
from biqa.distortions.api import apply_spec, apply_spec_with_draws
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


def distortions_only(out_dir: str, refs: list[str]) -> tuple[int, float]:
    """(images, CPU s) to make the samples of ``out_dir`` again from their references and
    recorded seeds, draws recorded as the generator does, and nothing else."""
    from biqa.generator.refs import resolve_refs
    table = resolve_refs(refs)
    path_of = dict(zip(table.ids, table.paths))
    samples = [(m["ref"], m["type"], m["level"], m["seed"]) for _, m in iter_samples(out_dir)]
    images = {ref: load_reference(path_of[ref]) for ref in {s[0] for s in samples}}
    clear_ca_cache()
    start = time.process_time()
    for ref, type_id, level, seed in samples:
        apply_spec_with_draws(get(type_id), images[ref], level, np.random.default_rng(seed))
    return len(samples), time.process_time() - start


def measure(refs: list[str], types: list[int], workers: int, image_format: str) -> dict:
    """One run: CPU (and wall) seconds of each part, and the images made."""
    with tempfile.TemporaryDirectory() as out:
        wall, cpu = time.perf_counter(), time.process_time()
        manifest = generate(refs=refs, distortions=",".join(map(str, types)), out=out,
                            workers=workers, image_format=image_format, progress=False)
        e2e_wall, e2e_cpu = time.perf_counter() - wall, time.process_time() - cpu
        floor_images, floor_wall, floor_cpu = encode_floor(out, image_format)
        _, distort_cpu = distortions_only(out, refs)
    return {"images": manifest["totals"]["samples"], "floor_images": floor_images,
            "not_applicable": manifest["totals"]["not_applicable"], "e2e_wall": e2e_wall,
            "e2e_cpu": e2e_cpu, "floor_wall": floor_wall, "floor_cpu": floor_cpu,
            "distort_cpu": distort_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distortions", default="kadid")
    ap.add_argument("--refs", type=int, default=2, help="how many bundled references (1-7)")
    ap.add_argument("--workers", type=int, default=1,
                    help="1 (default) runs in this process: CPU time is the cost per core")
    ap.add_argument("--repeat", type=int, default=1, help="runs; the minimum of each part")
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
    runs = [measure(refs, types, args.workers, args.image_format) for _ in range(args.repeat)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    images, per_core = best["images"], args.workers == 1
    # with workers, this process only waits: the cost per core is wall time x workers
    e2e = (best["e2e_cpu"] if per_core else best["e2e_wall"] * args.workers) / images
    floor = best["floor_cpu"] / best["floor_images"]
    distort = best["distort_cpu"] / images
    h, w = probe.shape[:2]
    print(f"{len(refs)} refs {w}x{h}, {len(types)} types x 5 levels = {images} images "
          f"({best['not_applicable']} not applicable), workers={args.workers}, "
          f"{args.image_format}, min of {args.repeat} run(s)")
    print(f"end to end      : {1000 * e2e:6.2f} ms CPU per image = {1 / e2e:6.1f} images/s/core"
          f" (wall {best['e2e_wall']:.2f} s)")
    print(f"encode floor    : {1000 * floor:6.2f} ms CPU per image = {1 / floor:6.1f} "
          "images/s/core (encode + tar write of the same images)")
    print(f"distortions only: {1000 * distort:6.2f} ms CPU per image")
    print(f"rest (generator): {1000 * (e2e - distort - floor):6.2f} ms CPU per image "
          "(decode, hashes, seeds, PSNR, JSON, stats)")
    print(f"end to end / floor: {e2e / floor:.2f}x; the distortions alone make it at least "
          f"{(distort + floor) / floor:.2f}x")
    slowest = sorted(per_type_seconds(probe, types).items(), key=lambda kv: -kv[1])
    print("CPU ms per image by type (slowest first): " + ", ".join(
        f"{t} {get(t).name} {1000 * s / 5:.0f}" for t, s in slowest))


if __name__ == "__main__":
    main()
