"""Reference images: resolve ``--refs`` into a sorted table of ids and paths, and load one.

Resolution only lists names (no decoding, no ``stat`` of list entries), so a
700 000-line list is planned in seconds; every file is opened and validated
later, inside the worker that distorts it, and a bad one is skipped with a
reason instead of failing the job.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import posixpath
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from biqa.distortions.api import as_rgb_uint8

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                              ".gif", ".ppm", ".pgm", ".pnm", ".jp2", ".j2k"})
LIST_EXTENSIONS = frozenset({".csv", ".txt"})
MAX_ID_LENGTH = 64  # keeps tar member names inside ustar's 100 characters
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_GLOB_MAGIC = re.compile(r"[*?[]")


class ReferenceSkipped(Exception):
    """A reference that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class RefTable:
    """References sorted by id: ``ids[i]`` names the file ``paths[i]`` (``rel[i]`` as listed).

    Ids are what sample keys and seeds are built from, so they depend only on
    the file names as listed, never on list positions or the machine.
    """

    ids: tuple[str, ...]
    paths: tuple[str, ...]
    rel: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """sha256 over (id, listed name): identifies the reference set for resume checks."""
        h = hashlib.sha256()
        for ref_id, rel in zip(self.ids, self.rel):
            h.update(f"{ref_id}\t{rel}\n".encode())
        return h.hexdigest()


def sanitise_stem(stem: str) -> str:
    """ASCII letters, digits, ``_`` and ``-`` only: no dots, slashes or spaces can reach a key."""
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return _UNSAFE.sub("-", ascii_stem).strip("-")[:MAX_ID_LENGTH] or "ref"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def assign_ids(rel_paths: list[str]) -> list[str]:
    """One unique id per listed path: the sanitised stem, plus a hash of the listed
    path where stems collide (case-insensitively, for case-insensitive file systems)."""
    stems = [sanitise_stem(posixpath.splitext(posixpath.basename(r))[0]) for r in rel_paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    ids = [s if counts[s.lower()] == 1 else f"{s}-{_short_hash(r)}"
           for s, r in zip(stems, rel_paths)]
    seen: dict[str, str] = {}
    for ref_id, rel in zip(ids, rel_paths):
        other = seen.setdefault(ref_id.lower(), rel)
        if other != rel:
            raise ValueError(f"references {other!r} and {rel!r} map to the same id {ref_id!r}; "
                             "rename one of them")
    return ids


def _read_list(list_file: Path) -> list[str]:
    """First column of a .csv (or whole lines of a .txt); a first row that names no
    image file is a header (KADIS-700k's ``dataset_ref_img.csv`` has one)."""
    with open(list_file, newline="", encoding="utf-8-sig") as f:
        if list_file.suffix.lower() == ".csv":
            names = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
        else:
            names = [line.split("\t")[0].strip() for line in f if line.strip()]
    if names and posixpath.splitext(names[0])[1].lower() not in IMAGE_EXTENSIONS:
        names = names[1:]
    return names


def _list_folder(folder: Path) -> list[str]:
    """Image files under ``folder`` as posix paths relative to it (string ops: fast for 10^6)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        found.extend(prefix + f for f in filenames
                     if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return found


def _glob_root(pattern: str) -> Path:
    """The folder before the first wildcard: listed names are relative to it."""
    parts = Path(pattern).parts
    first_magic = next((i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p)), len(parts))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _entries(source: str, refs_root: str | None) -> list[tuple[str, str]]:
    """(listed name, path) pairs of one ``--refs`` value."""
    path = Path(source)
    if path.is_dir():
        return [(rel, str(path / rel)) for rel in _list_folder(path)]
    if path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
        root = refs_root or str(path.parent)
        return [(n.replace("\\", "/"), os.path.join(root, n)) for n in _read_list(path)]
    if _GLOB_MAGIC.search(source):
        root = _glob_root(source)
        return [(Path(p).relative_to(root).as_posix(), p)
                for p in glob.glob(source, recursive=True) if Path(p).is_file()]
    if path.is_file():
        return [(path.name, str(path))]
    raise ValueError(f"--refs {source!r}: no such folder, list file (.csv/.txt), glob match "
                     "or image file")


def resolve_refs(sources: list[str] | tuple[str, ...] | None,
                 refs_root: str | None = None) -> RefTable:
    """Resolve ``--refs`` values (default: the bundled sample images) into a RefTable.

    The table is sorted by ``id + "_"`` so that samples written in table order
    are also in byte order of their keys ``<id>_<TT>_<LL>``.
    """
    if not sources:
        from biqa.data import SAMPLE_REFS_DIR
        sources = [str(SAMPLE_REFS_DIR)]
    entries: list[tuple[str, str]] = []
    seen_paths: set[str] = set()
    for source in sources:
        for rel, path in _entries(source, refs_root):
            absolute = os.path.abspath(path)
            if absolute not in seen_paths:
                seen_paths.add(absolute)
                entries.append((rel, absolute))
    if not entries:
        raise ValueError(f"--refs {' '.join(sources)}: no image files found")
    ids = assign_ids([rel for rel, _ in entries])
    order = sorted(range(len(ids)), key=lambda i: ids[i] + "_")
    return RefTable(ids=tuple(ids[i] for i in order),
                    paths=tuple(entries[i][1] for i in order),
                    rel=tuple(entries[i][0] for i in order))


# ------------------------------------------------------------------ loading one reference

# EXIF orientation -> the numpy operation that shows the image upright (as Pillow's
# ImageOps.exif_transpose does), applied to H*W*C arrays.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _is_16_bit(im: Image.Image) -> bool:
    """Pillow decodes 16-bit colour PNG/TIFF to 8 bits by truncation; spot those files."""
    if im.mode.startswith("I;16") or im.mode == "I":
        return True
    return any(";16" in str(tile.args) for tile in im.tile)


def _decode_16_bit(path: str, im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16") or im.mode == "I":
        raw = np.asarray(im)
        if raw.min() < 0 or raw.max() > 65535:
            raise ReferenceSkipped(f"{im.mode} image with values outside 0..65535")
        return raw.astype(np.uint16)[:, :, None]
    raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ReferenceSkipped("cannot decode 16-bit image")
    raw = raw[:, :, None] if raw.ndim == 2 else raw
    if raw.shape[2] >= 3:  # OpenCV is BGR(A)
        raw = np.concatenate([raw[:, :, 2::-1], raw[:, :, 3:]], axis=2)
    return raw


def _decode_8_bit(im: Image.Image) -> np.ndarray:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("F", "I;32", "I;32F"):
        raise ReferenceSkipped(f"floating-point/32-bit image (mode {im.mode}) has no 8-bit scale")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB...: Pillow's conversion
    raw = np.asarray(im)
    return raw[:, :, None] if raw.ndim == 2 else raw


def to_rgb8(raw: np.ndarray) -> np.ndarray:
    """uint8/uint16 H*W*{1,2,3,4} -> uint8 H*W*3.

    16-bit values map to round(v/257) (exact for 257·k); gray and alpha are then
    handled as ``distort`` handles them (alpha composited over white).
    """
    if raw.dtype == np.uint16:
        raw = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return as_rgb_uint8(raw)


def resize_cover(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover W×H keeping the aspect ratio, then centre-crop (no geometric distortion)."""
    w, h = size
    ih, iw = img.shape[:2]
    scale = max(w / iw, h / ih)
    sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
    pil = Image.fromarray(img).resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - w) // 2, (sh - h) // 2
    return np.asarray(pil.crop((left, top, left + w, top + h)))


def load_reference(path: str, resize: tuple[int, int] | None = None,
                   min_size: int = 1) -> np.ndarray:
    """Decode one reference to upright uint8 H*W*3 RGB, or raise ReferenceSkipped(reason)."""
    try:
        if os.path.getsize(path) == 0:
            raise ReferenceSkipped("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                high_depth = _is_16_bit(im)  # before getexif(), which may load the pixels
                orientation = im.getexif().get(0x0112, 1)
                raw = _decode_16_bit(path, im) if high_depth else _decode_8_bit(im)
    except ReferenceSkipped:
        raise
    except FileNotFoundError:
        raise ReferenceSkipped("file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ReferenceSkipped(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ReferenceSkipped("not an image (unrecognised format)") from None
    except Exception as exc:  # truncated or corrupt data: any decoder error means "skip it"
        raise ReferenceSkipped(f"cannot decode: {type(exc).__name__}: {exc}") from None
    img = to_rgb8(_ORIENT.get(orientation, lambda a: a)(raw))
    if resize is not None:
        img = resize_cover(img, resize)
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise ReferenceSkipped(f"too small: {w}x{h} px, the selected distortions need at "
                               f"least {min_size}x{min_size}")
    return img
