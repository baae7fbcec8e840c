"""Throughput of DPM pre-training: the shard loader (images/s per worker count, decode +
crop + flip + YCbCr at 384x288) and training steps (images/s).

    python benchmarks/bench_train.py                      # CPU: loader + tiny model
    python benchmarks/bench_train.py --device cuda        # + ResNet-50 / BoTNet-50 with AMP

Without ``--shards`` it first writes shards of the bundled references (512x384, four types)
with biqa-gen into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from biqa.training.data import ShardStream, dpm_input, make_loader, open_shards
from biqa.training.models import create_model


def make_sample_shards(out: str) -> str:
    from biqa.data import sample_reference_paths
    from biqa.generator import generate
    generate(refs=[str(p) for p in sample_reference_paths()], distortions="1,11,13,18",
             out=out, per_shard=20, workers=2, progress=False)
    return out


def loader_rate(shards: str, workers: int, batch: int, batches: int) -> float:
    """Images/s of the training stream (after a warm-up batch), wrapping epochs as needed."""
    stream = ShardStream(open_shards(shards), (288, 384), batch, train=True, shuffle_size=64)
    loader = make_loader(stream, batch, workers, pin=False)
    seen, epoch, start = 0, 0, None
    while seen < batches:
        stream.set_epoch(epoch)
        for images in loader:
            if start is None:
                start = time.perf_counter()  # skip worker start-up and the first batch
                continue
            seen += 1
            if seen == batches:
                break
        epoch += 1
    return batches * batch / (time.perf_counter() - start)


def train_rate(arch: str, device: str, batch: int, steps: int, amp: bool) -> float:
    """Images/s of forward + backward + SGD step on uint8 batches already on the device."""
    model = create_model(arch, 150).to(device)
    channels_last = device == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    images = torch.randint(0, 256, (batch, 3, 288, 384), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 150, (batch,), device=device)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    def step():
        x = dpm_input(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="shard folder (default: write sample shards)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", default="0,1,2", help="comma list of worker counts")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shards = args.shards or make_sample_shards(tempfile.mkdtemp(prefix="bench_train_"))
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
        rate = loader_rate(shards, workers, 16, args.batches)
        results.append({"what": "loader 384x288", "workers": workers, "images_per_s": rate,
                        "per_worker": rate / max(workers, 1)})
    results.append({"what": "train tiny cpu 384x288", "batch": 16,
                    "images_per_s": train_rate("tiny", "cpu", 16, 5, amp=False)})
    if args.device == "cuda":
        for arch in ("resnet50", "botnet50"):
            for batch in (64, 128):
                results.append({"what": f"train {arch} cuda amp 384x288", "batch": batch,
                                "images_per_s": train_rate(arch, "cuda", batch, 20, amp=True)})
    for r in results:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
