"""Reference inputs: every kind of bad or unusual file is converted correctly or skipped
with a reason; ids are unique and safe; lists, globs and folders resolve; planning scales."""

from __future__ import annotations

import re
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from biqa.generator import generate, make_plan
from biqa.generator.refs import ReferenceSkipped, load_reference, resolve_refs, sanitise_stem
from biqa.shards.reader import iter_samples


def _rgb(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=2)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _rgb16(rgb):
    """16-bit values off the 257·k grid, where rounding and truncation disagree."""
    return np.minimum(rgb.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)


def _png_bomb(path: Path, side: int = 10000) -> None:
    """A valid 1-bit PNG of side×side pixels (> Pillow's MAX_IMAGE_PIXELS) in a few kB."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data))
    row = b"\0" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side,
                     1, 0, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder with every kind of awkward reference."""
    d = tmp_path_factory.mktemp("messy")
    rgb = _rgb()
    Image.fromarray(rgb).save(d / "good.png")
    (d / "zero.png").write_bytes(b"")
    full = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "notimage.jpg").write_text("this is not an image\n")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    cv2.imwrite(str(d / "rgb16.png"), _rgb16(rgb)[:, :, ::-1])
    cv2.imwrite(str(d / "gray16.png"), rgb[:, :, 0].astype(np.uint16) * 257)
    Image.fromarray(rgb).quantize(32).save(d / "palette.png")
    Image.fromarray(rgb[:, :, 1]).save(d / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba).save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(d / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(_rgb(40, 40)).save(d / "tiny.png")
    _png_bomb(d / "bomb.png")
    for sub in ("a", "b"):
        (d / sub).mkdir()
        Image.fromarray(_rgb(seed=ord(sub))).save(d / sub / "same.png")
    Image.fromarray(rgb).save(d / "name with spaces.png")
    Image.fromarray(rgb).save(d / "ünïcödé 画像.png")
    Image.fromarray(rgb).save(d / "dots.in.name.png")
    return d


SKIP_REASONS = {"zero": "empty file", "truncated": "cannot decode", "notimage": "not an image",
                "tiny": "too small: 40x40", "bomb": "decompression bomb"}


def test_one_job_over_bad_references_skips_each_with_a_reason(messy, tmp_path):
    manifest = generate(refs=[str(messy)], distortions="21", levels="2", out=str(tmp_path),
                        workers=1, progress=False)
    assert manifest["status"] == "complete"
    reasons = {s["ref"]: s["reason"] for s in manifest["skipped_references"]}
    assert set(reasons) == set(SKIP_REASONS)
    for ref, reason in SKIP_REASONS.items():
        assert reason in reasons[ref]
    keys = {f"{m['ref']}_{m['type']:02d}_{m['level']:02d}" for _, m in iter_samples(tmp_path)}
    refs = sorted(k[: -len("_21_02")] for k in keys)
    same = sorted(r for r in refs if r.startswith("same-"))
    assert len(same) == 2 and same[0] != same[1]
    assert set(refs) - set(same) == {"cmyk", "dots-in-name", "good", "gray", "gray16",
                                     "name-with-spaces", "palette", "rgb16", "rgba", "rotated",
                                     "unicode"}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    assert manifest["totals"]["samples"] == 13 and manifest["totals"]["references"] == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar",
                                                          "stats"]


@pytest.mark.parametrize("name", SKIP_REASONS)
def test_load_reference_refuses_bad_files(messy, name):
    ext = ".jpg" if name == "notimage" else ".png"
    with pytest.raises(ReferenceSkipped, match=SKIP_REASONS[name].split(":")[0]):
        load_reference(str(messy / f"{name}{ext}"), min_size=64)


def test_conversions_are_correct(messy):
    rgb = _rgb()
    assert np.array_equal(load_reference(str(messy / "good.png")), rgb)
    # 16-bit: round(v / 257), not Pillow's truncation to the high byte
    v = _rgb16(rgb)
    assert np.array_equal(load_reference(str(messy / "rgb16.png")),
                          np.round(v / 257).astype(np.uint8))
    gray16 = load_reference(str(messy / "gray16.png"))
    assert np.array_equal(gray16, np.repeat(rgb[:, :, :1], 3, axis=2))
    gray = load_reference(str(messy / "gray.png"))
    assert np.array_equal(gray, np.repeat(rgb[:, :, 1:2], 3, axis=2))
    with Image.open(messy / "palette.png") as im:
        assert np.array_equal(load_reference(str(messy / "palette.png")),
                              np.asarray(im.convert("RGB")))
    # RGBA is composited over white: 50 % alpha halfway between the colour and 255
    expected = (rgb.astype(np.uint32) * 128 + 255 * 127 + 127) // 255
    assert np.array_equal(load_reference(str(messy / "rgba.png")), expected.astype(np.uint8))
    cmyk = load_reference(str(messy / "cmyk.jpg")).astype(int)
    assert cmyk.shape == rgb.shape and np.abs(cmyk - rgb).mean() < 6
    rotated = load_reference(str(messy / "rotated.jpg"))
    assert rotated.shape == (128, 96, 3)  # orientation 6: shown rotated 90° clockwise
    with Image.open(messy / "rotated.jpg") as im:
        assert np.array_equal(rotated, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(_rgb(30, 50)).save(path, exif=exif)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(load_reference(str(path)), expected)


def test_transparent_palette_is_composited(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "t.png", transparency=0)
    out = load_reference(str(tmp_path / "t.png"))
    assert (out[0, 0] == 255).all() and out[0, 1].tolist() == [200, 100, 50]


def test_resize_covers_and_centre_crops(messy):
    out = load_reference(str(messy / "good.png"), (64, 64))
    assert out.shape == (64, 64, 3)
    # 128x96 covering 64x64 is scaled by 2/3 to 85x64 (aspect kept) and its middle cut out:
    # red rises 255/128 per source column, so 3.0 per output column, starting near column 15
    red = out[:, :, 0].astype(float).mean(axis=0)
    slope = np.polyfit(np.arange(64), red, 1)[0]
    assert abs(slope - 3.0) < 0.15 and abs(red[0] - 15 * 255 / 128) < 6
    green = out[:, :, 1].astype(float).mean(axis=1)
    assert abs(np.polyfit(np.arange(64), green, 1)[0] - 255 / 64) < 0.2


def test_ids_are_safe_and_unique():
    assert sanitise_stem("ünïcödé 画像") == "unicode"
    assert sanitise_stem("../../etc/passwd") == "etc-passwd"
    assert sanitise_stem("画像") == "ref"
    assert sanitise_stem("x" * 300) == "x" * 64


def test_list_files_globs_and_missing_entries(messy, tmp_path):
    csv = tmp_path / "dataset_ref_img.csv"
    csv.write_text("ref_im,whatever\ngood.png,1\n\"name with spaces.png\",2\nmissing.png,3\n")
    table = resolve_refs([str(csv)], str(messy))
    assert table.ids == ("good", "missing", "name-with-spaces")
    with pytest.raises(ReferenceSkipped, match="file not found"):
        load_reference(table.paths[1])
    txt = tmp_path / "list.txt"
    txt.write_text("a/same.png\nb/same.png\n")
    assert len(set(resolve_refs([str(txt)], str(messy)).ids)) == 2
    globbed = resolve_refs([str(messy / "*" / "same.png")])
    assert sorted(globbed.rel) == ["a/same.png", "b/same.png"]
    assert resolve_refs([str(messy), str(messy / "good.png")]).ids.count("good") == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no image files"):
        resolve_refs([str(empty)])


def test_keys_sort_like_the_table(tmp_path):
    for stem in ("a", "a-1", "a_b", "B", "a0"):
        Image.fromarray(_rgb()).save(tmp_path / f"{stem}.png")
    ids = resolve_refs([str(tmp_path)]).ids
    keys = [f"{i}_01_01" for i in ids]
    assert keys == sorted(keys)


def test_planning_six_million_samples_is_fast_and_small(tmp_path):
    listing = tmp_path / "refs.txt"
    listing.write_text("".join(f"dir{i % 97}/img_{i:06d}.png\n" for i in range(40000)))
    tracemalloc.start()
    start = time.perf_counter()
    plan = make_plan(refs=[str(listing)], distortions="all", out=str(tmp_path / "out"),
                     per_shard=1000)
    n_types = len(plan.settings.type_ids)
    counts = [t.planned_samples for t in plan.tasks()]
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.n_samples == 40000 * n_types * 5 >= 6_000_000
    assert sum(counts) == plan.n_samples and all(c % 5 == 0 for c in counts)
    assert counts[:-1] == [1000] * (len(counts) - 1)
    assert seconds < 15, seconds
    assert peak < 150 * 2**20, peak
    last = plan.task(plan.n_shards - 1)
    assert last.ref_ids[-1] == "img_039999"
    groups = list(last.groups())
    assert groups[-1] == (len(last.ref_ids) - 1, max(plan.settings.type_ids))
    assert not (tmp_path / "out").exists()  # planning writes nothing
