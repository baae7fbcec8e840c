"""Does the chain learn?  shards -> DPM -> quality model, measured end to end on contents
the DPM never saw.

1. Contents: every reference (the bundled ones, or ``--refs``) is cut into tiles of the
   content size at its own resolution; in reference r, tile t goes to the fine-tuning
   dataset when (t + r) % ``finetune_every`` == 0, else to the DPM.  The two sets share no
   pixels.  Flat tiles (sky) are dropped: no model can tell the level of a blur there.
2. Shards: ``biqa-gen`` writes the DPM's contents with ``--types`` (all five levels), and
   the fine-tuning contents apart, with another seed, to measure the DPM on them.
3. DPM: ``biqa-train-dpm``'s ``train`` at the fine-tuning patch size, one cosine cycle
   that ends at the last step, with PINet's ranking pairs (see docs/finetune.md, "Does the
   chain learn?").
4. Figures on the fine-tuning contents: the DPM's top-1 over (type, level); a linear probe
   (ridge on the frozen DPM's globally pooled last-stage features, fitted on each round's
   training contents, SRCC on its test contents; also from an untrained DPM of the same
   architecture, the floor); and ``biqa-finetune`` on a KADID-10k-layout dataset whose MOS
   is 7 - level + N(0, 0.2), with the DPM and without it (the ablation).

    python benchmarks/bench_chain.py                    # CPU, tiny models: ~15 minutes
    python benchmarks/bench_chain.py --gpu              # CUDA, ResNet-18 branches, longer
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from biqa.data import sample_reference_paths
from biqa.distortions import distort, get as get_distortion
from biqa.generator import generate
from biqa.generator.refs import ReferenceSkipped, load_reference, resize_cover
from biqa.training import metrics
from biqa.shards.reader import open_shards
from biqa.training.data import dpm_input
from biqa.training.finetune import EvalImages, FinetuneConfig, run_finetune
from biqa.training.iqa_datasets import IQADataset, load_dataset, split_by_content
from biqa.training.models import create_model
from biqa.training.pretrain import TrainConfig, load_dpm, train
from biqa.training.vipnet import dpm_statistics

MOS_NOISE = 0.2
MIN_TEXTURE = 3.0


@dataclass
class ChainConfig:
    """One run of the chain (sizes for the CPU by default)."""

    out: str
    refs: tuple[str, ...] = ()
    types: str = "1,10,11,21"  # Gaussian blur, JPEG, white noise, pixelate
    size: tuple[int, int] = (128, 96)  # content (width, height)
    finetune_every: int = 4  # one tile in this many goes to the fine-tuning dataset
    patch: tuple[int, int] = (96, 64)  # fine-tuning patch = DPM input (width, height)
    dpm_arch: str = "tiny"
    cpm_arch: str = "tiny"
    cpm_weights: str | None = None
    dpm_steps: int = 12000
    dpm_batch: int = 32
    ranking_weight: float = 1.0  # PINet-style ranking pairs beside the classification
    rounds: int = 3
    epochs: int = 10
    patches: int = 6
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    workers: int = 0


# ------------------------------------------------------------------ contents

def texture(tile: np.ndarray) -> float:
    """Mean absolute Laplacian of the grey tile (0-255): near zero on sky or a blank wall."""
    grey = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean())


def split_contents(ref_paths, size: tuple[int, int], finetune_every: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fine-tuning contents, DPM contents): the references cut into ``size`` tiles at their
    own resolution; in reference r, tile t (row-major) goes to fine-tuning when
    (t + r) % ``finetune_every`` == 0, else to the DPM.  The two sets share no pixels.
    Tiles flatter than ``MIN_TEXTURE`` are dropped: on them blur, JPEG and pixelation
    leave no trace, so a MOS that depends on the level alone could not be ranked."""
    w, h = size
    finetune, dpm = [], []
    for r, path in enumerate(ref_paths):
        try:
            image = load_reference(str(path))
        except ReferenceSkipped as exc:
            raise ValueError(f"{path}: {exc}") from None
        rows, cols = image.shape[0] // h, image.shape[1] // w
        if not rows or not cols:
            image = resize_cover(image, (w, h))
            rows = cols = 1
        for t in range(rows * cols):
            y, x = divmod(t, cols)
            tile = np.ascontiguousarray(image[y * h:(y + 1) * h, x * w:(x + 1) * w])
            if texture(tile) >= MIN_TEXTURE:
                (finetune if (t + r) % finetune_every == 0 else dpm).append(tile)
    return finetune, dpm


def toy_mos(level: int, rng: np.random.Generator) -> float:
    """The toy's opinion score: a function of the level alone, plus rater noise."""
    return float(7 - level + rng.normal(0, MOS_NOISE))


def write_kadid_toy(root: Path, contents: list[np.ndarray], type_ids: list[int],
                    seed: int) -> Path:
    """The contents at every type and level, in the KADID-10k layout (``dmos.csv``,
    ``images/Iii_TT_LL.png``; its 'dmos' column is a MOS, higher is better)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for r, content in enumerate(contents, 1):
        ref = f"I{r:02d}.png"
        Image.fromarray(content).save(root / "images" / ref)
        for t in type_ids:
            for level in range(1, 6):
                name = f"I{r:02d}_{t:02d}_{level:02d}.png"
                image = distort(content, get_distortion(t).name, level,
                                rng=int(rng.integers(2**31)))
                Image.fromarray(image).save(root / "images" / name)
                rows.append({"dist_img": name, "ref_img": ref,
                             "dmos": f"{toy_mos(level, rng):.4f}", "var": "0"})
    with (root / "dmos.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dist_img", "ref_img", "dmos", "var"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def make_shards(contents: list[np.ndarray], folder: Path, types: str, seed: int) -> Path:
    """``biqa-gen`` over the contents (saved as PNG references first)."""
    refs = folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, content in enumerate(contents):
        paths.append(str(refs / f"c{i:03d}.png"))
        Image.fromarray(content).save(paths[-1])
    manifest = generate(refs=paths, distortions=types, out=str(folder / "shards"), seed=seed,
                        per_shard=50, workers=1, progress=False)
    if manifest["status"] != "complete":
        raise RuntimeError(f"biqa-gen failed: {manifest['totals']}")
    return folder / "shards"


# ------------------------------------------------------------------ the DPM

def pretrain(cfg: ChainConfig, shards: Path, heldout: Path) -> tuple[Path, dict]:
    """Train the DPM for about ``dpm_steps`` steps as one cosine cycle that ends at the
    last step (epochs = restart period), validating once, at the end, on ``heldout``.
    A run in the same ``--out`` resumes (or reuses) the DPM already there."""
    steps_per_epoch = sum(open_shards(str(shards)).counts) // cfg.dpm_batch
    epochs = max(1, round(cfg.dpm_steps / steps_per_epoch))
    out = Path(cfg.out) / "dpm"
    summary = train(TrainConfig(
        shards=str(shards), val_shards=str(heldout), out=str(out), arch=cfg.dpm_arch,
        input_size=tuple(cfg.patch), batch_size=cfg.dpm_batch, epochs=epochs,
        restart_epochs=epochs, val_every=epochs, workers=cfg.workers,
        device="cuda" if cfg.device.startswith("cuda") else "cpu", seed=cfg.seed,
        ranking_weight=cfg.ranking_weight, log_every=10**9, save_every=1000,
        resume=(out / "last.pt").is_file()))
    if "val" not in summary["last"]:  # finished before: its final validation is on record
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary["last"] = [r for r in records if r["kind"] == "epoch"][-1]
    return out / "last.pt", summary


def dpm_readouts(model: torch.nn.Module, config: dict | None, data: IQADataset,
                 patch: tuple[int, int], patches: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Per image, over the fine-tuning's fixed crops: the globally pooled last-stage
    features (mean over crops) and the expected level under the classifier's posterior."""
    mean, std = dpm_statistics(config)
    levels = None
    if config is not None:
        levels = torch.zeros(config["num_classes"])
        for entry in config["class_table"]:
            base = entry["class_base"]
            levels[base:base + config["levels"]] = torch.arange(1, config["levels"] + 1)
    model = model.to(device).eval()
    features, expected = [], []
    with torch.no_grad():
        for crops in EvalImages(data.paths, patch, patches):
            last = model.forward_features(dpm_input(crops.to(device), mean, std))[-1]
            features.append(last.mean((2, 3)).mean(0).cpu().numpy())
            if levels is not None:
                posterior = model.forward_head(last).softmax(1).mean(0).cpu()
                expected.append(float(posterior @ levels))
    return np.stack(features), np.asarray(expected)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge regression on standardised features; returns the predictor."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda x_new: ((x_new - mu) / sd) @ w + y.mean()


def linear_probe(features: np.ndarray, data: IQADataset, rounds: int, seed: int,
                 alphas=(0.01, 0.1, 1.0)) -> float:
    """Median over the fine-tuning rounds of the test SRCC of a ridge fit on the round's
    training (+ validation) contents; the ridge strength is chosen by leaving one
    training content out at a time."""
    groups, quality = np.asarray(data.groups), data.quality
    scores = []
    for r in range(rounds):
        split = split_by_content(data.groups, r, seed)
        train_idx = np.concatenate([split.train, split.val])

        def inner_srcc(alpha):
            pred = np.zeros(len(train_idx))
            for g in set(groups[train_idx]):
                held = groups[train_idx] == g
                fit = ridge_fit(features[train_idx[~held]], quality[train_idx[~held]], alpha)
                pred[held] = fit(features[train_idx[held]])
            return metrics.srcc(pred, quality[train_idx])

        alpha = max(alphas, key=inner_srcc)
        fit = ridge_fit(features[train_idx], quality[train_idx], alpha)
        scores.append(metrics.srcc(fit(features[split.test]), quality[split.test]))
    return float(np.median(scores))


# ------------------------------------------------------------------ the chain

def finetune(cfg: ChainConfig, root: Path, dpm: Path | None, name: str) -> dict:
    return run_finetune(FinetuneConfig(
        dataset="kadid10k", root=str(root), out=str(Path(cfg.out) / name),
        dpm=None if dpm is None else str(dpm), dpm_arch=cfg.dpm_arch, cpm_arch=cfg.cpm_arch,
        cpm_weights=cfg.cpm_weights, rounds=cfg.rounds, epochs=cfg.epochs, patches=cfg.patches,
        patch_size=tuple(cfg.patch), batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
        device=cfg.device, workers=cfg.workers), say=lambda line: None)


def run_chain(cfg: ChainConfig, say=print) -> dict:
    """Every stage in turn; returns the figures (also written to OUT/chain.json)."""
    out = Path(cfg.out)
    refs = list(cfg.refs) or [str(p) for p in sample_reference_paths()]
    type_ids = [get_distortion(t).id for t in cfg.types.split(",")]
    if not all(1 <= t <= 25 for t in type_ids):
        raise ValueError(f"--types {cfg.types}: the KADID-10k layout holds types 1..25 only")
    device = torch.device(cfg.device)
    figures: dict = {"config": asdict(cfg)}
    clock = time.perf_counter()

    def stage(text: str) -> None:
        say(f"[{time.perf_counter() - clock:6.0f} s] {text}")

    ft_contents, dpm_contents = split_contents(refs, cfg.size, cfg.finetune_every)
    root = write_kadid_toy(out / "toy_kadid10k", ft_contents, type_ids, cfg.seed)
    data = load_dataset("kadid10k", root)
    shards = make_shards(dpm_contents, out / "dpm_contents", cfg.types, cfg.seed)
    heldout = make_shards(ft_contents, out / "heldout_contents", cfg.types, cfg.seed + 1)
    figures["contents"] = {"dpm": len(dpm_contents), "finetune": len(ft_contents),
                           "images": len(data)}
    stage(f"contents: {len(dpm_contents)} for the DPM, {len(ft_contents)} for fine-tuning "
          f"({len(data)} images, {len(type_ids)} types x 5 levels, "
          f"{cfg.size[0]}x{cfg.size[1]})")

    torch.manual_seed(cfg.seed)
    untrained = create_model(cfg.dpm_arch, len(type_ids) * 5, input_size=tuple(cfg.patch))
    floor, _ = dpm_readouts(untrained, None, data, cfg.patch, cfg.patches, device)
    figures["probe_untrained"] = linear_probe(floor, data, cfg.rounds, cfg.seed)
    stage(f"linear probe, untrained {cfg.dpm_arch} DPM: SRCC {figures['probe_untrained']:.3f}")

    checkpoint, summary = pretrain(cfg, shards, heldout)
    val = summary["last"]["val"]
    figures["dpm"] = {"steps": summary["steps"], "top1": val["top1"],
                      "per_type_top1": val["per_type"]}
    per_type = ", ".join(f"{k} {v:.2f}" for k, v in val["per_type"].items())
    stage(f"DPM ({cfg.dpm_arch}, {summary['steps']} steps of {cfg.dpm_batch} at "
          f"{cfg.patch[0]}x{cfg.patch[1]}): top-1 on the held-out contents {val['top1']:.3f} "
          f"(chance {1 / (5 * len(type_ids)):.3f}; {per_type})")

    model, config = load_dpm(checkpoint)
    features, expected = dpm_readouts(model, config, data, cfg.patch, cfg.patches, device)
    figures["probe"] = linear_probe(features, data, cfg.rounds, cfg.seed)
    figures["expected_level_srcc"] = metrics.srcc(-expected, data.quality)
    stage(f"linear probe, pre-trained DPM: SRCC {figures['probe']:.3f} (the classifier's "
          f"expected level, no fitting: {figures['expected_level_srcc']:.3f})")

    for name, dpm in (("with_dpm", checkpoint), ("without_dpm", None)):
        results = finetune(cfg, root, dpm, name)
        figures[name] = {"median_srcc": results["median_srcc"],
                         "median_plcc": results["median_plcc"],
                         "rounds_srcc": [r["srcc"] for r in results["rounds"]],
                         "median_per_type_srcc": results["median_per_type_srcc"]}
        stage(f"fine-tuned {'with the DPM' if dpm else 'without a DPM (branch from scratch)'}: "
              f"median SRCC {results['median_srcc']:.3f}, PLCC {results['median_plcc']:.3f} "
              f"over {cfg.rounds} rounds")
    figures["seconds"] = time.perf_counter() - clock
    (out / "chain.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def summary_lines(f: dict) -> list[str]:
    return [
        f"DPM top-1 on held-out contents      {f['dpm']['top1']:.3f}",
        f"linear probe SRCC (pre-trained DPM) {f['probe']:.3f}   "
        f"(untrained DPM {f['probe_untrained']:.3f})",
        f"fine-tuned SRCC / PLCC, with DPM    {f['with_dpm']['median_srcc']:.3f} / "
        f"{f['with_dpm']['median_plcc']:.3f}",
        f"fine-tuned SRCC / PLCC, without DPM {f['without_dpm']['median_srcc']:.3f} / "
        f"{f['without_dpm']['median_plcc']:.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", nargs="*", default=(), help="reference images "
                        "(default: the bundled ones)")
    parser.add_argument("--out", help="keep everything here (default: a temporary folder)")
    parser.add_argument("--gpu", action="store_true", help="CUDA, ResNet-18 branches, "
                        "256x192 contents, more steps and rounds (the bundled references "
                        "give only 28 such tiles: pass many more with --refs)")
    parser.add_argument("--types", default=ChainConfig.types)
    parser.add_argument("--dpm-steps", type=int)
    parser.add_argument("--ranking-weight", type=float, help="DPM ranking pairs' weight "
                        f"(default {ChainConfig.ranking_weight}; 0: classification only)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patches", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpm-weights", help="torchvision-format ImageNet weights (--gpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {}
    if args.gpu:
        sizes = dict(size=(256, 192), patch=(192, 128), dpm_arch="resnet18",
                     cpm_arch="resnet18", dpm_steps=20000, dpm_batch=128, rounds=10,
                     device="cuda", workers=4)
    overrides = {k: v for k, v in (("dpm_steps", args.dpm_steps), ("rounds", args.rounds),
                                   ("ranking_weight", args.ranking_weight),
                                   ("epochs", args.epochs),
                                   ("patches", args.patches)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ChainConfig(out=args.out or tmp, refs=tuple(args.refs), types=args.types,
                          seed=args.seed, cpm_weights=args.cpm_weights,
                          **{**sizes, **overrides})
        try:
            figures = run_chain(cfg)
        except ValueError as exc:  # bad --types or --refs: one line, no traceback
            parser.error(str(exc))
    print("\n".join(summary_lines(figures)))
    print(f"({figures['seconds']:.0f} s, {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
