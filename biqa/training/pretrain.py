"""DPM pre-training (VIPNet's distortion perception model): classify (type, level) of
synthetic distortions, optionally with a PINet-style ranking loss, from streamed shards,
on a CPU or data-parallel over GPUs under ``torchrun``.

``train(TrainConfig(shards="shards/"))`` is VIPNet's recipe: BoTNet-50 on YCbCr at 384x288,
SGD (lr 0.05, momentum 0.9, weight decay 1e-4), cosine annealing with warm restarts
(T_0 = 8 epochs, T_mult = 2, eta_min = 1e-4, stepped every iteration), gradient clipping
at norm 2, cross-entropy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from biqa.shards.writer import atomic_write

from .data import (LEVELS, NORMALISATION, KadidDataset, ShardSet, ShardStream, make_loader,
                   dpm_input, open_shards)
from .models import (ARCHS, create_model, load_torchvision_weights, read_torch_file,
                     write_torch_file)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a run needs; saved (as a plain dict) inside every checkpoint."""
    shards: str
    val_shards: str | None = None
    out: str = "runs/dpm"
    arch: str = "botnet50"
    epochs: int = 40
    max_steps: int | None = None
    batch_size: int = 64  # per process
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    restart_epochs: int = 8  # cosine warm restarts: T_0 (epochs), T_mult = 2
    min_lr: float = 1e-4
    workers: int = 4
    device: str | None = None  # None: cuda if available
    amp: bool | None = None  # None: on for CUDA
    ranking_weight: float = 0.0
    ranking_margin: float = 0.5
    resume: bool = False
    input_size: tuple[int, int] = (384, 288)  # (width, height)
    init_weights: str | None = None
    compile: bool = False
    log_every: int = 50
    save_every: int = 1000
    val_every: int = 1  # epochs; the last step always validates
    kadid_root: str | None = None
    seed: int = 0
    shuffle_buffer: int = 256

    def validate(self) -> None:
        """Reject bad values before any work starts."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "log_every": self.log_every, "save_every": self.save_every,
                    "val_every": self.val_every,
                    "shuffle_buffer": self.shuffle_buffer, "restart_epochs": self.restart_epochs}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.workers < 0 or self.ranking_weight < 0:
            raise ValueError("workers and ranking_weight must be >= 0")
        if len(self.input_size) != 2 or min(self.input_size) < 32:
            raise ValueError(f"input_size must be (width, height) >= 32, got {self.input_size}")
        if self.ranking_weight > 0 and self.batch_size % 2:
            raise ValueError("with ranking the batch holds pairs: batch_size must be even")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[0]


# ----------------------------------------------------------------------------- model
class PretrainNet(nn.Module):
    """Backbone + optional quality head (linear on globally pooled last features), one module
    so DDP sees both."""

    def __init__(self, backbone: nn.Module, with_quality: bool):
        super().__init__()
        self.backbone = backbone
        self.quality = nn.Linear(backbone.feature_channels[-1], 1) if with_quality else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        last = self.backbone.forward_features(x)[-1]
        logits = self.backbone.forward_head(last)
        quality = None if self.quality is None else self.quality(last.mean((2, 3))).squeeze(1)
        return logits, quality


def pair_ranking_loss(quality: torch.Tensor, levels: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin ranking over pairs laid out as (2i, 2i+1): the lower level (milder distortion)
    must score higher by ``margin``; pairs of equal level carry no order and are ignored."""
    q, lv = quality.float().view(-1, 2), levels.view(-1, 2)
    target = torch.sign(lv[:, 1] - lv[:, 0]).to(q.dtype)
    keep = target != 0
    if not keep.any():
        return q.sum() * 0.0
    return F.margin_ranking_loss(q[keep, 0], q[keep, 1], target[keep], margin=margin)


# ----------------------------------------------------------------------------- checkpoints
def _plain_config(config: TrainConfig, shards: ShardSet) -> dict:
    plain = dataclasses.asdict(config)
    plain["input_size"] = list(config.input_size)
    plain.update(num_classes=shards.num_classes, class_table=shards.class_table,
                 normalisation=NORMALISATION, levels=LEVELS)
    return plain


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically: a crash or a full disk never leaves a torn checkpoint."""
    write_torch_file(path, state)


def load_dpm(path: str | Path, map_location: str | torch.device = "cpu"
             ) -> tuple[nn.Module, dict]:
    """(backbone with its classifier, config dict) from a checkpoint of ``train``.  The model
    is in eval mode; ``config`` holds arch, num_classes, input_size, class_table,
    normalisation."""
    state = read_torch_file(path, "a biqa-train-dpm checkpoint", map_location)
    try:
        config = state["config"]
        model = create_model(config["arch"], config["num_classes"],
                             input_size=tuple(config["input_size"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a biqa-train-dpm checkpoint (a dict with 'model' "
                         f"and a 'config' naming arch, num_classes, input_size): {exc!r}") \
            from None
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), config


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- evaluation
def _evaluate(net: PretrainNet, loader, device: torch.device, num_classes: int,
              channels_last: bool) -> np.ndarray:
    """Confusion matrix (true x predicted)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    net.eval()
    with torch.no_grad():
        for batch in loader:
            x = _to_input(batch["image"], device, channels_last)
            logits, _ = net(x)
            pred = logits.argmax(1).cpu()
            confusion += torch.bincount(batch["label"] * num_classes + pred,
                                        minlength=num_classes ** 2).view(num_classes, -1)
    net.train()
    return confusion.numpy()


def _ranking_accuracy(net: PretrainNet, loader, device: torch.device,
                      channels_last: bool) -> float:
    """Fraction of ordered held-out pairs whose predicted quality order matches the levels."""
    right = total = 0
    net.eval()
    with torch.no_grad():
        for batch in loader:
            x = _to_input(batch["image"].flatten(0, 1), device, channels_last)
            q = net(x)[1].float().view(-1, 2).cpu()
            lv = batch["level"].view(-1, 2)
            order = torch.sign(lv[:, 1] - lv[:, 0])
            keep = order != 0
            right += int((torch.sign(q[:, 0] - q[:, 1])[keep] == order[keep]).sum())
            total += int(keep.sum())
    net.train()
    return right / max(total, 1)


def accuracy_summary(confusion: np.ndarray, class_table: list[dict]) -> dict:
    """Top-1 over all classes and per distortion type (name -> accuracy)."""
    total = int(confusion.sum())
    per_type = {}
    for entry in class_table:
        rows = slice(entry["class_base"], entry["class_base"] + LEVELS)
        seen = int(confusion[rows].sum())
        if seen:
            per_type[entry["name"]] = float(np.trace(confusion[rows, rows]) / seen)
    return {"top1": float(np.trace(confusion) / total) if total else 0.0, "samples": total,
            "per_type": per_type}


def save_confusion_png(confusion: np.ndarray, class_table: list[dict], path: str | Path) -> None:
    """Row-normalised confusion matrix as a heat map (white 0 -> dark blue 1), a grid line
    between distortion types, type ids along the left edge."""
    from PIL import Image, ImageDraw, ImageFont
    n = confusion.shape[0]
    cell = max(2, min(24, 900 // n))
    margin = 28
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    shade = (255 * (1 - share)).astype(np.uint8)
    rgb = np.stack([shade, shade, np.full_like(shade, 255)], -1)
    rgb[np.arange(n), np.arange(n)] = np.stack(
        [shade.diagonal(), (128 + shade.diagonal() // 2).astype(np.uint8), shade.diagonal()], -1)
    heat = Image.fromarray(rgb).resize((n * cell, n * cell), Image.NEAREST)
    canvas = Image.new("RGB", (n * cell + margin, n * cell + margin), "white")
    canvas.paste(heat, (margin, margin))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for entry in class_table:
        at = margin + entry["class_base"] * cell
        draw.line([(margin, at), (margin + n * cell, at)], fill=(160, 160, 160))
        draw.line([(at, margin), (at, margin + n * cell)], fill=(160, 160, 160))
        draw.text((2, at + 1), str(entry["id"]), fill="black", font=font)
        draw.text((at + 1, 2), str(entry["id"]), fill="black", font=font)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


# ----------------------------------------------------------------------------- plumbing
def _to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = dpm_input(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _init_distributed(use_cuda: bool) -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


class _MetricsLog:
    """metrics.jsonl (rank 0): one JSON object per line, flushed, appended across resumes."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal, None otherwise (plain log lines are written instead)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- training
def train(config: TrainConfig) -> dict:
    """Run (or resume) DPM pre-training; returns a summary: steps, epochs, best_acc, last
    validation, skipped samples, checkpoint paths."""
    config.validate()
    use_cuda = config.device == "cuda" or (config.device is None and torch.cuda.is_available())
    rank, world, local_rank = _init_distributed(use_cuda)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    elif rank == 0 and config.arch != "tiny":
        log.warning("training %s on the CPU: this will be slow (use --device cuda)", config.arch)
    amp = use_cuda if config.amp is None else config.amp and use_cuda
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    shards = open_shards(config.shards)
    val_shards = open_shards(config.val_shards) if config.val_shards else None
    if val_shards is not None and val_shards.class_table != shards.class_table:
        raise ValueError("--val-shards have another type table than --shards")
    kadid = (KadidDataset(config.kadid_root, shards.class_table, config.input_hw)
             if config.kadid_root else None)
    pairs = config.ranking_weight > 0
    train_set = ShardStream(shards, config.input_hw, config.batch_size // 2 if pairs
                            else config.batch_size, train=True, pairs=pairs, seed=config.seed,
                            rank=rank, world=world, shuffle_size=config.shuffle_buffer)
    steps_per_epoch = train_set.steps_per_epoch()
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    torch.manual_seed(config.seed * 1000 + rank)
    backbone = create_model(config.arch, shards.num_classes, input_size=tuple(config.input_size))
    if config.init_weights:
        load_torchvision_weights(backbone, config.init_weights)
    net = PretrainNet(backbone, pairs).to(device)
    channels_last = use_cuda
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_epochs, T_mult=2, eta_min=config.min_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    plain_config = _plain_config(config, shards)
    step, best_acc = 0, -1.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if config.resume and last_path.is_file():
        state = read_torch_file(last_path, "a biqa-train-dpm checkpoint", device)
        for key in ("arch", "num_classes", "input_size"):
            if state["config"][key] != plain_config[key]:
                raise ValueError(f"--resume: {last_path} has {key}={state['config'][key]!r}, "
                                 f"this run {plain_config[key]!r}")
        backbone.load_state_dict(state["model"])
        if pairs and state.get("quality_head"):
            net.quality.load_state_dict(state["quality_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_acc = int(state["step"]), float(state["best_acc"])
        if rank == 0:
            _set_rng_state(state["rng"], device)
        log.info("resumed from %s at step %d", last_path, step)
    elif config.resume and rank == 0:
        log.warning("--resume: no %s yet, starting from scratch", last_path)

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if use_cuda else None)
    if config.compile:
        model = torch.compile(model)

    def checkpoint(epoch: int) -> dict:
        return {"model": backbone.state_dict(),
                "quality_head": net.quality.state_dict() if pairs else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": epoch, "rng": _rng_state(device),
                "best_acc": best_acc, "config": plain_config}

    def validate_and_save(epoch: int) -> dict:
        nonlocal best_acc
        record: dict = {"kind": "epoch", "step": step, "epoch": epoch}
        if rank == 0:
            record.update(_validation(net, val_shards, kadid, config, device, channels_last,
                                      shards, out))
            acc = record.get("val", {}).get("top1")
            improved = acc is not None and acc > best_acc
            best_acc = acc if improved else best_acc
            save_checkpoint(last_path, checkpoint(epoch))
            if improved:
                save_checkpoint(best_path, checkpoint(epoch))
            record["best_acc"] = best_acc
            metrics.write(record)
            log.info("epoch %d step %d: %s", epoch, step, json.dumps(
                {k: v for k, v in record.items() if k not in ("kind",)}))
        if world > 1:
            dist.barrier()
        return record

    metrics = _MetricsLog(out / "metrics.jsonl", rank == 0)
    bar = _progress(total_steps, step, rank == 0)
    loader = make_loader(train_set, train_set.batch_size, config.workers, use_cuda)
    window = {"loss": 0.0, "rank_loss": 0.0, "right": 0, "seen": 0, "steps": 0, "skipped": 0,
              "t0": time.perf_counter()}
    skipped_total = 0
    last_record: dict = {}
    net.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        done_in_epoch = step - epoch * steps_per_epoch
        train_set.set_epoch(epoch, restart=step if done_in_epoch else 0)
        steps_now = min(steps_per_epoch - done_in_epoch, total_steps - step)
        for batch in islice(loader, steps_now):
            loss, rank_loss, right, seen = _train_step(model, net, batch, optimizer, scaler,
                                                       config, device, channels_last,
                                                       amp_dtype if amp else None)
            step += 1
            scheduler.step(step / steps_per_epoch)
            # running sums stay on the device: no host sync per step
            window["loss"] += loss
            window["rank_loss"] += rank_loss
            window["right"] += right
            window["seen"] += seen
            window["steps"] += 1
            window["skipped"] += int(batch["skipped"].sum())
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                _sum_over_ranks(window, ("skipped",), device, world)
                skipped_total += window["skipped"]
                last_record = _log_window(window, step, epoch, scheduler, world, metrics, bar,
                                          total_steps, pairs)
            if step % config.save_every == 0 and rank == 0:
                save_checkpoint(last_path, checkpoint(epoch))
        epoch_done = (step - 1) // steps_per_epoch
        if (epoch_done + 1) % config.val_every == 0 or step == total_steps:
            last_record = {**last_record, **validate_and_save(epoch_done)}
        elif rank == 0:
            save_checkpoint(last_path, checkpoint(epoch_done))
    if bar is not None:
        bar.close()
    metrics.close()
    skipped_total += window["skipped"]
    return {"steps": step, "steps_per_epoch": steps_per_epoch, "best_acc": best_acc,
            "last": last_record, "skipped": skipped_total, "rank": rank, "world": world,
            "last_checkpoint": str(last_path), "best_checkpoint": str(best_path)}


def _train_step(model: nn.Module, net: PretrainNet, batch: dict, optimizer, scaler,
                config: TrainConfig, device: torch.device, channels_last: bool,
                amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                        int]:
    """One SGD step; returns (classification loss, ranking loss, correct, images), detached
    and still on the device."""
    pairs = net.quality is not None
    images, labels, levels = batch["image"], batch["label"], batch["level"]
    if pairs:  # (B/2, 2, ...) -> (B, ...), pair i at rows 2i and 2i+1
        images, labels, levels = images.flatten(0, 1), labels.flatten(), levels.flatten()
    x = _to_input(images, device, channels_last)
    labels = labels.to(device, non_blocking=True)
    precision = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                 else contextlib.nullcontext())
    with precision:
        logits, quality = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    rank_loss = (pair_ranking_loss(quality, levels.to(device), config.ranking_margin) if pairs
                 else torch.zeros((), device=device))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss + config.ranking_weight * rank_loss).backward()
    scaler.unscale_(optimizer)
    if config.grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    right = (logits.detach().argmax(1) == labels).sum()
    return loss.detach(), rank_loss.detach(), right, labels.numel()


def _sum_over_ranks(window: dict, keys: tuple[str, ...], device: torch.device,
                    world: int) -> None:
    """Replace per-rank counts by their sum over all ranks (every rank calls this)."""
    if world == 1:
        return
    values = torch.tensor([float(window[k]) for k in keys], device=device)
    dist.all_reduce(values)
    for key, value in zip(keys, values.tolist()):
        window[key] = int(value)


def _log_window(window: dict, step: int, epoch: int, scheduler, world: int, metrics: _MetricsLog,
                bar, total_steps: int, pairs: bool) -> dict:
    """Write the running means since the last log line, then reset the window."""
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    n = max(window["steps"], 1)
    record = {"kind": "step", "step": step, "epoch": epoch, "loss": float(window["loss"]) / n,
              "acc": float(window["right"]) / max(window["seen"], 1),
              "lr": scheduler.get_last_lr()[0],
              "images_per_s": window["seen"] * world / elapsed, "skipped": window["skipped"]}
    if pairs:
        record["rank_loss"] = float(window["rank_loss"]) / n
    metrics.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                        img_s=f"{record['images_per_s']:.0f}")
    elif metrics.file is not None:
        log.info("step %d/%d epoch %d loss %.4f acc %.3f lr %.5f %.1f img/s", step, total_steps,
                 epoch, record["loss"], record["acc"], record["lr"], record["images_per_s"])
    window.update(loss=0.0, rank_loss=0.0, right=0, seen=0, steps=0, skipped=0,
                  t0=time.perf_counter())
    return record


def _validation(net: PretrainNet, val_shards: ShardSet | None, kadid: KadidDataset | None,
                config: TrainConfig, device: torch.device, channels_last: bool,
                shards: ShardSet, out: Path) -> dict:
    """Validation on the held-out shards (top-1, per type, confusion PNG, pair ranking) and on
    KADID-10k; empty when neither is configured."""
    result: dict = {}
    batch = config.batch_size
    if val_shards is not None:
        stream = ShardStream(val_shards, config.input_hw, batch, train=False, seed=config.seed)
        confusion = _evaluate(net, make_loader(stream, batch, config.workers, False), device,
                              shards.num_classes, channels_last)
        summary = accuracy_summary(confusion, shards.class_table)
        # every sample is read once, so the manifest's count tells how many were unreadable
        result["val"] = {**summary, "skipped": sum(val_shards.counts) - summary["samples"]}
        save_confusion_png(confusion, shards.class_table, out / "confusion.png")
        if net.quality is not None:
            pair_stream = ShardStream(val_shards, config.input_hw, batch // 2, train=False,
                                      pairs=True, seed=config.seed)
            result["val"]["pair_ranking_acc"] = _ranking_accuracy(
                net, make_loader(pair_stream, batch // 2, config.workers, False), device,
                channels_last)
    if kadid is not None:
        confusion = _evaluate(net, make_loader(kadid, batch, config.workers, False), device,
                              shards.num_classes, channels_last)
        result["kadid10k"] = accuracy_summary(confusion, shards.class_table)
        save_confusion_png(confusion, shards.class_table, out / "confusion_kadid10k.png")
    return result
