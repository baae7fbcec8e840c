"""``biqa-score``: a fine-tuned VIPNet's quality score for image files, batched, CPU or GPU.

Importing it does not import torch (``score_images`` does), so the command lists and
checks its inputs before paying for it."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from biqa.generator.refs import IMAGE_EXTENSIONS


def image_files(items) -> list[Path]:
    """Files as given, and the images inside folders (recursively, sorted)."""
    out = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            out.append(item)
        else:
            raise ValueError(f"{item}: no such file or folder")
    if not out:
        raise ValueError("no images found in " + ", ".join(map(str, items)))
    return out


def score_images(model_path, paths, batch_size: int = 32, patches: int | None = None,
                 device: str = "auto", workers: int = 0,
                 chunk: int = 256, warn=None) -> Iterator[tuple[Path, float]]:
    """(path, score) per image, on the training dataset's scale, ``chunk`` images at a
    time so that a long list starts printing at once.  Images smaller than the model's
    patch are enlarged to fit it, which changes the scale of their distortions; ``warn``
    (if given) is told of each."""
    from .device import resolve_device
    from .finetune import LabelScale, load_model, predict
    from .iqa_datasets import image_sizes

    dev = resolve_device(device)
    model, config = load_model(model_path, map_location="cpu")
    model.to(dev)
    scale = LabelScale(**config["label"])
    n = patches or config["patches"]
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        if warn is not None:
            w, h = config["patch_size"]
            for path, (iw, ih) in zip(part, image_sizes(part)):
                if iw < w or ih < h:
                    warn(f"warning: {path} ({iw}x{ih}) is smaller than the model's patch "
                         f"{w}x{h} and is enlarged to fit, which changes the scale of its "
                         "distortions: its score is less reliable")
        quality = predict(model, part, tuple(config["patch_size"]), n, dev, batch_size, workers)
        yield from zip(part, np.asarray(scale.scores(quality)).tolist())
