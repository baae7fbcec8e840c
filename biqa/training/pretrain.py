"""DPM pre-training (VIPNet's distortion perception model): classify (type, level) of
synthetic distortions, optionally with a PINet-style ranking loss, from streamed shards,
on a CPU or data-parallel over GPUs under ``torchrun``.

``train(TrainConfig(shards="shards/"))`` is VIPNet's recipe: BoTNet-50 on YCbCr at 384x288,
SGD (lr 0.05, momentum 0.9, weight decay 1e-4), cosine annealing with warm restarts
(T_0 = 8 epochs, T_mult = 2, eta_min = 1e-4, stepped every iteration), gradient clipping
at norm 2, cross-entropy.

Data parallelism: every rank reads its own shards and takes the same number of steps;
validation is sharded over the ranks too (confusion matrices summed); rank 0 alone reads
and writes checkpoints, and what it resumes from (weights, optimiser, scheduler, scaler,
step, every rank's RNG) is broadcast, so ranks agree even without a shared file system.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import spearmanr
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from biqa.shards.reader import ShardSet, open_shards
from biqa.shards.writer import atomic_write, atomic_write_bytes, remove_own_partials

from .config import TrainConfig
from .data import (LEVELS, NORMALISATION, KadidDataset, NoReadableShards, ShardStream,
                   dpm_input, make_loader, training_batches)
from .device import amp_dtype, autocast, dtype_name, grad_scaler, resolve_device
from .dpm_weights import load_init_weights
from .models import create_model, load_saved_weights, read_torch_file, write_torch_file

__all__ = ["TrainConfig", "train", "load_dpm", "save_checkpoint", "evaluate_checkpoint",
           "model_input"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model
class PretrainNet(nn.Module):
    """Backbone + optional heads on the globally pooled last features -- a quality score
    (ranking) and full-reference metric predictions (weak labels) -- one module so DDP sees
    all of them."""

    def __init__(self, backbone: nn.Module, with_quality: bool, regress: int = 0):
        super().__init__()
        self.backbone = backbone
        width = backbone.feature_channels[-1]
        self.quality = nn.Linear(width, 1) if with_quality else None
        self.regression = nn.Linear(width, regress) if regress else None

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        last = self.backbone.forward_features(x)[-1]
        logits = self.backbone.forward_head(last)
        pooled = last.mean((2, 3))
        quality = None if self.quality is None else self.quality(pooled).squeeze(1)
        metrics = None if self.regression is None else self.regression(pooled)
        return logits, quality, metrics


def pair_ranking_loss(quality: torch.Tensor, better: torch.Tensor, margin: float) -> torch.Tensor:
    """Margin ranking over pairs laid out as (2i, 2i+1): the image with the larger ``better``
    (the milder level, or the higher pseudo-MOS) must score higher by ``margin``; ties and
    unknown (NaN) orders are ignored.  The mean over the ordered pairs is taken without
    asking the device whether there are any (a host sync every step)."""
    q, key = quality.float().view(-1, 2), better.float().view(-1, 2)
    target = torch.nan_to_num(torch.sign(key[:, 0] - key[:, 1]), nan=0.0)
    hinge = torch.relu(margin - target * (q[:, 0] - q[:, 1])) * target.abs()
    return hinge.sum() / target.abs().sum().clamp(min=1.0)


def target_statistics(shards: ShardSet, names: tuple[str, ...]) -> tuple[tuple, tuple]:
    """(means, standard deviations) of the regressed scores over the whole run, from the
    manifest (biqa-gen sums them per shard): targets are standardised with them, so every
    metric weighs alike whatever its range."""
    stats = [shards.fr_stats.get(name) or {} for name in names]
    missing = [n for n, s in zip(names, stats) if not s.get("std")]
    if missing:
        raise ValueError(f"the manifest has no statistics of {', '.join(missing)} to "
                         f"standardise the regression with: generate the shards with "
                         f"biqa-gen --fr-metrics {','.join(missing)}")
    return tuple(s["mean"] for s in stats), tuple(s["std"] for s in stats)


def regression_targets(values: torch.Tensor, means: tuple, stds: tuple) -> torch.Tensor:
    """(n, metrics) scores -> standardised targets; undefined scores (NaN, and the +inf PSNR
    of an image identical to its reference) become NaN: not learned."""
    mean = torch.tensor(means, dtype=values.dtype)
    std = torch.tensor(stds, dtype=values.dtype)
    targets = (values - mean) / std
    return torch.where(torch.isfinite(targets), targets, torch.full_like(targets, math.nan))


def regression_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Smooth L1 over the known targets (NaN marks an undefined score)."""
    known = ~torch.isnan(targets)
    error = F.smooth_l1_loss(predicted.float(), torch.nan_to_num(targets), reduction="none")
    return (error * known).sum() / known.sum().clamp(min=1)


# ----------------------------------------------------------------------------- checkpoints
def _plain_config(config: TrainConfig, shards: ShardSet) -> dict:
    plain = config.as_dict()
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
    load_saved_weights(model, state["model"], path)
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


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the lines a resumed run will write again (those after the resumed step), and a
    line torn by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except ValueError:
            continue
    atomic_write_bytes(path, "".join(kept).encode())


# ----------------------------------------------------------------------------- distribution
class _Dist:
    """The process group of a torchrun launch (or a single process): rank, world size and
    the few collectives the loop needs, all no-ops when there is one process."""

    def __init__(self, use_cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            if use_cuda:  # before NCCL sets up: its communicator binds the current device
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.device = torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (on the collective's device, returned on the original)."""
        if self.world > 1:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere.  DDP broadcasts buffers at the start of
        each forward, so after a step every rank holds the statistics of its own last batch:
        sharded validation (and the checkpoint, which is rank 0's) need one set."""
        if self.world > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- evaluation
def model_input(parts, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC batch parts (pairs: N×2×H×W×3) -> the DPM input on ``device``: the parts
    travel as they are and are joined and converted there; channels-last costs nothing
    because the loader's layout already is."""
    if isinstance(parts, torch.Tensor):
        parts = [parts]
    moved = [p.to(device, non_blocking=True) for p in parts]
    images = moved[0] if len(moved) == 1 else torch.cat(moved)
    if images.dim() == 5:  # pairs, (n, 2, H, W, 3) -> (2n, H, W, 3), pair i at 2i and 2i+1
        images = images.flatten(0, 1)
    x = dpm_input(images.permute(0, 3, 1, 2))
    return x if channels_last else x.contiguous()


class _Validator:
    """Validation on held-out shards and KADID-10k, sharded over ranks: each rank evaluates
    a disjoint part and the confusion matrices (and pair counts) are summed.  Its loaders
    are made once and keep their workers between validations."""

    def __init__(self, config: TrainConfig, shards: ShardSet, val_shards: ShardSet | None,
                 pairs: bool, group: _Dist, workers: int, pin: bool):
        self.num_classes, self.class_table = shards.num_classes, shards.class_table
        self.group = group
        self.regress = tuple(config.regress)
        # with pairs across types, also how well the quality orders each held-out
        # reference's samples by the pseudo-MOS (a stronger measure than a few pairs)
        self.by_pseudo_mos = pairs and config.rank_pairs == "reference"
        batch = config.batch_size
        self.loaders = {}
        if val_shards is not None:
            stream = ShardStream(val_shards, config.input_hw, batch, train=False,
                                 seed=config.seed, rank=group.rank, world=group.world,
                                 regress=self.regress, pair_by=config.rank_pairs,
                                 rank_metric=config.pseudo_mos if self.by_pseudo_mos else None)
            self.loaders["val"] = make_loader(stream, workers, pin)
            self.val_total = val_shards.samples + val_shards.missing_samples
            if pairs:
                pair_stream = ShardStream(val_shards, config.input_hw, max(batch // 2, 1),
                                          train=False, pairs=True, seed=config.seed,
                                          rank=group.rank, world=group.world,
                                          pair_by=config.rank_pairs,
                                          rank_metric=config.pseudo_mos)
                self.loaders["pairs"] = make_loader(pair_stream, workers, pin)
        if config.kadid_root:
            kadid = KadidDataset(config.kadid_root, shards.class_table, config.input_hw)
            part = Subset(kadid, range(group.rank, len(kadid), group.world))
            self.loaders["kadid10k"] = make_loader(part, workers, pin, batch_size=batch)

    def __bool__(self) -> bool:
        return bool(self.loaders)

    def _confusion(self, net, loader, device, channels_last, dtype, warn, heads: bool = True
                   ) -> tuple[np.ndarray, dict]:
        """The confusion matrix, and with ``heads`` (data that carries full-reference scores:
        shards, not KADID-10k) the SRCCs of the heads: per regressed metric over all
        samples, and of the quality against the pseudo-MOS within each reference."""
        scored = heads and bool(self.regress or self.by_pseudo_mos)
        confusion = torch.zeros(self.num_classes ** 2, dtype=torch.int64)
        outputs: list[tuple] = []  # (regressed, targets, quality, pseudo-MOS, refs) per batch
        with torch.no_grad(), autocast(device, dtype):
            for batch in loader:
                for line in batch.get("warnings", []):
                    warn(line)
                if len(batch["label"]) == 0:
                    continue
                logits, quality, metrics = net(model_input(batch["image"], device,
                                                           channels_last))
                pred = logits.argmax(1).cpu()
                confusion += torch.bincount(batch["label"] * self.num_classes + pred,
                                            minlength=self.num_classes ** 2)
                if scored:
                    outputs.append((
                        None if metrics is None else metrics.float().cpu().numpy(),
                        batch["targets"].numpy(),
                        None if quality is None else quality.float().cpu().numpy(),
                        batch["better"].numpy(), list(batch["ref"])))
        self.group.sum_(confusion)
        scores, every = {}, []
        if scored:  # a collective: every rank takes part
            every = [o for part in self.group.gather(outputs) for o in part]
        if self.regress and every:
            predicted = np.concatenate([o[0] for o in every])
            targets = np.concatenate([o[1] for o in every])
            scores["regression_srcc"] = {
                name: _srcc(predicted[:, i], targets[:, i])
                for i, name in enumerate(self.regress)}
        if self.by_pseudo_mos and every:
            quality = np.concatenate([o[2] for o in every])
            better = np.concatenate([o[3] for o in every])
            refs = np.array([r for o in every for r in o[4]])
            per_ref = [_srcc(quality[refs == r], better[refs == r]) for r in np.unique(refs)]
            per_ref = [v for v in per_ref if v is not None]
            scores["pseudo_mos_srcc"] = float(np.mean(per_ref)) if per_ref else None
        return confusion.view(self.num_classes, -1).numpy(), scores

    def _ranking(self, net, loader, device, channels_last, dtype) -> float:
        """Share of the held-out pairs with an order whose predicted order is right."""
        counts = torch.zeros(2, dtype=torch.int64)  # right, total
        with torch.no_grad(), autocast(device, dtype):
            for batch in loader:
                if len(batch["label"]) == 0:
                    continue
                q = net(model_input(batch["image"], device, channels_last))[1].float()
                q = q.view(-1, 2).cpu()
                key = batch["better"].view(-1, 2)
                order = torch.nan_to_num(torch.sign(key[:, 0] - key[:, 1]), nan=0.0)
                keep = order != 0
                counts[0] += int((torch.sign(q[:, 0] - q[:, 1])[keep] == order[keep]).sum())
                counts[1] += int(keep.sum())
        self.group.sum_(counts)
        return int(counts[0]) / max(int(counts[1]), 1)

    def run(self, net, device, channels_last, dtype, out: Path, warn) -> dict:
        """Validation results (rank 0 also writes the confusion matrices as PNG and JSON)."""
        result: dict = {}
        self.group.sync_buffers(net)
        net.eval()
        if "val" in self.loaders:
            confusion, scores = self._confusion(net, self.loaders["val"], device,
                                                channels_last, dtype, warn)
            summary = accuracy_summary(confusion, self.class_table)
            result["val"] = {**summary, "skipped": self.val_total - summary["samples"],
                             **scores}
            self._write(confusion, out / "confusion")
            if "pairs" in self.loaders:
                result["val"]["pair_ranking_acc"] = self._ranking(
                    net, self.loaders["pairs"], device, channels_last, dtype)
        if "kadid10k" in self.loaders:
            confusion, _ = self._confusion(net, self.loaders["kadid10k"], device,
                                           channels_last, dtype, warn, heads=False)
            result["kadid10k"] = accuracy_summary(confusion, self.class_table)
            self._write(confusion, out / "confusion_kadid10k")
        net.train()
        return result

    def _write(self, confusion: np.ndarray, stem: Path) -> None:
        if self.group.rank == 0:
            save_confusion_png(confusion, self.class_table, stem.with_suffix(".png"))
            atomic_write_bytes(stem.with_suffix(".json"),
                               json.dumps({"class_table": self.class_table,
                                           "confusion": confusion.tolist()}).encode())


def _srcc(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    """Spearman correlation over the known truths (NaN is unknown; an infinite PSNR is the
    best score); None when fewer than three, or when either side is constant."""
    known = ~np.isnan(truth)
    if known.sum() < 3 or np.ptp(predicted[known]) == 0 or np.ptp(truth[known]) == 0:
        return None
    return float(spearmanr(predicted[known], truth[known])[0])


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


def evaluate_checkpoint(checkpoint: str | Path, val_shards: str, batch_size: int = 64,
                        workers: int = 0, device: str | None = "auto") -> np.ndarray:
    """The confusion matrix (true x predicted) of a ``train`` checkpoint on ``val_shards``
    in one process: what sharded validation must reproduce."""
    dev = resolve_device(device)
    model, config = load_dpm(checkpoint, dev)
    shards = open_shards(val_shards, allow_incomplete=True)
    if shards.class_table != config["class_table"]:
        raise ValueError(f"{val_shards} has another type table than {checkpoint}")
    train_config = TrainConfig(shards=val_shards, batch_size=batch_size,
                               input_size=tuple(config["input_size"]), seed=config["seed"])
    validator = _Validator(train_config, shards, shards, False, _Dist(False), workers, False)
    net = PretrainNet(model, False).to(dev)
    return validator._confusion(net, validator.loaders["val"], dev, False, None,
                                log.warning)[0]


# ----------------------------------------------------------------------------- training
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


def train(config: TrainConfig) -> dict:
    """Run (or resume) DPM pre-training; returns a summary: steps, epochs, best_acc, last
    validation, skipped samples, checkpoint paths."""
    config.validate()
    if str(config.device or "auto").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device} requested but CUDA is not available")
    use_cuda = str(config.device or "auto") != "cpu" and torch.cuda.is_available()
    group = _Dist(use_cuda)
    try:
        return _train(config, group)
    except NoReadableShards as exc:  # re-raised from a loader worker: keep its message
        message = str(exc).strip().splitlines()[-1]
        raise ValueError(message.split("NoReadableShards: ", 1)[-1]) from None
    finally:
        group.close()


def _train(config: TrainConfig, group: _Dist) -> dict:
    config = config.for_world(group.world)
    config.validate()
    device = resolve_device(config.device, group.local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        group.device = device
    rank, world = group.rank, group.world
    dtype = amp_dtype(device, config.amp, config.amp_dtype)
    channels_last = use_cuda if config.channels_last is None else config.channels_last
    workers = config.resolved_workers()
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt", "confusion.png", "confusion.json",
                     "confusion_kadid10k.png", "confusion_kadid10k.json", "metrics.jsonl"):
            remove_own_partials(out / name)  # of a run killed while writing

    shards = open_shards(config.shards, config.allow_incomplete)
    val_shards = (open_shards(config.val_shards, config.allow_incomplete)
                  if config.val_shards else None)
    if val_shards is not None and val_shards.class_table != shards.class_table:
        raise ValueError("--val-shards have another type table than --shards")
    for missing in (shards.missing + (val_shards.missing if val_shards else []))[:5]:
        log.warning("shard missing, its samples are skipped: %s", missing)
    pairs = config.ranking_weight > 0
    standardise = target_statistics(shards, tuple(config.regress)) if config.regress else ()
    train_set = ShardStream(shards, config.input_hw, config.batch_size // 2 if pairs
                            else config.batch_size, train=True, pairs=pairs, seed=config.seed,
                            rank=rank, world=world, pair_by=config.rank_pairs,
                            rank_metric=config.pseudo_mos, regress=tuple(config.regress))
    steps_per_epoch = train_set.steps_per_epoch()
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    torch.manual_seed(config.seed * 1000 + rank)
    backbone = create_model(config.arch, shards.num_classes, input_size=tuple(config.input_size))
    if config.init_weights:
        load_init_weights(backbone, config.init_weights, config.arch, shards.class_table)
    net = PretrainNet(backbone, pairs, len(config.regress)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_epochs, T_mult=2, eta_min=config.min_lr)
    scaler = grad_scaler(device, dtype)

    plain_config = _plain_config(config, shards)
    step, best_acc = 0, -1.0
    state = None
    if config.resume:
        if rank == 0 and last_path.is_file():
            state = read_torch_file(last_path, "a biqa-train-dpm checkpoint", "cpu")
        elif rank == 0:
            log.warning("--resume: no %s yet, starting from scratch", last_path)
        state = group.broadcast(state)  # rank 0 decides, for every rank
    if state is not None:
        for key in ("arch", "num_classes", "input_size"):
            if state["config"][key] != plain_config[key]:
                raise ValueError(f"--resume: {last_path} has {key}={state['config'][key]!r}, "
                                 f"this run {plain_config[key]!r}")
        load_saved_weights(backbone, state["model"], last_path)
        if pairs and state.get("quality_head"):
            net.quality.load_state_dict(state["quality_head"])
        if config.regress and state.get("regression_head"):
            net.regression.load_state_dict(state["regression_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best_acc = int(state["step"]), float(state["best_acc"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank], device)
        else:  # another world size: a fresh stream per rank, derived from the step
            torch.manual_seed(config.seed * 1000 + rank + 7919 * step)
        log.info("rank %d resumed from %s at step %d", rank, last_path, step)
        del state
    if rank == 0:
        _trim_metrics(out / "metrics.jsonl", step)

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if use_cuda else None)
    if config.compile:
        model = torch.compile(model)

    def checkpoint(epoch: int) -> dict | None:
        """The full training state on rank 0 (every rank's RNG gathered; None elsewhere)."""
        rngs = group.gather(_rng_state(device))
        if rank != 0:
            return None
        return {"model": backbone.state_dict(),
                "quality_head": net.quality.state_dict() if pairs else {},
                "regression_head": net.regression.state_dict() if config.regress else {},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "rng": rngs,
                "best_acc": best_acc, "config": plain_config}

    def save(epoch: int, best: bool = False) -> None:
        state_now = checkpoint(epoch)  # collective: every rank calls it
        if state_now is not None:
            save_checkpoint(last_path, state_now)
            if best:
                save_checkpoint(best_path, state_now)

    warned: set[str] = set()

    def warn(line: str) -> None:
        if line not in warned:
            warned.add(line)
            (bar.write if bar is not None else log.warning)(f"rank {rank}: warning: {line}"
                                                            if world > 1 else f"warning: {line}")

    pin = use_cuda
    validator = _Validator(config, shards, val_shards, pairs, group, workers, pin)
    metrics = _MetricsLog(out / "metrics.jsonl", rank == 0)
    if rank == 0:
        log.info("%d samples in %d shards (%d classes); %s on %s%s, %d loader workers, "
                 "batch %d x %d ranks; %d steps per epoch, %d steps to go",
                 shards.samples, len(shards.urls), shards.num_classes, config.arch, device,
                 f" with {dtype_name(dtype)} autocast" if dtype else "",
                 workers, config.batch_size, world, steps_per_epoch, total_steps - step)
    bar = _progress(total_steps, step, rank == 0)
    loader = make_loader(train_set, workers, pin)
    window = _Window(device)
    skipped_total = shards.missing_samples if rank == 0 else 0
    last_record: dict = {}

    def validate_and_save(epoch: int) -> dict:
        nonlocal best_acc
        record: dict = {"kind": "epoch", "step": step, "epoch": epoch}
        record.update(validator.run(net, device, channels_last, dtype, out, warn))
        acc = record.get("val", {}).get("top1")
        improved = acc is not None and acc > best_acc
        best_acc = acc if improved else best_acc
        save(epoch, best=improved)
        record["best_acc"] = best_acc
        metrics.write(record)
        if rank == 0:
            line = f"epoch {epoch} step {step}: " + json.dumps(
                {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")})
            (bar.write if bar is not None else log.info)(line)
        return record

    net.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        done_in_epoch = step - epoch * steps_per_epoch
        train_set.set_epoch(epoch, restart=step if done_in_epoch else 0)
        steps_now = min(steps_per_epoch - done_in_epoch, total_steps - step)
        batches = islice(training_batches(loader, train_set), steps_now)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            window.waited += time.perf_counter() - waited
            for line in batch["warnings"]:
                warn(line)
            loss, rank_loss, reg_loss, right, seen = _train_step(
                model, net, batch, optimizer, scaler, config, device, channels_last, dtype,
                standardise)
            step += 1
            scheduler.step(step / steps_per_epoch if config.schedule_every == "step"
                           else step // steps_per_epoch)
            window.add(loss, rank_loss, reg_loss, right, seen, batch["skipped"])
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == total_steps:
                record = window.record(group, step, epoch, scheduler.get_last_lr()[0], pairs,
                                       bool(config.regress))
                skipped_total += record["skipped"]
                metrics.write(record)
                last_record = record
                _show(record, bar, rank, total_steps)
            if step % config.save_every == 0:
                save(epoch)
        epoch_done = (step - 1) // steps_per_epoch
        if (epoch_done + 1) % config.val_every == 0 or step == total_steps:
            last_record = {**last_record, **validate_and_save(epoch_done)}
        else:
            save(epoch_done)
    if bar is not None:
        bar.close()
    metrics.close()
    return {"steps": step, "steps_per_epoch": steps_per_epoch, "best_acc": best_acc,
            "last": last_record, "skipped": skipped_total, "rank": rank, "world": world,
            "validated": bool(validator), "last_checkpoint": str(last_path),
            "best_checkpoint": str(best_path)}


def _train_step(model: nn.Module, net: PretrainNet, batch: dict, optimizer, scaler,
                config: TrainConfig, device: torch.device, channels_last: bool,
                dtype: torch.dtype | None, standardise: tuple) -> tuple[torch.Tensor, ...]:
    """One SGD step; returns (classification loss, ranking loss, regression loss, correct,
    images), detached and still on the device: nothing here waits for the device."""
    labels = batch["label"].flatten()
    x = model_input(batch["image"], device, channels_last)
    labels = labels.to(device, non_blocking=True)
    with autocast(device, dtype):
        logits, quality, metrics = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    zero = torch.zeros((), device=device)
    rank_loss = (pair_ranking_loss(quality, batch["better"].to(device, non_blocking=True),
                                   config.ranking_margin) if quality is not None else zero)
    reg_loss = zero
    if metrics is not None:
        targets = regression_targets(batch["targets"].flatten(0, -2), *standardise)
        reg_loss = regression_loss(metrics, targets.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    total = loss + config.ranking_weight * rank_loss + config.regression_weight * reg_loss
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    if config.grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    right = (logits.detach().argmax(1) == labels).sum()
    return loss.detach(), rank_loss.detach(), reg_loss.detach(), right, labels.numel()


class _Window:
    """Running sums since the last log line -- losses and correct predictions on the device
    (no sync per step), counts on the host -- reduced over ranks when a line is written:
    mean losses and accuracy of all ranks, images/s of all ranks together, and the share of
    the time the ranks waited for their loaders (near 0: the loader keeps up)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.counts = [0, 0, 0]  # images, steps, skipped samples
        self.waited = 0.0  # seconds spent waiting for the loader
        self.t0 = time.perf_counter()

    def add(self, loss, rank_loss, reg_loss, right, seen: int, skipped: int) -> None:
        self.sums += torch.stack([loss.double(), rank_loss.double(), reg_loss.double(),
                                  right.double()])
        self.counts = [self.counts[0] + seen, self.counts[1] + 1, self.counts[2] + skipped]

    def record(self, group: _Dist, step: int, epoch: int, lr: float, pairs: bool,
               regress: bool) -> dict:
        both = torch.cat([self.sums, torch.tensor([*self.counts, self.waited],
                                                  dtype=torch.float64, device=self.device)])
        (loss, rank_loss, reg_loss, right, seen, steps, skipped,
         waited) = group.sum_(both).tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(steps, 1)
        record = {"kind": "step", "step": step, "epoch": epoch, "loss": loss / steps,
                  "acc": right / max(seen, 1), "lr": lr, "images_per_s": seen / elapsed,
                  "loader_wait": waited / (elapsed * group.world), "skipped": int(skipped)}
        if pairs:
            record["rank_loss"] = rank_loss / steps
        if regress:
            record["regression_loss"] = reg_loss / steps
        self.sums.zero_()
        self.counts = [0, 0, 0]
        self.waited = 0.0
        self.t0 = time.perf_counter()
        return record


def _show(record: dict, bar, rank: int, total_steps: int) -> None:
    if rank != 0:
        return
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                        img_s=f"{record['images_per_s']:.0f}",
                        data_wait=f"{100 * record['loader_wait']:.0f}%")
    else:
        log.info("step %d/%d epoch %d loss %.4f acc %.3f lr %.5f %.1f img/s, %.0f%% waiting "
                 "for data%s", record["step"], total_steps, record["epoch"], record["loss"],
                 record["acc"], record["lr"], record["images_per_s"],
                 100 * record["loader_wait"],
                 f" ({record['skipped']} samples skipped)" if record["skipped"] else "")
