"""The standard IQA datasets as they are distributed, and reference-disjoint splits.

Every loader reads one official on-disk layout (documented in docs/datasets.md)
and returns an :class:`IQADataset`: image paths, subjective scores, whether a
higher score means better quality, the content group of each image (its
reference for synthetic datasets, the image itself for authentic ones) and its
distortion type where the dataset has types.  A missing or malformed dataset
raises :class:`DatasetError` saying what was expected where, before any
training starts.

Splits depend only on the sorted group ids and the seeds, never on directory
listing order or hash seeds, so they are identical across runs and machines.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from biqa.distortions import get as get_distortion

DATASET_NAMES = ("tid2013", "kadid10k", "live", "csiq", "livec", "koniq10k", "csv")

TID2013_TYPES = (
    "additive_gaussian_noise", "color_noise", "spatially_correlated_noise", "masked_noise",
    "high_frequency_noise", "impulse_noise", "quantization_noise", "gaussian_blur",
    "denoising", "jpeg", "jpeg2000", "jpeg_transmission_errors",
    "jpeg2000_transmission_errors", "non_eccentricity_pattern_noise",
    "local_block_wise_distortions", "mean_shift", "contrast_change",
    "color_saturation_change", "multiplicative_gaussian_noise", "comfort_noise",
    "lossy_compression_of_noisy_images", "color_quantization_with_dither",
    "chromatic_aberrations", "sparse_sampling_and_reconstruction")

# KADID-10k's types are biqa's distortion types 1..25, under the registry's names.
KADID10K_TYPES = tuple(get_distortion(i).name for i in range(1, 26))

LIVE_TYPE_FOLDERS = ("jp2k", "jpeg", "wn", "gblur", "fastfading")  # the order of dmos_realigned.mat


class DatasetError(ValueError):
    """A dataset is missing or does not have the layout its loader reads."""


@dataclass(frozen=True)
class IQADataset:
    """One dataset's images with their scores, content groups and types."""

    name: str
    root: Path
    paths: tuple[Path, ...]
    scores: np.ndarray          # float64, the dataset's own scale
    groups: tuple[str, ...]     # content id: reference image, or the image itself
    types: tuple[str, ...] | None
    higher_better: bool

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def quality(self) -> np.ndarray:
        """Scores oriented so that higher always means better (DMOS negated)."""
        return self.scores if self.higher_better else -self.scores

    def fingerprint(self) -> str:
        """sha256 of what the dataset says, as read: every image's path (relative to the
        root), score, content group and type -- changed labels change it."""
        h = hashlib.sha256(f"{self.name}\t{self.higher_better}\n".encode())
        types = self.types or ("",) * len(self.paths)
        for path, score, group, kind in zip(self.paths, self.scores, self.groups, types):
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{float(score)!r}\t{group}\t{kind}\n".encode())
        return h.hexdigest()

    def subset(self, indices) -> "IQADataset":
        idx = np.asarray(indices, dtype=np.int64)
        return IQADataset(self.name, self.root, tuple(self.paths[i] for i in idx),
                          self.scores[idx], tuple(self.groups[i] for i in idx),
                          None if self.types is None else tuple(self.types[i] for i in idx),
                          self.higher_better)


# ------------------------------------------------------------------ file helpers

def _require_file(root: Path, rel: str, what: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{what}: expected the file {path}")
    return path


def _require_dir(root: Path, rel: str, what: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise DatasetError(f"{what}: expected the folder {path}")
    return path


def _check_images_exist(name: str, paths: list[Path]) -> None:
    """Fail before training if any listed image is absent (names the first few)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DatasetError(f"{name}: {len(missing)} of {len(paths)} listed images are missing, "
                           f"e.g. {shown}")


def _float(value: str, where: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise DatasetError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where}: score {value!r} is not finite")
    return x


def _load_mat(path: Path, key: str, what: str) -> np.ndarray:
    from scipy.io import loadmat
    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise DatasetError(f"{what}: cannot read {path} as a MATLAB file ({exc})") from None
    if key not in content:
        raise DatasetError(f"{what}: {path} has no variable {key!r}")
    return content[key]


def _mat_strings(cell: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (as scipy loads it) as a list of str."""
    out = []
    for item in np.asarray(cell, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item).strip())
    return out


def _case_insensitive_index(folder: Path) -> dict[str, Path]:
    """File name (lower case) -> path: TID2013 mixes 'i25_..' and 'I25.BMP'."""
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file()}


def _make(name, root, paths, scores, groups, types, higher_better) -> IQADataset:
    if not paths:
        raise DatasetError(f"{name}: no images listed under {root}")
    _check_images_exist(name, paths)
    return IQADataset(name, root, tuple(paths), np.asarray(scores, dtype=np.float64),
                      tuple(groups), None if types is None else tuple(types), higher_better)


# ----------------------------------------------------------------------- loaders

def load_tid2013(root: Path) -> IQADataset:
    """``mos_with_names.txt`` lines '<MOS> iRR_TT_L.bmp', images in ``distorted_images/``."""
    labels = _require_file(root, "mos_with_names.txt", "TID2013")
    folder = _require_dir(root, "distorted_images", "TID2013")
    index = _case_insensitive_index(folder)
    pattern = re.compile(r"^i(\d\d)_(\d\d)_(\d)\.bmp$", re.IGNORECASE)
    paths, scores, groups, types = [], [], [], []
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{labels}:{n}"
        if len(fields) != 2 or not pattern.match(fields[1]):
            raise DatasetError(f"{where}: expected '<MOS> iRR_TT_L.bmp', got {line.strip()!r}")
        ref, kind, _ = pattern.match(fields[1]).groups()
        if not 1 <= int(kind) <= len(TID2013_TYPES):
            raise DatasetError(f"{where}: distortion type {kind} is not 01..24")
        scores.append(_float(fields[0], where))
        paths.append(index.get(fields[1].lower(), folder / fields[1]))
        groups.append(f"i{ref}")
        types.append(TID2013_TYPES[int(kind) - 1])
    return _make("tid2013", root, paths, scores, groups, types, higher_better=True)


def load_kadid10k(root: Path) -> IQADataset:
    """``dmos.csv`` (dist_img, ref_img, dmos, var), images in ``images/``.

    KADID-10k's 'dmos' column is a mean opinion score on 1..5: higher is better.
    """
    labels = _require_file(root, "dmos.csv", "KADID-10k")
    folder = _require_dir(root, "images", "KADID-10k")
    pattern = re.compile(r"^(I\d+)_(\d\d)_(\d\d)\.png$", re.IGNORECASE)
    paths, scores, groups, types = [], [], [], []
    with labels.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"dist_img", "ref_img", "dmos"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{labels}: expected columns dist_img, ref_img, dmos; "
                               f"missing {sorted(missing)}")
        for n, row in enumerate(reader, 2):
            match = pattern.match(row["dist_img"] or "")
            if not match or not 1 <= int(match.group(2)) <= len(KADID10K_TYPES):
                raise DatasetError(f"{labels}:{n}: expected a name like I01_01_01.png, "
                                   f"got {row['dist_img']!r}")
            scores.append(_float(row["dmos"], f"{labels}:{n}"))
            paths.append(folder / row["dist_img"])
            groups.append(row["ref_img"])
            types.append(KADID10K_TYPES[int(match.group(2)) - 1])
    return _make("kadid10k", root, paths, scores, groups, types, higher_better=True)


def _live_folder_entries(root: Path, folder: str) -> dict[int, str]:
    """imgN number -> reference name, from one type folder's ``info.txt``
    (lines '<reference>.bmp imgN.bmp <parameter>')."""
    info = _require_file(root, f"{folder}/info.txt", "LIVE")
    entries = {}
    for n, line in enumerate(info.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        match = re.match(r"^img(\d+)\.bmp$", fields[1], re.IGNORECASE) if len(fields) >= 2 else None
        if not match:
            raise DatasetError(f"{info}:{n}: expected '<ref>.bmp imgN.bmp <param>', "
                               f"got {line.strip()!r}")
        entries[int(match.group(1))] = fields[0]
    if sorted(entries) != list(range(1, len(entries) + 1)):
        raise DatasetError(f"{info}: image numbers are not 1..{len(entries)}")
    return entries


def load_live(root: Path) -> IQADataset:
    """LIVE release 2: ``dmos_realigned.mat`` (dmos_new, orgs), ``refnames_all.mat``
    and the type folders jp2k, jpeg, wn, gblur, fastfading with their ``info.txt``.

    The .mat vectors list the type folders in that order, imgN.bmp by N; the
    undistorted copies (orgs = 1) are left out; lower DMOS is better.
    """
    dmos_path = _require_file(root, "dmos_realigned.mat", "LIVE")
    names_path = _require_file(root, "refnames_all.mat", "LIVE")
    dmos = _load_mat(dmos_path, "dmos_new", "LIVE").astype(np.float64).ravel()
    orgs = _load_mat(dmos_path, "orgs", "LIVE").astype(bool).ravel()
    refs = _mat_strings(_load_mat(names_path, "refnames_all", "LIVE"))
    entries = [(folder, number, ref) for folder in LIVE_TYPE_FOLDERS
               for number, ref in sorted(_live_folder_entries(root, folder).items())]
    if not len(dmos) == len(orgs) == len(refs) == len(entries):
        raise DatasetError(f"LIVE: dmos_new ({len(dmos)}), orgs ({len(orgs)}), refnames_all "
                           f"({len(refs)}) and the info.txt files ({len(entries)}) must list "
                           "the same number of images")
    paths, scores, groups, types = [], [], [], []
    for i, (folder, number, ref) in enumerate(entries):
        if ref.lower() != refs[i].lower():
            raise DatasetError(f"LIVE: {folder}/img{number}.bmp is of {ref} in info.txt but of "
                               f"{refs[i]} in refnames_all.mat")
        if orgs[i]:
            continue
        paths.append(root / folder / f"img{number}.bmp")
        scores.append(dmos[i])
        groups.append(refs[i])
        types.append(folder)
    return _make("live", root, paths, scores, groups, types, higher_better=False)


def load_csiq(root: Path) -> IQADataset:
    """``csiq_label.txt`` lines '<ref>.<TYPE>.<level>.png <DMOS>', images in
    ``all_imgs/`` or in the official ``dst_imgs/<type>/`` folders; lower is better."""
    labels = _require_file(root, "csiq_label.txt", "CSIQ")
    flat = root / "all_imgs"
    if not flat.is_dir() and not (root / "dst_imgs").is_dir():
        raise DatasetError(f"CSIQ: expected the images in {flat} or {root / 'dst_imgs'}")
    pattern = re.compile(r"^([^.]+)\.([^.]+)\.(\d+)\.png$", re.IGNORECASE)
    paths, scores, groups, types = [], [], [], []
    for n, line in enumerate(labels.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{labels}:{n}"
        match = pattern.match(fields[0]) if len(fields) == 2 else None
        if not match:
            raise DatasetError(f"{where}: expected '<ref>.<TYPE>.<level>.png <DMOS>', "
                               f"got {line.strip()!r}")
        ref, kind, _ = match.groups()
        nested = root / "dst_imgs" / kind.lower() / fields[0]
        paths.append(flat / fields[0] if flat.is_dir() else nested)
        scores.append(_float(fields[1], where))
        groups.append(ref)
        types.append(kind.lower())
    return _make("csiq", root, paths, scores, groups, types, higher_better=False)


def load_livec(root: Path) -> IQADataset:
    """LIVE In the Wild Challenge: ``Data/AllImages_release.mat``,
    ``Data/AllMOS_release.mat`` and ``Images/``.

    The 7 practice images the release lists first live in ``Images/trainingImages/``
    and are left out, as in every published protocol (1162 images remain).
    """
    names = _mat_strings(_load_mat(_require_file(root, "Data/AllImages_release.mat", "LIVEC"),
                                   "AllImages_release", "LIVEC"))
    mos = _load_mat(_require_file(root, "Data/AllMOS_release.mat", "LIVEC"),
                    "AllMOS_release", "LIVEC").astype(np.float64).ravel()
    images = _require_dir(root, "Images", "LIVEC")
    if len(names) != len(mos):
        raise DatasetError(f"LIVEC: AllImages_release lists {len(names)} images but "
                           f"AllMOS_release {len(mos)} scores")
    practice = images / "trainingImages"
    keep = [i for i, name in enumerate(names)
            if (images / name).is_file() or not (practice / name).is_file()]
    paths = [images / names[i] for i in keep]
    return _make("livec", root, paths, mos[keep], [names[i] for i in keep], None,
                 higher_better=True)


def load_koniq10k(root: Path) -> IQADataset:
    """``koniq10k_scores_and_distributions.csv`` (image_name, MOS_zscore) and ``512x384/``."""
    labels = _require_file(root, "koniq10k_scores_and_distributions.csv", "KonIQ-10k")
    folder = _require_dir(root, "512x384", "KonIQ-10k")
    paths, scores = [], []
    with labels.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image_name", "MOS_zscore"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{labels}: expected columns image_name, MOS_zscore; "
                               f"missing {sorted(missing)}")
        for n, row in enumerate(reader, 2):
            paths.append(folder / row["image_name"])
            scores.append(_float(row["MOS_zscore"], f"{labels}:{n}"))
    return _make("koniq10k", root, paths, scores, [p.name for p in paths], None,
                 higher_better=True)


def load_csv(root: Path) -> IQADataset:
    """``labels.csv`` with columns image and mos (higher is better) or dmos (lower is
    better), optionally ref (content group) and type; image paths relative to root."""
    labels = _require_file(root, "labels.csv", "csv dataset")
    with labels.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if "image" not in fields or len({"mos", "dmos"} & fields) != 1:
            raise DatasetError(f"{labels}: expected a header with 'image' and exactly one of "
                               f"'mos' or 'dmos' (optional 'ref', 'type'), got "
                               f"{sorted(fields)}")
        score_key = "mos" if "mos" in fields else "dmos"
        rows = list(enumerate(reader, 2))
    paths = [root / row["image"] for _, row in rows]
    scores = [_float(row[score_key], f"{labels}:{n}") for n, row in rows]
    groups = [row["ref"] if "ref" in fields else row["image"] for _, row in rows]
    types = [row["type"] for _, row in rows] if "type" in fields else None
    return _make("csv", root, paths, scores, groups, types, higher_better=score_key == "mos")


LOADERS = {"tid2013": load_tid2013, "kadid10k": load_kadid10k, "live": load_live,
           "csiq": load_csiq, "livec": load_livec, "koniq10k": load_koniq10k, "csv": load_csv}


def dataset_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$BIQA_DATA/<name>``."""
    if root is not None:
        return Path(root)
    base = os.environ.get("BIQA_DATA")
    if not base:
        raise DatasetError(f"{name}: no root given; pass --root or set $BIQA_DATA "
                           f"(the dataset is then read from $BIQA_DATA/{name})")
    return Path(base) / name


def load_dataset(name: str, root: str | os.PathLike | None = None) -> IQADataset:
    """Load dataset ``name`` (one of DATASET_NAMES) from ``root`` or $BIQA_DATA/<name>."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    path = dataset_root(name, root)
    if not path.is_dir():
        raise DatasetError(f"{name}: the dataset root {path} is not a folder")
    return LOADERS[name](path)


def image_sizes(paths) -> list[tuple[int, int]]:
    """(width, height) of every image, read from the file headers only."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from None
    return sizes


def check_patch_fits(data: IQADataset, patch_size: tuple[int, int]) -> None:
    """Refuse a patch larger than some of the images: fitting it would mean enlarging them,
    which stretches exactly what the distortion branch measures (blur width, noise grain,
    block size) -- a DPM's expected level on 128x96 images falls from SRCC 0.84 to 0.18
    when they are enlarged 3x (docs/finetune.md, "Small images")."""
    w, h = patch_size
    sizes = image_sizes(data.paths)
    small = [(path, size) for path, size in zip(data.paths, sizes)
             if size[0] < w or size[1] < h]
    if small:
        path, (sw, sh) = small[0]
        fits = (min(size[0] for size in sizes), min(size[1] for size in sizes))
        raise DatasetError(
            f"{data.name}: {len(small)} of {len(data)} images are smaller than the patch "
            f"{w}x{h} (e.g. {Path(path).name}, {sw}x{sh}); enlarging them would change the "
            f"distortions the model learns from -- pass --patch-size {fits[0]}x{fits[1]} "
            f"or smaller")


# ------------------------------------------------------------------------ splits

@dataclass(frozen=True)
class Split:
    """Image indices of one round; the three parts share no content group."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def round_seed(seed: int, round_index: int) -> np.random.Generator:
    """The generator of one round, from (seed, round) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, round_index]))


def split_by_content(groups, round_index: int, seed: int = 0, test_fraction: float = 0.2,
                     val_fraction: float = 0.1) -> Split:
    """Split images by content group: ``test_fraction`` of the groups for test, then
    ``val_fraction`` of all groups, taken from the training groups, for validation
    (epoch selection); the rest train.  Groups are sorted before the seeded shuffle,
    so the split depends on nothing but the group ids and (seed, round).
    """
    groups = np.asarray(groups, dtype=object)
    unique = sorted(set(groups.tolist()))
    n = len(unique)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} content groups are too few for a test part of {n_test} "
                         f"and a validation part of {n_val} with training left over")
    order = round_seed(seed, round_index).permutation(n)
    part = {}
    for rank, g in enumerate(order):
        part[unique[g]] = 0 if rank < n_test else 1 if rank < n_test + n_val else 2
    labels = np.array([part[g] for g in groups.tolist()])
    return Split(train=np.flatnonzero(labels == 2), val=np.flatnonzero(labels == 1),
                 test=np.flatnonzero(labels == 0))
