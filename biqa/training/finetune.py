"""The fine-tuning protocol: reference-disjoint rounds, validation-based epoch
selection, one look at the test part per round, cross-dataset tests, results.json.

Per round the content groups (references) are split 80/20 into train and test
(sorted ids, seeded by (seed, round): the same on every machine); a validation
part carved from the training references picks the epoch; the model of that
epoch is saved and evaluated once on the test part and on every ``--cross``
dataset.  ``select_on_test=True`` reproduces the optimistic protocol of the
published code (the best *test* epoch is reported, no validation part) and the
results say so.

Targets are the dataset's scores oriented so that higher is better and
standardised with the training part's mean and spread; the saved model keeps that
scale so ``biqa-score`` answers on the training dataset's own score scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from biqa.shards.writer import atomic_write, atomic_write_bytes, file_digest

from . import metrics
from .config import FinetuneConfig
from .data import crop_box
from .device import amp_dtype, autocast, dtype_name, grad_scaler, resolve_device
from .models import load_saved_weights, read_torch_file, write_torch_file
from .iqa_datasets import IQADataset, Split, check_patch_fits, load_dataset, split_by_content
from .vipnet import VIPNet, build_vipnet, vipnet_from_config

log = logging.getLogger(__name__)

OPTIMISTIC_LABEL = ("test (optimistic: the best test epoch is reported, as in the published "
                    "code; not an unbiased estimate)")
HONEST_LABEL = "validation (references carved from the training part pick the epoch)"


# ---------------------------------------------------------------------- images

def load_rgb(path: str | Path, min_size: tuple[int, int]) -> np.ndarray:
    """An image as uint8 H*W*3 RGB, enlarged (bicubic, aspect kept) if it is smaller
    than ``min_size`` (width, height) so that a patch always fits -- only ``biqa-score``
    meets such images (fine-tuning refuses them, see ``check_patch_fits``) and warns."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    w, h = im.size
    scale = max(min_size[0] / w, min_size[1] / h)
    if scale > 1:
        im = im.resize((math.ceil(w * scale), math.ceil(h * scale)), Image.Resampling.BICUBIC)
    return np.asarray(im)


def _halton(index: int, base: int) -> float:
    """The index-th element of the van der Corput sequence in ``base``."""
    result, f = 0.0, 1.0
    while index > 0:
        f /= base
        result += f * (index % base)
        index //= base
    return result


def fixed_offsets(image_hw: tuple[int, int], patch_hw: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """``n`` evaluation crop positions spread over the image (a 2-D Halton sequence,
    starting from the centre): deterministic, so test scores have no sampling noise."""
    (h, w), (ph, pw) = image_hw, patch_hw
    points = [(0.5, 0.5)] + [(_halton(i, 3), _halton(i, 2)) for i in range(1, n)]
    return [(round(y * (h - ph)), round(x * (w - pw))) for y, x in points]


def _crop(image: np.ndarray, top: int, left: int, patch_hw) -> np.ndarray:
    return image[top:top + patch_hw[0], left:left + patch_hw[1]]


def _chw(patch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))


class TrainPatches(Dataset):
    """``patches`` random crops (with random horizontal flips) of every image per epoch;
    the crop of item i in epoch e comes from (seed, e, i) only, whatever the workers."""

    def __init__(self, paths, targets, patch_size, patches: int, seed: tuple[int, ...]):
        self.paths, self.targets = list(paths), np.asarray(targets, dtype=np.float32)
        self.patch_hw = (patch_size[1], patch_size[0])
        self.patches, self.seed, self.epoch = patches, seed, 0

    def __len__(self) -> int:
        return len(self.paths) * self.patches

    def __getitem__(self, item: int):
        rng = np.random.default_rng(np.random.SeedSequence([*self.seed, self.epoch, item]))
        index = item // self.patches
        image = load_rgb(self.paths[index], self.patch_hw[::-1])
        patch = _crop(image, *crop_box(*image.shape[:2], self.patch_hw, rng), self.patch_hw)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return _chw(patch), self.targets[index]


class EvalImages(Dataset):
    """All ``patches`` crops of one image per item: (N, 3, h, w) uint8 -- fixed crops, or
    with ``crops="random"`` random crops with random flips (the published protocol's test),
    drawn from (``seed``, index) so a given evaluation is repeatable."""

    def __init__(self, paths, patch_size, patches: int, crops: str = "fixed",
                 seed: tuple[int, ...] = (0,)):
        self.paths, self.patches, self.crops, self.seed = list(paths), patches, crops, seed
        self.patch_hw = (patch_size[1], patch_size[0])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_rgb(self.paths[index], self.patch_hw[::-1])
        if self.crops == "fixed":
            offsets = fixed_offsets(image.shape[:2], self.patch_hw, self.patches)
            return torch.stack([_chw(_crop(image, t, l, self.patch_hw)) for t, l in offsets])
        rng = np.random.default_rng(np.random.SeedSequence([*self.seed, index]))
        out = []
        for _ in range(self.patches):
            patch = _crop(image, *crop_box(*image.shape[:2], self.patch_hw, rng), self.patch_hw)
            out.append(_chw(patch[:, ::-1] if rng.random() < 0.5 else patch))
        return torch.stack(out)


def predict(model: VIPNet, paths, patch_size, patches: int, device, batch_size: int = 32,
            workers: int = 0, progress: bool = False, crops: str = "fixed",
            seed: tuple[int, ...] = (0,)) -> np.ndarray:
    """Quality per image: the mean of the model's output over its crops (``EvalImages``),
    in the precision ``biqa.training.device`` picks for the device."""
    device = torch.device(device)
    loader = DataLoader(EvalImages(paths, patch_size, patches, crops, seed),
                        batch_size=max(1, batch_size // patches), num_workers=workers)
    model.eval()
    out = []
    with torch.no_grad(), autocast(device, amp_dtype(device)):
        for crops in tqdm(loader, desc="score", disable=not progress, leave=False):
            b, n = crops.shape[:2]
            q = model(crops.flatten(0, 1).to(device, non_blocking=True)).float()
            out.append(q.view(b, n).mean(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# ---------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class LabelScale:
    """How the model's standardised quality maps back to a dataset's scores."""

    dataset: str
    mean: float
    std: float
    higher_better: bool

    @classmethod
    def fit(cls, data: IQADataset) -> "LabelScale":
        std = float(np.std(data.scores)) or 1.0
        return cls(data.name, float(np.mean(data.scores)), std, data.higher_better)

    def targets(self, scores: np.ndarray) -> np.ndarray:
        sign = 1.0 if self.higher_better else -1.0
        return sign * (np.asarray(scores, dtype=np.float64) - self.mean) / self.std

    def scores(self, quality: np.ndarray) -> np.ndarray:
        sign = 1.0 if self.higher_better else -1.0
        return self.mean + sign * self.std * np.asarray(quality, dtype=np.float64)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode() + b"\n")


def save_model(path: Path, model: VIPNet, config: dict) -> None:
    """A self-contained checkpoint (every weight + config), loadable with weights_only."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_torch_file(path, {"model": state, "config": config})


def load_model(path: str | Path, map_location="cpu") -> tuple[VIPNet, dict]:
    """A fine-tuned VIPNet and its config (architecture, patch size, label scale)."""
    ckpt = read_torch_file(path, "a biqa-finetune model", map_location)
    if not isinstance(ckpt, dict) or "label" not in ckpt.get("config", {}):
        raise ValueError(f"{path} is not a biqa-finetune model (expected 'model' and a "
                         "'config' with a 'label' scale)")
    model = vipnet_from_config(ckpt["config"])
    load_saved_weights(model, ckpt["model"], path)
    return model.eval(), ckpt["config"]


def _mutable_state(model: VIPNet) -> dict[str, torch.Tensor]:
    """A copy of everything fine-tuning can change (frozen branches left out)."""
    frozen = ("cpm.",) + (("dpm.",) if not any(p.requires_grad for p in model.dpm.parameters())
                          else ())
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith(frozen)}


# ------------------------------------------------------------------- protocol

PAPER_LABEL = ("paper: VIPNet's published fine-tuning protocol (35 epochs with early stopping, "
               "exponential LR decay 0.85, random test patches with flips, raw PLCC, the best "
               "test epoch reported): comparable with the paper's table, optimistic")


def protocol_labels(cfg: FinetuneConfig) -> dict:
    test_patches = (f"{cfg.patches} fixed crops per image, mean score" if cfg.test_crops == "fixed"
                    else f"{cfg.patches} random crops with random flips per image, mean score")
    return {
        "protocol": PAPER_LABEL if cfg.protocol == "paper" else
        "biqa: the epoch is picked on held-out training references, fixed test crops",
        "epochs": (f"{cfg.epochs}, early stopping 10 epochs after the best (past half)"
                   if cfg.early_stopping else str(cfg.epochs)),
        "schedule": ("exponential, x0.85 per epoch" if cfg.schedule == "exponential"
                     else "cosine over the epochs"),
        "split": (f"by reference content, {1 - cfg.test_fraction:.0%}/{cfg.test_fraction:.0%} "
                  f"train/test, sorted content ids, per-round seed (seed={cfg.seed}, round)"),
        "selection": OPTIMISTIC_LABEL if cfg.select_on_test else HONEST_LABEL,
        "validation_fraction": 0.0 if cfg.select_on_test else cfg.val_fraction,
        "dpm": (f"frozen, from {cfg.dpm}" if cfg.dpm else
                f"none: distortion branch ({cfg.dpm_arch}) trained from scratch"),
        "cpm": (f"{cfg.cpm_arch}, frozen, ImageNet weights from {cfg.cpm_weights}"
                if cfg.cpm_weights else f"{cfg.cpm_arch}, frozen, random weights (no ImageNet file)"),
        "plcc": "after 4-parameter logistic fit" if cfg.logistic else "raw predictions",
        "test_patches": test_patches,
    }


def inputs_fingerprint(cfg: FinetuneConfig, data: IQADataset,
                       cross: dict[str, IQADataset]) -> str:
    """What makes a finished round reusable: the configuration (but output, device and
    workers) and the *content* of every input -- the sha256 of the DPM and CPM weight files
    and the dataset's labels as read -- so a replaced checkpoint or changed labels under the
    same paths never reuse old rounds."""
    keep = {k: v for k, v in cfg.as_dict().items() if k not in ("out", "device", "workers")}
    keep["inputs"] = {
        "dpm": file_digest(cfg.dpm)[1] if cfg.dpm else None,
        "cpm_weights": file_digest(cfg.cpm_weights)[1] if cfg.cpm_weights else None,
        "dataset": data.fingerprint(),
        "cross": {name: d.fingerprint() for name, d in sorted(cross.items())}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _evaluate(quality: np.ndarray, data: IQADataset, scale: LabelScale | None,
              logistic: bool) -> dict:
    """Criteria on a dataset's own scale: within the training dataset through the label
    scale; on another dataset the quality oriented to its direction (the logistic fit
    takes care of the scale)."""
    if scale is not None:
        pred = scale.scores(quality)
    else:
        pred = quality if data.higher_better else -quality
    result = metrics.evaluate(pred, data.scores, logistic)
    if data.types is not None:
        result["per_type_srcc"] = metrics.per_type_srcc(pred, data.scores, data.types)
    return result


def _seed_torch(seed: int, round_index: int) -> int:
    """Torch's seed for one round (weights init, dropout), derived like the split's."""
    return int(np.random.SeedSequence([seed, round_index, 1]).generate_state(1)[0])


def train_epoch(model: VIPNet, optimiser, loader, device: torch.device, scaler,
                desc: str = "train") -> list[float]:
    """One pass over the training patches (L1 loss on standardised quality); the losses.
    Mixed precision as ``biqa.training.device`` decides: bf16 where the GPU has it, else
    fp16 through ``scaler`` (one per round, so its loss scale carries over epochs); full
    precision on the CPU."""
    model.train()
    dtype = amp_dtype(device)
    losses = []
    for crops, target in tqdm(loader, desc=desc, disable=not sys.stderr.isatty(), leave=False):
        with autocast(device, dtype):
            q = model(crops.to(device, non_blocking=True))
        loss = nn.functional.l1_loss(q.float(), target.to(device))
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        losses.append(loss.item())
    return losses


def train_round(cfg: FinetuneConfig, data: IQADataset, split: Split, round_index: int,
                device: torch.device, say=log.info) -> tuple[VIPNet, dict, dict]:
    """Fine-tune one round; returns the selected model, its config and the epoch log."""
    train, val, test = data.subset(split.train), data.subset(split.val), data.subset(split.test)
    select = test if cfg.select_on_test else val
    if len(select) < 3:
        raise ValueError(f"the {'test' if cfg.select_on_test else 'validation'} part of round "
                         f"{round_index} has {len(select)} images; at least 3 are needed to "
                         "rank epochs (raise --val-fraction or use more data)")
    scale = LabelScale.fit(train)
    model, config = build_vipnet(cfg.cpm_arch, cfg.cpm_weights, cfg.dpm, cfg.dpm_arch,
                                 tuple(cfg.patch_size))
    config["label"] = asdict(scale)
    config["patches"] = cfg.patches
    model.to(device)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    schedule = (torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=0.85)
                if cfg.schedule == "exponential"
                else torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.epochs))
    patches = TrainPatches(train.paths, scale.targets(train.scores), cfg.patch_size,
                           cfg.patches, seed=(cfg.seed, round_index, 3))
    order_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, round_index, 2]))
    best, history = (-math.inf, 0, None), []
    scaler = grad_scaler(device, amp_dtype(device))
    for epoch in range(1, cfg.epochs + 1):
        patches.epoch = epoch
        loader = DataLoader(patches, batch_size=cfg.batch_size, num_workers=cfg.workers,
                            sampler=order_rng.permutation(len(patches)).tolist(),
                            pin_memory=device.type == "cuda")
        losses = train_epoch(model, optimiser, loader, device, scaler,
                             f"round {round_index} epoch {epoch}")
        schedule.step()
        quality = predict(model, select.paths, cfg.patch_size, cfg.patches, device,
                          cfg.batch_size, cfg.workers, crops=cfg.test_crops,
                          seed=(cfg.seed, round_index, 4, epoch))
        score = metrics.srcc(quality, select.quality)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "select_srcc": score})
        say(f"round {round_index} epoch {epoch}/{cfg.epochs}: loss {np.mean(losses):.4f}, "
            f"{'test' if cfg.select_on_test else 'val'} SRCC {score:.4f}")
        if score > best[0]:
            best = (score, epoch, _mutable_state(model))
        elif cfg.early_stopping and epoch > best[1] + 10 and epoch > cfg.epochs // 2:
            say(f"round {round_index}: early stop at epoch {epoch} (best {best[1]})")
            break
    model.load_state_dict(best[2], strict=False)
    return model, config, {"best_epoch": best[1], "select_srcc": best[0], "history": history,
                           "n_train": len(train), "n_val": len(val), "n_test": len(test)}


def run_round(cfg: FinetuneConfig, data: IQADataset, cross: dict[str, IQADataset],
              round_index: int, device: torch.device, say=log.info,
              fingerprint: str = "") -> dict:
    """One round from split to saved model and test results, reused if already done with
    the same ``fingerprint`` (``inputs_fingerprint``: configuration and the content of
    every input), so an interrupted run resumes at the next round and changed inputs are
    never mixed with old rounds."""
    out = Path(cfg.out) / f"round_{round_index:02d}"
    done = out / "result.json"
    if done.is_file():
        try:
            previous = json.loads(done.read_text())
        except ValueError:  # torn or foreign: redo the round
            previous = {}
        if previous.get("fingerprint") == fingerprint:
            say(f"round {round_index}: already done with the same inputs, reusing {done}")
            return previous
        say(f"round {round_index}: {done} was made from other inputs or settings; redoing it")
    split = split_by_content(data.groups, round_index, cfg.seed, cfg.test_fraction,
                             0.0 if cfg.select_on_test else cfg.val_fraction)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_seed_torch(cfg.seed, round_index))
        model, config, info = train_round(cfg, data, split, round_index, device, say)
    save_model(out / "best.pt", model, config)
    test = data.subset(split.test)
    scale = LabelScale(**config["label"])

    def evaluate_on(d: IQADataset, s: LabelScale | None) -> dict:
        quality = predict(model, d.paths, cfg.patch_size, cfg.patches, device, cfg.batch_size,
                          cfg.workers, crops=cfg.test_crops, seed=(cfg.seed, round_index, 5))
        return _evaluate(quality, d, s, cfg.logistic)

    result = {"round": round_index, **evaluate_on(test, scale), **info,
              "cross": {name: evaluate_on(d, None) for name, d in cross.items()},
              "checkpoint": str(Path(f"round_{round_index:02d}") / "best.pt"),
              "test_groups": sorted(set(test.groups)), "fingerprint": fingerprint}
    write_json(done, result)
    return result


def _median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def summarise(cfg: FinetuneConfig, rounds: list[dict]) -> dict:
    """results.json: per-round criteria, medians, cross-dataset medians, protocol labels."""
    per_type = {}
    for r in rounds:
        for name, value in r.get("per_type_srcc", {}).items():
            per_type.setdefault(name, []).append(value)
    cross = {}
    for name in cfg.cross:
        values = [r["cross"][name] for r in rounds]
        cross[name] = {f"median_{k}": _median([v[k] for v in values])
                       for k in ("srcc", "plcc", "krcc", "rmse")}
    return {
        "dataset": cfg.dataset,
        "protocol": protocol_labels(cfg),
        "config": cfg.as_dict(),
        "median_srcc": _median([r["srcc"] for r in rounds]),
        "median_plcc": _median([r["plcc"] for r in rounds]),
        "median_krcc": _median([r["krcc"] for r in rounds]),
        "median_rmse": _median([r["rmse"] for r in rounds]),
        "median_per_type_srcc": {k: _median(v) for k, v in sorted(per_type.items())},
        "cross": cross,
        "rounds": [{k: v for k, v in r.items() if k != "fingerprint"} for r in rounds],
    }


def summary_table(results: dict) -> str:
    """The printed table: one row per round, then the medians."""
    cross = list(results["cross"])
    head = ["round", "epoch", "SRCC", "PLCC", "KRCC", "RMSE"] + [f"{c} SRCC" for c in cross]
    rows = [[str(r["round"]), str(r["best_epoch"])]
            + [f"{r[k]:.4f}" for k in ("srcc", "plcc", "krcc", "rmse")]
            + [f"{r['cross'][c]['srcc']:.4f}" for c in cross] for r in results["rounds"]]
    rows.append(["median", ""] + [f"{results['median_' + k]:.4f}"
                                  for k in ("srcc", "plcc", "krcc", "rmse")]
                + [f"{results['cross'][c]['median_srcc']:.4f}" for c in cross])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"protocol: {results['protocol']['protocol']}")
    lines.append(f"epoch selected on: {results['protocol']['selection']}")
    lines.append(f"PLCC: {results['protocol']['plcc']}; test: {results['protocol']['test_patches']}")
    lines.append(f"DPM: {results['protocol']['dpm']}")
    return "\n".join(lines)


def plot_per_type(per_type: dict[str, float], path: Path, title: str) -> None:
    """A horizontal bar chart of SRCC per distortion type (Pillow only)."""
    font = ImageFont.load_default()
    names = list(per_type)
    label_w = 12 + 7 * max(len(n) for n in names)
    row, bar_w, top = 20, 400, 36
    width, height = label_w + bar_w + 70, top + row * len(names) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    low = min(0.0, min(per_type.values()))
    zero = label_w + bar_w * (-low) / (1 - low)
    for i, name in enumerate(names):
        y = top + i * row
        value = per_type[name]
        end = label_w + bar_w * (value - low) / (1 - low)
        draw.rectangle([min(zero, end), y + 3, max(zero, end), y + row - 3], fill=(70, 110, 180))
        draw.text((8, y + 4), name, fill="black", font=font)
        draw.text((label_w + bar_w + 8, y + 4), f"{value:.3f}", fill="black", font=font)
    draw.line([zero, top, zero, top + row * len(names)], fill="black")
    draw.text((label_w - 4, height - 22), f"{low:g}", fill="black", font=font)
    draw.text((label_w + bar_w - 8, height - 22), "1", fill="black", font=font)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def run_finetune(cfg: FinetuneConfig, say=log.info) -> dict:
    """The whole protocol; writes ``out/results.json`` (and the per-type plot) and
    returns the results."""
    cfg.check()
    cfg = cfg.resolved()
    cfg.check()
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, cfg.root)
    cross = {name: load_dataset(name, root) for name, root in cfg.cross.items()}
    for dataset in (data, *cross.values()):
        check_patch_fits(dataset, cfg.patch_size)
    dtype = amp_dtype(device)
    say(f"{cfg.dataset}: {len(data)} images, {len(set(data.groups))} content groups; "
        f"device {device}{f' ({dtype_name(dtype)} autocast)' if dtype else ''}"
        f"{'; ' + PAPER_LABEL if cfg.protocol == 'paper' else ''}")
    fingerprint = inputs_fingerprint(cfg, data, cross)
    start = time.perf_counter()
    rounds = [run_round(cfg, data, cross, r, device, say, fingerprint)
              for r in range(cfg.rounds)]
    results = summarise(cfg, rounds)
    results["seconds"] = time.perf_counter() - start
    out = Path(cfg.out)
    if results["median_per_type_srcc"]:
        plot_per_type(results["median_per_type_srcc"], out / "per_type_srcc.png",
                      f"{cfg.dataset}: median SRCC per distortion type "
                      f"over {cfg.rounds} round(s)")
    write_json(out / "results.json", results)
    return results
