"""The dataset loaders read each official layout, and splits are reference-disjoint and stable.

The tiny datasets are built here from biqa's own distortions of the bundled sample
references (downscaled), with a subjective score that falls with the level plus
noise, and written in every official layout.  test_finetune.py reuses the builders.
"""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from biqa.data import sample_reference_paths
from biqa.distortions import distort
from biqa.training.iqa_datasets import (DatasetError, load_dataset, split_by_content)

TOY_SIZE = (96, 72)  # width, height of each toy reference
TOY_LEVELS = (1, 3, 5)
TOY_TYPES = {"gaussian_blur": {"tid": 8, "kadid": 1, "live": "gblur", "csiq": "BLUR"},
             "white_noise": {"tid": 1, "kadid": 11, "live": "wn", "csiq": "AWGN"}}
N_REFS = 28  # the 7 bundled references, each cut into 4 quadrants


def _mos(level: int, rng: np.random.Generator) -> float:
    """A 1..5 opinion score that falls with the level, with some rater noise."""
    return float(5.0 - 0.8 * (level - 1) + rng.normal(0, 0.15))


def toy_references() -> list[np.ndarray]:
    """The bundled references, shrunk to twice TOY_SIZE and cut into quadrants."""
    w, h = TOY_SIZE
    out = []
    for path in sample_reference_paths():
        big = np.asarray(Image.open(path).convert("RGB").resize((2 * w, 2 * h),
                                                                Image.Resampling.BOX))
        out += [big[y:y + h, x:x + w].copy() for y in (0, h) for x in (0, w)]
    return out


def make_toy_samples() -> list[tuple]:
    """(ref number, ref, type name, level, distorted image, mos): 28 refs x 2 types x 3 levels."""
    rng = np.random.default_rng(2024)
    out = []
    for r, ref in enumerate(toy_references(), 1):
        for kind in TOY_TYPES:
            for level in TOY_LEVELS:
                image = distort(ref, kind, level, rng=int(rng.integers(2**31)))
                out.append((r, ref, kind, level, image, _mos(level, rng)))
    return out


@pytest.fixture(scope="session")
def toy_samples():
    return make_toy_samples()


def _save(path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_tid2013(root, samples):
    lines = []
    for r, ref, kind, level, image, mos in samples:
        name = f"i{r:02d}_{TOY_TYPES[kind]['tid']:02d}_{level}.bmp"
        _save(root / "distorted_images" / name, image)
        _save(root / "reference_images" / f"I{r:02d}.BMP", ref)
        lines.append(f"{mos:.5f} {name}")
    (root / "mos_with_names.txt").write_text("\n".join(lines) + "\n")
    return root


def write_kadid10k(root, samples):
    rows = []
    for r, ref, kind, level, image, mos in samples:
        name = f"I{r:02d}_{TOY_TYPES[kind]['kadid']:02d}_{level:02d}.png"
        _save(root / "images" / name, image)
        _save(root / "images" / f"I{r:02d}.png", ref)
        rows.append({"dist_img": name, "ref_img": f"I{r:02d}.png", "dmos": f"{mos:.4f}",
                     "var": "0.5"})
    with (root / "dmos.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dist_img", "ref_img", "dmos", "var"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_live(root, samples):
    """LIVE's DMOS rises with distortion; each reference also appears once as an
    undistorted copy (orgs = 1) in gblur/, as in the release."""
    per_folder = {f: [] for f in ("jp2k", "jpeg", "wn", "gblur", "fastfading")}
    refs = {}
    for r, ref, kind, level, image, mos in samples:
        per_folder[TOY_TYPES[kind]["live"]].append((f"ref{r}.bmp", image, 20 * (6 - mos), 0))
        refs[r] = ref
    for r, ref in refs.items():
        per_folder["gblur"].append((f"ref{r}.bmp", ref, 0.0, 1))
    dmos, orgs, names = [], [], []
    for folder, entries in per_folder.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (ref_name, image, score, org) in enumerate(entries, 1):
            _save(root / folder / f"img{n}.bmp", image)
            lines.append(f"{ref_name} img{n}.bmp 0.5")
            dmos.append(score), orgs.append(org), names.append(ref_name)
        (root / folder / "info.txt").write_text("\n".join(lines) + "\n")
    savemat(root / "dmos_realigned.mat", {"dmos_new": np.array([dmos]), "orgs": np.array([orgs])})
    savemat(root / "refnames_all.mat", {"refnames_all": np.array([names], dtype=object)})
    return root


def write_csiq(root, samples):
    lines = []
    for r, ref, kind, level, image, mos in samples:
        name = f"ref{r}.{TOY_TYPES[kind]['csiq']}.{level}.png"
        _save(root / "all_imgs" / name, image)
        lines.append(f"{name} {(5 - mos) / 4:.5f}")
    (root / "csiq_label.txt").write_text("\n".join(lines) + "\n")
    return root


def write_livec(root, samples):
    """Seven practice images listed first (kept in Images/trainingImages/), then the rest."""
    names, mos = [], []
    for i, (r, ref, kind, level, image, score) in enumerate(samples):
        practice = i < 7
        name = f"t{i}.bmp" if practice else f"{i}.bmp"
        _save(root / "Images" / ("trainingImages" if practice else "") / name, image)
        names.append(name), mos.append(20 * score)
    (root / "Data").mkdir()
    savemat(root / "Data" / "AllImages_release.mat",
            {"AllImages_release": np.array(names, dtype=object).reshape(-1, 1)})
    savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    return root


def write_koniq10k(root, samples):
    with_header = [("image_name", "MOS", "MOS_zscore")]
    for i, (r, ref, kind, level, image, score) in enumerate(samples):
        _save(root / "512x384" / f"{1000 + i}.png", image)
        with_header.append((f"{1000 + i}.png", f"{score:.3f}", f"{25 * score - 40:.3f}"))
    with (root / "koniq10k_scores_and_distributions.csv").open("w", newline="") as f:
        csv.writer(f).writerows(with_header)
    return root


def write_csv(root, samples):
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos", "ref", "type"])
        for r, ref, kind, level, image, mos in samples:
            name = f"img/r{r}_{kind}_{level}.png"
            _save(root / name, image)
            writer.writerow([name, f"{mos:.4f}", f"r{r}", kind])
    return root


WRITERS = {"tid2013": write_tid2013, "kadid10k": write_kadid10k, "live": write_live,
           "csiq": write_csiq, "livec": write_livec, "koniq10k": write_koniq10k,
           "csv": write_csv}

# name -> (images, content groups, higher is better, has types)
EXPECTED = {"tid2013": (168, 28, True, True), "kadid10k": (168, 28, True, True),
            "live": (168, 28, False, True), "csiq": (168, 28, False, True),
            "livec": (161, 161, True, False), "koniq10k": (168, 168, True, False),
            "csv": (168, 28, True, True)}


@pytest.fixture(scope="session")
def toy_roots(tmp_path_factory, toy_samples):
    """Every layout written once per session."""
    base = tmp_path_factory.mktemp("iqa")
    roots = {}
    for name, write in WRITERS.items():
        (base / name).mkdir()
        roots[name] = write(base / name, toy_samples)
    return roots


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_parses(name, toy_roots, toy_samples):
    data = load_dataset(name, toy_roots[name])
    n, groups, higher, typed = EXPECTED[name]
    assert len(data) == n and len(set(data.groups)) == groups
    assert data.higher_better is higher
    assert (data.types is not None) is typed
    if typed:
        assert len(set(data.types)) == 2
    assert all(p.is_file() for p in data.paths)
    # each image carries its own score, in the dataset's direction: quality falls with level
    level_of = {s[4].tobytes(): s[3] for s in toy_samples}
    levels = [level_of[np.asarray(Image.open(p).convert("RGB")).tobytes()] for p in data.paths]
    assert np.corrcoef(data.quality, levels)[0, 1] < -0.9


def test_tid2013_groups_by_reference_and_names_types(toy_roots):
    data = load_dataset("tid2013", toy_roots["tid2013"])
    assert sorted(set(data.groups)) == [f"i{r:02d}" for r in range(1, N_REFS + 1)]
    assert set(data.types) == {"additive_gaussian_noise", "gaussian_blur"}


def test_live_leaves_out_undistorted_copies(toy_roots):
    data = load_dataset("live", toy_roots["live"])
    assert all(s > 0 for s in data.scores)  # the 28 orgs (DMOS 0) are gone
    assert set(data.types) == {"wn", "gblur"}


def test_livec_leaves_out_practice_images(toy_roots):
    data = load_dataset("livec", toy_roots["livec"])
    assert not any("trainingImages" in str(p) for p in data.paths)


def test_root_from_environment(toy_roots, monkeypatch):
    monkeypatch.setenv("BIQA_DATA", str(toy_roots["csiq"].parent))
    assert len(load_dataset("csiq")) == 168
    monkeypatch.delenv("BIQA_DATA")
    with pytest.raises(DatasetError, match="BIQA_DATA"):
        load_dataset("csiq")


@pytest.mark.parametrize("round_index", [0, 1, 5])
def test_split_is_disjoint_by_reference_and_covers_everything(toy_roots, round_index):
    data = load_dataset("kadid10k", toy_roots["kadid10k"])
    split = split_by_content(data.groups, round_index, seed=3)
    parts = [set(np.asarray(data.groups)[p]) for p in (split.train, split.val, split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sorted(np.concatenate([split.train, split.val, split.test])) == list(range(len(data)))
    assert [len(p) for p in parts] == [19, 3, 6]


def test_split_depends_only_on_groups_and_seed(toy_roots, tmp_path):
    """Same split on every run, whatever order the label file lists the images in."""
    data = load_dataset("kadid10k", toy_roots["kadid10k"])
    shuffled = tmp_path / "kadid"
    shuffled.mkdir()
    (shuffled / "images").symlink_to(toy_roots["kadid10k"] / "images")
    rows = (toy_roots["kadid10k"] / "dmos.csv").read_text().splitlines()
    body = rows[1:]
    random.Random(7).shuffle(body)
    (shuffled / "dmos.csv").write_text("\n".join([rows[0]] + body) + "\n")
    other = load_dataset("kadid10k", shuffled)

    def parts(d, r):
        s = split_by_content(d.groups, r, seed=11)
        return [sorted(p.name for p in d.subset(i).paths) for i in (s.train, s.val, s.test)]

    for r in range(3):
        assert parts(data, r) == parts(other, r) == parts(data, r)
    tests = {tuple(parts(data, r)[2]) for r in range(6)}
    assert len(tests) > 1  # rounds differ


def test_split_refuses_too_few_groups():
    with pytest.raises(ValueError, match="too few"):
        split_by_content(["a", "a", "b"], 0)


# --------------------------------------------------------------- malformed data

def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset("tid2013", tmp_path / "nope")


@pytest.mark.parametrize("name, expected", [
    ("tid2013", "mos_with_names.txt"), ("kadid10k", "dmos.csv"), ("live", "dmos_realigned.mat"),
    ("csiq", "csiq_label.txt"), ("livec", "AllImages_release.mat"),
    ("koniq10k", "koniq10k_scores_and_distributions.csv"), ("csv", "labels.csv")])
def test_empty_root_names_the_expected_file(name, expected, tmp_path):
    with pytest.raises(DatasetError, match=expected):
        load_dataset(name, tmp_path)


def test_malformed_lines_and_missing_images(toy_roots, tmp_path):
    root = tmp_path / "tid"
    (root / "distorted_images").mkdir(parents=True)
    (root / "mos_with_names.txt").write_text("4.1 i01_01_1.bmp\nhello\n")
    with pytest.raises(DatasetError, match=r"mos_with_names.txt:2: expected"):
        load_dataset("tid2013", root)
    (root / "mos_with_names.txt").write_text("x i01_01_1.bmp\n")
    with pytest.raises(DatasetError, match="not a number"):
        load_dataset("tid2013", root)
    (root / "mos_with_names.txt").write_text("4.1 i01_01_1.bmp\n")
    with pytest.raises(DatasetError, match="1 of 1 listed images are missing"):
        load_dataset("tid2013", root)

    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    (csv_root / "labels.csv").write_text("path,score\na.png,1\n")
    with pytest.raises(DatasetError, match="'image' and exactly one of 'mos' or 'dmos'"):
        load_dataset("csv", csv_root)


def test_live_inconsistent_files_are_refused(toy_roots, tmp_path):
    import shutil
    root = tmp_path / "live"
    shutil.copytree(toy_roots["live"], root)
    savemat(root / "refnames_all.mat", {"refnames_all": np.array([["x.bmp"] * 3], dtype=object)})
    with pytest.raises(DatasetError, match="same number of images"):
        load_dataset("live", root)
