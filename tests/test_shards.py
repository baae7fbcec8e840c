"""Tar writing and reading: reproducible bytes, atomic publication, lossless codecs, errors."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from biqa.shards.reader import decode_sample, iter_samples, load_manifest, shard_paths
from biqa.shards.writer import (MEMBER_EXTENSIONS, ShardWriter, atomic_write_bytes, encode_image,
                                file_digest)


def _image(seed=0, h=40, w=56):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, samples, fmt="png"):
    with ShardWriter(str(path)) as w:
        for key, img, cls in samples:
            w.add(key, {MEMBER_EXTENSIONS[fmt]: encode_image(img, fmt),
                        "json": json.dumps({"class": cls}).encode(),
                        "cls": str(cls).encode()})
        return w.commit()


def test_shard_bytes_are_reproducible_and_headers_fixed(tmp_path):
    samples = [(f"ref_01_{lv:02d}", _image(lv), lv - 1) for lv in range(1, 6)]
    size_a, sha_a = _write(tmp_path / "a.tar", samples)
    size_b, sha_b = _write(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert (size_a, sha_a) == (size_b, sha_b) == file_digest(str(tmp_path / "a.tar"))
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and len(names) == 15
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == \
        {(0, 0, 0, "", "", 0o644)}
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]  # no temp files left


def test_unfinished_shard_never_appears_under_its_final_name(tmp_path):
    final = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(str(final)) as w:
            w.add("k_01_01", {"png": encode_image(_image(), "png")})
            assert not final.exists() and len(os.listdir(tmp_path)) == 1  # only the temp
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key", ["a.b_01_01", "../x_01_01", "a/b", "", "sp ace"])
def test_unsafe_keys_are_refused(tmp_path, key):
    with ShardWriter(str(tmp_path / "s.tar")) as w, pytest.raises(ValueError, match="key"):
        w.add(key, {"png": b"x"})


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(str(target), b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(str(target), "text is not bytes")  # the write itself fails
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("fmt", ["png", "webp", "zstd"])
def test_lossless_round_trip_through_webdataset(tmp_path, fmt):
    samples = [(f"r{i}_02_{lv:02d}", _image(10 * i + lv), 5 + lv - 1)
               for i in range(2) for lv in (1, 3)]
    size, sha = _write(tmp_path / "shard-000000.tar", samples, fmt)
    manifest = {"format": "webdataset", "shards": [
        {"name": "shard-000000.tar", "samples": 4, "size": size, "sha256": sha}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert shard_paths(tmp_path) == [str(tmp_path / "shard-000000.tar")]
    got = list(iter_samples(str(tmp_path)))
    assert len(got) == 4
    for (key, img, cls), (decoded, meta) in zip(samples, got):
        assert decoded.dtype == np.uint8 and np.array_equal(decoded, img)
        assert meta == {"class": cls}
    raw = next(iter(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)))
    assert raw["__key__"] == samples[0][0] and set(raw) >= {MEMBER_EXTENSIONS[fmt], "json", "cls"}


def test_decode_sample_rejects_corrupt_samples():
    good = {"__key__": "k_01_01", "png": encode_image(_image(), "png"), "json": b'{"class": 3}',
            "cls": b"3"}
    img, meta = decode_sample(good)
    assert img.shape == (40, 56, 3) and meta["class"] == 3
    for broken, why in [({**good, "png": good["png"][:50]}, "decode"),
                        ({**good, "json": b"{not json"}, "k_01_01"),
                        ({**good, "cls": b"4"}, "disagrees"),
                        ({"__key__": "k", "json": b"{}"}, "missing")]:
        with pytest.raises(ValueError, match=why):
            decode_sample(broken)


def test_missing_or_broken_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no biqa-gen manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        shard_paths(tmp_path)


def test_encode_refuses_unknown_format():
    with pytest.raises(ValueError, match="png, webp, zstd"):
        encode_image(_image(), "bmp")
    buf = io.BytesIO(encode_image(_image(), "png"))
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
