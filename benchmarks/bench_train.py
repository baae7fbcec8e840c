"""DPM pre-training throughput and batch mixing.

    python benchmarks/bench_train.py                 # loader images/s per core per format
    python benchmarks/bench_train.py --mixing        # distinct references per batch
    python benchmarks/bench_train.py --device cuda   # + ResNet-50 / BoTNet-50 AMP step rates

Loader: shards of the bundled references (512x384, four types) are written with biqa-gen in
each image format (same pixels), then one pass of the training stream (decode, 384x288
random crop, flip, batch parts) runs in this process and images per CPU-second are
reported, i.e. per core; then the same through a DataLoader with N workers, in wall time.

Mixing: 400 small references x 4 types x 5 levels in shards of 200 (about one reference per
shard, as in a real run) are read as training batches of 64 at 1, 4 and 16 workers; the
mean number of distinct references per batch and the mean largest share of one reference
are printed next to the value of a full shuffle of the same samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.generator import generate
from biqa.shards.reader import open_shards
from biqa.training.data import (ShardStream, batch_mixing, full_shuffle_mixing, make_loader,
                                training_batches)
from biqa.training.device import amp_dtype, autocast, grad_scaler
from biqa.training.models import create_model
from biqa.training.pretrain import model_input

FORMATS = ("webp", "png", "zstd")


def sample_shards(out: Path, image_format: str, distortions: str = "1,11,13,18",
                  workers: int = 2) -> str:
    """Shards of the bundled references in one image format (written once, then reused)."""
    if not (out / "manifest.json").is_file():
        generate(refs=[str(p) for p in sample_reference_paths()], distortions=distortions,
                 out=str(out), per_shard=20, workers=workers, progress=False,
                 image_format=image_format)
    return str(out)


def loader_cpu_rate(shards: str, batch: int = 16, input_hw=(288, 384)) -> float:
    """Images per CPU-second of one training pass run in this process (a core's rate)."""
    stream = ShardStream(open_shards(shards), input_hw, batch, train=True)
    stream.set_epoch(0)
    list(stream)  # warm-up: indexes the shards, fills the page cache
    best = 0.0
    for epoch in (1, 2):
        stream.set_epoch(epoch)
        start = time.process_time()
        images = sum(len(part["label"]) for part in stream)
        best = max(best, images / (time.process_time() - start))
    return best


def loader_wall_rate(shards: str, workers: int, batch: int = 32, epochs: int = 3,
                     input_hw=(288, 384)) -> float:
    """Images/s of whole batches through a DataLoader with ``workers`` (first epoch skipped)."""
    stream = ShardStream(open_shards(shards), input_hw, batch, train=True)
    loader = make_loader(stream, workers, pin=False)
    images, start = 0, None
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch_ in training_batches(loader, stream):
            if start is not None:
                images += len(batch_["label"])
        if start is None:
            start = time.perf_counter()
    return images / (time.perf_counter() - start)


def mixing_shards(out: Path, refs: int = 400) -> str:
    if (out / "manifest.json").is_file():
        return str(out)
    folder = out.parent / "mixing_refs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(refs):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(
            folder / f"r{i:04d}.png")
    generate(refs=[str(folder)], distortions="11,13,18,21", out=str(out), per_shard=200,
             workers=2, progress=False, image_format="zstd")
    return str(out)


def mixing(shards: str, workers: int, batch: int = 64, epochs: int = 2) -> dict:
    """batch_mixing of real training batches at ``workers``."""
    stream = ShardStream(open_shards(shards), (32, 32), batch, train=True)
    loader = make_loader(stream, workers, pin=False)
    batches = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        batches += [b["ref"] for b in training_batches(loader, stream)]
    return batch_mixing(batches)


def step_rate(arch: str, device: str, batch: int, steps: int, amp: bool) -> float:
    """Images/s of forward + backward + SGD step on uint8 NHWC batches already on the device."""
    dev = torch.device(device)
    model = create_model(arch, 150).to(dev)
    channels_last = dev.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    dtype = amp_dtype(dev, amp)
    scaler = grad_scaler(dev, dtype)
    images = torch.randint(0, 256, (batch, 288, 384, 3), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, 150, (batch,), device=dev)

    def step():
        x = model_input(images, dev, channels_last)
        with autocast(dev, dtype):
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="folder for the shards (default: a temp)")
    parser.add_argument("--mixing", action="store_true", help="measure batch mixing only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    if args.mixing:
        shards = mixing_shards(work / "mixing")
        samples = open_shards(shards)
        refs = [f"r{i:04d}" for i in range(400) for _ in range(samples.samples // 400)]
        full = full_shuffle_mixing(refs, 64)
        print(json.dumps({"what": "full shuffle", "batch": 64, **full}))
        for workers in (1, 4, 16):
            got = mixing(shards, workers)
            print(json.dumps({"what": "biqa loader", "batch": 64, "workers": workers, **got,
                              "share_of_full_shuffle": got["distinct_refs"]
                              / full["distinct_refs"]}))
        return
    for image_format in FORMATS:
        shards = sample_shards(work / image_format, image_format)
        size = sum(Path(u).stat().st_size for u in open_shards(shards).urls)
        print(json.dumps({"what": "loader 384x288, one core", "format": image_format,
                          "images_per_cpu_s": round(loader_cpu_rate(shards), 1),
                          "shard_bytes_per_image": size // open_shards(shards).samples}))
        for workers in (int(w) for w in args.workers.split(",")):
            print(json.dumps({"what": "loader 384x288, wall", "format": image_format,
                              "workers": workers,
                              "images_per_s": round(loader_wall_rate(shards, workers), 1)}))
    print(json.dumps({"what": "train tiny cpu 384x288", "batch": 16,
                      "images_per_s": round(step_rate("tiny", "cpu", 16, 5, amp=False), 1)}))
    if args.device == "cuda":
        for arch in ("resnet50", "botnet50"):
            for batch in (64, 128):
                print(json.dumps({"what": f"train {arch} cuda amp 384x288", "batch": batch,
                                  "images_per_s": round(step_rate(arch, "cuda", batch, 20,
                                                                  amp=True), 1)}))


if __name__ == "__main__":
    main()
