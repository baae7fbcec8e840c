"""The generated docs and the scripts that write them: docs/distortions.md and the
gallery (benchmarks/gallery.py), and benchmarks/fidelity.py without its data."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biqa.distortions import DistortionNotApplicable, get, registry
from biqa.distortions._matlab import psnr
from biqa.distortions.api import apply_spec
from biqa.fidelity import SEEDS
from biqa.generator import make_plan
from biqa.generator.preview import (CAPTION_HEIGHT, HEADER_HEIGHT, LABEL_WIDTH,
                                    write_contact_sheet)
from biqa.generator.refs import load_reference, resolve_refs
from biqa.generator.seeding import sample_rng

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _script(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gallery():
    return _script("gallery")


def _bundled(ref_id: str) -> np.ndarray:
    refs = resolve_refs(None)
    return load_reference(refs.paths[refs.ids.index(ref_id)], None, 64)


# ------------------------------------------------------------ docs/distortions.md

def test_distortions_page_is_what_the_script_writes(gallery):
    """Everything on the page but the measured figures comes from the registry and the
    script's notes: re-rendered with the page's own figures it must come out the same,
    so a changed parameter, type or note fails until the page is regenerated."""
    page = (DOCS / "distortions.md").read_text()
    psnr_rows = re.findall(r"^### (\d+) \S+$.*?^\| mean PSNR \(dB\), (\d+) refs \| ([^\n]*) \|$",
                           page, re.M | re.S)
    counts = re.search(r"bundled references,\s+(\d+) of the (\d+) samples", page)
    assert psnr_rows and counts, "docs/distortions.md lost its tables"
    measured = gallery.Measured(
        psnr={int(t): [float(v) for v in cells.split(" | ")] for t, _, cells in psnr_rows},
        refs={int(t): int(n) for t, n, _ in psnr_rows},
        samples=int(counts.group(2)), identical=int(counts.group(1)))
    assert [s.id for s in registry()] == sorted(measured.psnr), \
        "docs/distortions.md misses types: run python benchmarks/gallery.py"
    assert set(gallery.NOTES) == {s.id for s in registry()}
    assert gallery.render_markdown(registry(), measured, "all") == page, \
        "docs/distortions.md is out of date: run python benchmarks/gallery.py"
    # 7 references x 35 types x 5 levels, less type 27 for astronaut (no level-4 candidate)
    assert measured.samples == 7 * len(registry()) * 5 - 5
    # the identity levels on the 6 references that span 0..255 (all but chelsea)
    assert measured.identical == 6 * len(gallery.IDENTITY_LEVELS)


def test_the_documented_identity_levels_are_exactly_those_of_the_code(gallery):
    """On a reference spanning 0..255 exactly IDENTITY_LEVELS return the reference
    itself, with biqa-gen's seeds; everything else, contrast level 3 included, changes
    it."""
    img = _bundled("astronaut")
    assert img.min() == 0 and img.max() == 255
    identical = set()
    for spec in registry():
        for level in range(1, 6):
            try:
                out = apply_spec(spec, img, level, sample_rng(0, "astronaut", spec.id, level))
            except DistortionNotApplicable:
                assert (spec.id, level) == (27, 4)  # documented: the grey cell
                continue
            if np.array_equal(out, img):
                identical.add((spec.id, level))
    assert identical == set(gallery.IDENTITY_LEVELS)


def test_identity_levels_on_a_reference_that_does_not_span_0_255(gallery):
    """chelsea (0..215): the identity levels give the stretched image, ~21 dB from the
    reference (docs/distortions.md), and all of them the same one."""
    img = _bundled("chelsea")
    assert img.min() == 0 and img.max() == 215
    stretched = np.floor(img / 215 * 255 + 0.5).astype(np.uint8)  # no k/215*255 is a tie
    for type_id, level in gallery.IDENTITY_LEVELS:
        out = apply_spec(get(type_id), img, level, sample_rng(0, "chelsea", type_id, level))
        assert np.array_equal(out, stretched), (type_id, level)
    assert 20.5 < psnr(img, stretched) < 21.5


def test_gallery_script_writes_a_deterministic_sheet_and_page(gallery, tmp_path):
    assert gallery.main(["--distortions", "18,1", "--out-dir", str(tmp_path)]) == 0
    again = tmp_path / "again.png"
    refs = resolve_refs(None)
    plan = make_plan(refs=[refs.paths[refs.ids.index(gallery.GALLERY_REF)]],
                     distortions="1,18", seed=0)
    write_contact_sheet(str(again), plan, thumb_width=gallery.GALLERY_CROP[2],
                        crop=gallery.GALLERY_CROP)
    assert again.read_bytes() == (tmp_path / "gallery.png").read_bytes()
    width, height = gallery.GALLERY_CROP[2:]
    with Image.open(again) as im:
        assert im.size == (LABEL_WIDTH + 5 * width, HEADER_HEIGHT + 3 * (height + CAPTION_HEIGHT))
    page = (tmp_path / "distortions.md").read_text()
    assert re.findall(r"^### .*$", page, re.M) == ["### 1 gaussian_blur", "### 18 mean_shift"]
    # 7 references x 2 types x 5 levels; 1/L1 and 18/L3 identical on the 6 spanning 0..255
    assert re.search(r"bundled references,\s+12 of the 70 samples", page)


def test_gallery_script_refuses_a_bad_selection_in_one_line(gallery, tmp_path, capsys):
    assert gallery.main(["--distortions", "99", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown distortion id 99" in err
    assert not list(tmp_path.iterdir())


def test_committed_gallery_shows_every_type_and_is_small(gallery):
    with Image.open(DOCS / "gallery.png") as im:
        width, height = im.size
    cell_width, cell_height = gallery.GALLERY_CROP[2:]
    rows = (height - HEADER_HEIGHT) / (cell_height + CAPTION_HEIGHT)
    assert (width, rows) == (LABEL_WIDTH + 5 * cell_width, len(registry()) + 1), \
        "docs/gallery.png is out of date: run python benchmarks/gallery.py"
    assert (DOCS / "gallery.png").stat().st_size < 2 * 2**20


# ------------------------------------------------------------------- fidelity

def test_fidelity_script_without_reference_data_says_so_in_one_line(tmp_path):
    """A clone has no reference outputs: one line naming where it looked and how to
    point it elsewhere, exit status 2, no traceback, nothing written."""
    out = tmp_path / "fidelity.md"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BIQA_REFERENCE": str(tmp_path)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fidelity.py"),
                          "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert str(tmp_path) in run.stderr
    assert "$BIQA_REFERENCE" in run.stderr and "--reference" in run.stderr
    assert not out.exists()


def test_fidelity_page_starts_with_the_scripts_header():
    """The prose of docs/fidelity.md lives in the script, so regenerating keeps it."""
    page = (DOCS / "fidelity.md").read_text()
    refs = re.search(r"^Reference images: (.*)\.$", page, re.M).group(1)
    header = _script("fidelity").HEADER.format(refs=refs, nseeds=len(SEEDS))
    assert page.startswith(header + "\n\n## ref")
