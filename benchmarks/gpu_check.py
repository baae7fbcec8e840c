"""One run on a CUDA machine that shows pre-training works there and how fast it is.

    python benchmarks/gpu_check.py                  # about 6 minutes on one H100/H200
    python benchmarks/gpu_check.py --seconds 30     # shorter

It writes real shards of the bundled references with biqa-gen (VIPNet's 30 types, the default
WebP and the fast zstd format), then trains ResNet-50 and BoTNet-50 through ``train()`` --
the code ``biqa-train-dpm`` runs, with AMP, channels-last, 12-16 loader workers and batch
128 -- for about ``--seconds`` each, while sampling GPU utilisation with nvidia-smi.  It
prints one JSON line per run: images/s (after the first log window), the share of time
the loop waited for the loader, the mean GPU utilisation, and whether the loader kept up
(waited under 5 % of the time).  Then a short sharded-validation and resume check.
With ``--device cpu`` it runs the same path on a CPU with the tiny model (for testing the
script itself).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from biqa.data import sample_reference_paths
from biqa.generator import generate
from biqa.training.config import TrainConfig, available_cores
from biqa.training.pretrain import train


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi, once a second) while it runs; None without it."""

    def __init__(self, index: int):
        self.index, self.samples = index, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu="
                                      "utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_shards(work: Path, image_format: str, workers: int, distortions: str) -> str:
    out = work / f"shards_{image_format}"
    generate(refs=[str(p) for p in sample_reference_paths()], distortions=distortions,
             out=str(out), per_shard=50, workers=workers, progress=False,
             image_format=image_format)
    return str(out)


def timed_run(shards: str, out: Path, arch: str, device: str, batch: int, workers: int,
              seconds: float, steps_per_second: float, **extra) -> dict:
    """Train for about ``seconds`` (steps estimated from a first guess of the rate)."""
    steps = max(20, int(seconds * steps_per_second))
    config = TrainConfig(shards=shards, out=str(out), arch=arch, device=device,
                         batch_size=batch, workers=workers, max_steps=steps, epochs=10_000,
                         log_every=10, save_every=10_000, val_every=10_000, **extra)
    index = torch.device(device).index or 0
    start = time.perf_counter()
    with GpuSampler(index) as gpu:
        summary = train(config)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_records = [r for r in records if r["kind"] == "step"][1:]  # skip the warm-up window
    rate = (sum(r["images_per_s"] for r in steps_records) / len(steps_records)
            if steps_records else None)
    wait = (sum(r["loader_wait"] for r in steps_records) / len(steps_records)
            if steps_records else None)
    return {"arch": arch, "batch": batch, "workers": workers, "steps": summary["steps"],
            "seconds": round(wall, 1), "images_per_s": rate and round(rate, 1),
            "loader_wait": wait and round(wait, 3), "gpu_util_mean": gpu.mean,
            "loader_kept_up": wait is not None and wait < 0.05,
            "skipped": summary["skipped"], **{k: v for k, v in extra.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=120.0, help="per training run")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(16, max(1, available_cores() - 1)))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp)")
    parser.add_argument("--distortions", default="vipnet", help="types of the shards")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --device cpu to test the script)")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    info = {"torch": torch.__version__, "cores": available_cores(), "workers": args.workers}
    if not cpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    print(json.dumps(info), flush=True)
    start = time.perf_counter()
    webp = make_shards(work, "webp", args.workers, args.distortions)
    zstd = make_shards(work, "zstd", args.workers, args.distortions)
    print(json.dumps({"shards_written_s": round(time.perf_counter() - start, 1)}), flush=True)
    archs = ["tiny"] if cpu else ["resnet50", "botnet50"]
    guess = 20.0 if cpu else 10.0  # steps/s, only to size the runs
    for arch in archs:
        for shards, fmt in ((webp, "webp"), (zstd, "zstd")):
            seconds = args.seconds if fmt == "webp" else args.seconds / 4
            result = timed_run(shards, work / f"{arch}_{fmt}", arch, args.device,
                               args.batch, args.workers, seconds, guess,
                               **({"input_size": (64, 48)} if cpu else {}))
            print(json.dumps({"format": fmt, **result}), flush=True)
    # the same code path with validation and a resume, briefly
    out = work / "resume"
    for steps, resume in ((20, False), (30, True)):
        summary = train(TrainConfig(shards=webp, val_shards=webp, out=str(out), arch=archs[0],
                                    device=args.device, batch_size=args.batch,
                                    workers=args.workers, max_steps=steps, epochs=10_000,
                                    log_every=10, resume=resume, val_every=10_000,
                                    **({"input_size": (64, 48)} if cpu else {})))
    print(json.dumps({"resume_check": summary["steps"] == 30,
                      "val_top1": summary["last"].get("val", {}).get("top1")}), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
