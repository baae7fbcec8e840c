"""Reproducible tar shards and atomic files.

A shard's bytes depend only on its samples: fixed mtime, uid/gid 0, no user
names, members in the order given (the generator gives them byte-sorted),
ustar headers.  Everything is written under a temporary name unique to the
writing process and renamed only when complete, so a crash never leaves a
partial file under a final name, and two processes racing on the same shard
(an orphaned worker and a resumed run) cannot corrupt each other's output.
Temporary names carry biqa's mark (``<final>.biqa-tmp-<pid>-<hex>.partial``),
so clean-up can tell them from anyone else's ``*.partial`` files.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import tarfile

import cv2
import numpy as np
import zstandard
from PIL import Image

FIXED_MTIME = 0
PARTIAL_SUFFIX = ".partial"
TEMP_MARK = ".biqa-tmp-"
_TEMP_NAME = re.compile(r"^(?P<final>.+)" + re.escape(TEMP_MARK) + r"\d+-[0-9a-f]{8}"
                        + re.escape(PARTIAL_SUFFIX) + "$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_EXT = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)?$")


def temp_name(final_path: str) -> str:
    """A sibling name no other process uses, marked as biqa's garbage after a crash."""
    return f"{final_path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def temp_final_name(name: str) -> str | None:
    """The final name that a temporary name made by ``temp_name`` stands for; None for
    any other name (a file biqa did not make)."""
    m = _TEMP_NAME.match(name)
    return m["final"] if m else None


def remove_own_partials(final_path) -> list[str]:
    """Delete the temp files that ``temp_name`` made for ``final_path`` and a killed process
    left behind -- only names of exactly that shape, beside it, never anything else."""
    final_path = str(final_path)
    folder, base = os.path.split(final_path)
    removed = []
    try:
        names = os.listdir(folder or ".")
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if temp_final_name(name) == base and os.path.isfile(path) and not os.path.islink(path):
            _unlink_quietly(path)
            removed.append(path)
    return removed


def _fsync_and_replace(tmp: str, final_path: str, f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, final_path)


def atomic_write(final_path, write) -> None:
    """Write a file through ``write(binary_file)`` so that ``final_path`` is either
    absent, old, or complete -- the one way biqa writes any output file.  Creates the
    parent folder if needed."""
    final_path = str(final_path)
    os.makedirs(os.path.dirname(final_path) or ".", exist_ok=True)
    tmp = temp_name(final_path)
    try:
        f = open(tmp, "wb")
        write(f)
        _fsync_and_replace(tmp, final_path, f)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write_bytes(final_path, data: bytes) -> None:
    """``atomic_write`` of a bytes object."""
    atomic_write(final_path, lambda f: f.write(data))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _HashingFile:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Stream samples into ``final_path`` (a tar); ``commit()`` publishes it.

    >>> with ShardWriter("out/shard-000000.tar") as w:
    ...     w.add("ref_01_01", {"png": b"...", "json": b"{}", "cls": b"0"})
    ...     size, sha256 = w.commit()

    Leaving the block without ``commit()`` (an exception) deletes the temp file.
    """

    def __init__(self, final_path: str):
        self.final_path = final_path
        self._tmp = temp_name(final_path)
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._committed = False

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: ``<key>.<ext>`` for each member, extensions sorted."""
        if not _KEY.match(key):
            raise ValueError(f"invalid sample key {key!r}: only letters, digits, '_' and '-'")
        for ext in sorted(members):
            if not _EXT.match(ext):
                raise ValueError(f"invalid member extension {ext!r}")
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))

    def commit(self) -> tuple[int, str]:
        """Finish the tar, rename it to its final name; returns (size, sha256 hex)."""
        self._tar.close()
        _fsync_and_replace(self._tmp, self.final_path, self._file)
        self._committed = True
        return self._hashing.size, self._hashing.sha256.hexdigest()

    def abort(self) -> None:
        if not self._committed:
            try:
                self._file.close()
            except OSError:
                pass  # e.g. a full disk refusing the last buffered bytes: the file goes anyway
            _unlink_quietly(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


# The member extension of each lossless image format.
MEMBER_EXTENSIONS = {"png": "png", "webp": "webp", "zstd": "npy.zst"}


def encode_image(rgb, image_format: str) -> bytes:
    """Lossless 8-bit encoding of an RGB uint8 array.

    WebP (the default): lossless, fastest method and effort -- less CPU than PNG to
    encode and to decode, and smaller (docs/generator.md).  PNG: zlib level 1
    with the RLE strategy, the best PNG setting measured here.  zstd: the raw pixels as
    ``.npy``, zstd level 1 -- about 1.6x the bytes of WebP, but decoded several times
    faster, for training runs that are short of loader CPU rather than disk
    (docs/performance.md).
    """
    if image_format == "png":
        ok, buf = cv2.imencode(".png", rgb[:, :, ::-1], [
            cv2.IMWRITE_PNG_COMPRESSION, 1,
            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
        if not ok:
            raise RuntimeError("OpenCV could not encode the PNG")
        return buf.tobytes()
    if image_format == "webp":
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="WEBP", lossless=True, method=0, quality=0)
        return out.getvalue()
    if image_format == "zstd":
        out = io.BytesIO()
        np.lib.format.write_array(out, np.ascontiguousarray(rgb, dtype=np.uint8),
                                  allow_pickle=False)
        return zstandard.ZstdCompressor(level=1).compress(out.getvalue())
    raise ValueError(f"image format must be one of {', '.join(MEMBER_EXTENSIONS)}, got "
                     f"{image_format!r}")
