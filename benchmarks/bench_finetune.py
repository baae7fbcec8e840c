"""Throughput of VIPNet fine-tuning and inference: patches/s and images/s.

Writes a small synthetic dataset (the bundled 512x384 references, JPEG-distorted at
several levels), then times one fine-tuning epoch (decode, random crops, forward,
backward, step; the frozen DPM built from a freshly initialised checkpoint of the
requested architecture) and the test-time scoring of every image (fixed crops,
mean).  Runs on CUDA when available (bf16 autocast), else CPU.

    python benchmarks/bench_finetune.py --cpm-arch resnet50 --dpm-arch botnet50 --images 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from biqa.data import sample_reference_paths
from biqa.distortions import distort
from biqa.training.data import NORMALISATION
from biqa.training.device import amp_dtype, grad_scaler, resolve_device
from biqa.training.finetune import TrainPatches, predict, train_epoch
from biqa.training.models import create_model
from biqa.training.pretrain import save_checkpoint
from biqa.training.vipnet import build_vipnet


def synthetic_images(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG-distorted copies of the bundled references (512x384 PNG)."""
    refs = [np.asarray(Image.open(p).convert("RGB")) for p in sample_reference_paths()]
    paths = []
    for i in range(count):
        image = distort(refs[i % len(refs)], "jpeg", 1 + i % 5, rng=i)
        paths.append(folder / f"img{i:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def dpm_checkpoint(folder: Path, arch: str, patch_size: tuple[int, int]) -> Path:
    """An untrained DPM in biqa-train-dpm's format (timing does not depend on weights)."""
    model = create_model(arch, num_classes=150, input_size=patch_size)
    path = folder / "dpm.pt"
    config = {"arch": arch, "num_classes": 150, "input_size": list(patch_size),
              "class_table": [], "normalisation": NORMALISATION}
    save_checkpoint(path, {"model": model.state_dict(), "config": config})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpm-arch", default="resnet50")
    parser.add_argument("--dpm-arch", default="botnet50")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--patches", type=int, default=2)
    parser.add_argument("--patch-size", default="384x288")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    patch_size = tuple(int(v) for v in args.patch_size.split("x"))
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = synthetic_images(tmp, args.images)
        model, _ = build_vipnet(args.cpm_arch, dpm=dpm_checkpoint(tmp, args.dpm_arch, patch_size),
                                patch_size=patch_size)
        model.to(device)
        optimiser = torch.optim.Adam(model.trainable_parameters(), lr=5e-4)
        patches = TrainPatches(paths, np.zeros(len(paths)), patch_size, args.patches, seed=(0,))
        loader = DataLoader(patches, batch_size=args.batch_size, num_workers=args.workers,
                            shuffle=False, pin_memory=device.type == "cuda")
        scaler = grad_scaler(device, amp_dtype(device))
        train_epoch(model, optimiser, [next(iter(loader))], device, scaler)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_epoch(model, optimiser, loader, device, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        predict(model, paths, patch_size, args.patches, device, args.batch_size, args.workers)
        infer_s = time.perf_counter() - start
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(), "cpm": args.cpm_arch, "dpm": args.dpm_arch,
        "patch_size": args.patch_size, "patches_per_image": args.patches,
        "train_patches_per_s": len(patches) / train_s,
        "train_images_per_s": len(paths) / train_s,
        "infer_patches_per_s": len(paths) * args.patches / infer_s,
        "infer_images_per_s": len(paths) / infer_s,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
