"""Reference images: resolve ``--refs`` into a sorted table of ids and paths, and load one.

Resolution only lists names (no decoding, no ``stat`` of list entries), so a
700 000-line list is planned in seconds; every file is opened and validated
later, inside the worker that distorts it, and a bad one is skipped with a
reason instead of failing the job.  List entries must stay inside their root
folder: lexically at planning (``..``, absolute names), through symlinks in the
worker (``realpath`` needs a ``stat`` per file, which planning avoids).
"""

from __future__ import annotations

import csv
import functools
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
from biqa.shards.writer import file_digest

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp",
                              ".gif", ".ppm", ".pgm", ".pnm", ".jp2", ".j2k"})
LIST_EXTENSIONS = frozenset({".csv", ".txt"})
MAX_ID_LENGTH = 64  # keeps tar member names inside ustar's 100 characters
# An 88-MP reference takes ~4.5 GB to distort one sample; 50 MP stays near 2.5 GB.
DEFAULT_MAX_PIXELS = 50_000_000
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_GLOB_MAGIC = re.compile(r"[*?[]")


class ReferenceSkipped(Exception):
    """A reference that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class RefTable:
    """References sorted by id: ``ids[i]`` names the file ``paths[i]`` (``rel[i]`` as listed),
    which must resolve inside ``roots[i]`` (None: anywhere, for files named directly).

    Ids are what sample keys and seeds are built from, so they depend only on
    the file names as listed, never on list positions or the machine.
    """

    ids: tuple[str, ...]
    paths: tuple[str, ...]
    rel: tuple[str, ...]
    roots: tuple[str | None, ...]

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


def _entries(source: str, refs_root: str | None,
             outside_root: bool) -> list[tuple[str, str, str | None]]:
    """(listed name, path, root it must stay in) of each file of one ``--refs`` value."""
    path = Path(source)
    if path.is_dir():
        return [(rel, str(path / rel), None) for rel in _list_folder(path)]
    if path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
        root = os.path.abspath(refs_root or str(path.parent))
        entries = [(n.replace("\\", "/"), os.path.join(root, n), root) for n in _read_list(path)]
        if outside_root:
            return [(rel, p, None) for rel, p, _ in entries]
        _refuse_escapes(source, refs_root, root, entries)
        return entries
    if _GLOB_MAGIC.search(source):
        root = _glob_root(source)
        return [(Path(p).relative_to(root).as_posix(), p, None)
                for p in glob.glob(source, recursive=True) if Path(p).is_file()]
    if path.is_file():
        return [(path.name, str(path), None)]
    raise ValueError(f"--refs {source!r}: no such folder, list file (.csv/.txt), glob match "
                     "or image file")


def _refuse_escapes(source: str, refs_root: str | None, root: str,
                    entries: list[tuple[str, str, str | None]]) -> None:
    """ValueError naming the list entries that lead outside ``root`` (absolute names, ``..``)."""
    escaping = [rel for rel, p, _ in entries
                if os.path.commonpath([root, os.path.normpath(p)]) != root]
    if escaping:
        where = f"--refs-root {refs_root}" if refs_root else f"the list's folder {root}"
        shown = ", ".join(repr(e) for e in escaping[:5])
        more = f" and {len(escaping) - 5} more" if len(escaping) > 5 else ""
        raise ValueError(f"--refs {source}: {len(escaping)} entries lead outside {where}: "
                         f"{shown}{more}. Fix the list, or pass --allow-refs-outside-root "
                         "to read them anyway.")


def resolve_refs(sources: list[str] | tuple[str, ...] | None,
                 refs_root: str | None = None, outside_root: bool = False) -> RefTable:
    """Resolve ``--refs`` values (default: the bundled sample images) into a RefTable.

    The table is sorted by ``id + "_"`` so that samples written in table order
    are also in byte order of their keys ``<id>_<TT>_<LL>``.  List entries that
    lead outside their root are refused (ValueError naming them) unless
    ``outside_root``.
    """
    if not sources:
        from biqa.data import SAMPLE_REFS_DIR
        sources = [str(SAMPLE_REFS_DIR)]
    entries: list[tuple[str, str, str | None]] = []
    seen_paths: set[str] = set()
    for source in sources:
        for rel, path, root in _entries(source, refs_root, outside_root):
            absolute = os.path.abspath(path)
            if absolute not in seen_paths:
                seen_paths.add(absolute)
                entries.append((rel, absolute, root))
    if not entries:
        raise ValueError(f"--refs {' '.join(sources)}: no image files found")
    ids = assign_ids([rel for rel, _, _ in entries])
    order = sorted(range(len(ids)), key=lambda i: ids[i] + "_")
    return RefTable(ids=tuple(ids[i] for i in order),
                    paths=tuple(entries[i][1] for i in order),
                    rel=tuple(entries[i][0] for i in order),
                    roots=tuple(entries[i][2] for i in order))


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


def cover_size(iw: int, ih: int, size: tuple[int, int]) -> tuple[int, int]:
    """The size an iw×ih image is scaled to so that it covers W×H with its aspect ratio kept."""
    w, h = size
    scale = max(w / iw, h / ih)
    return max(w, round(iw * scale)), max(h, round(ih * scale))


def resize_cover(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale to cover W×H keeping the aspect ratio, then centre-crop (no geometric distortion)."""
    w, h = size
    sw, sh = cover_size(img.shape[1], img.shape[0], size)
    pil = Image.fromarray(img).resize((sw, sh), Image.Resampling.LANCZOS)
    left, top = (sw - w) // 2, (sh - h) // 2
    return np.asarray(pil.crop((left, top, left + w, top + h)))


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def resolves_outside(path: str, root: str) -> bool:
    """Whether ``path`` leads outside the folder ``root`` once ``..`` and symlinks are resolved."""
    real_root = _real_root(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root


def reference_digest(path: str) -> str | None:
    """sha256 of the file's bytes (what resume compares), or None if it cannot be read."""
    try:
        return file_digest(path)[1]
    except OSError:
        return None


def _check_size(w: int, h: int, resize, min_size: int, max_pixels: int,
                allow_upscale: bool) -> None:
    """Refuse, from the header alone, what is too big to decode or too small to use."""
    if max_pixels and w * h > max_pixels:
        raise ReferenceSkipped(f"too large: {w}x{h} px = {w * h / 1e6:.1f} MP, more than "
                               f"--max-pixels {max_pixels}")
    if min(w, h) < min_size and not (resize and allow_upscale):
        hint = "; --resize upscales it only with --allow-upscale" if resize else ""
        raise ReferenceSkipped(f"too small: {w}x{h} px, the selected distortions need at "
                               f"least {min_size}x{min_size}{hint}")


def load_reference(path: str, resize: tuple[int, int] | None = None, min_size: int = 1,
                   max_pixels: int = DEFAULT_MAX_PIXELS, allow_upscale: bool = False,
                   root: str | None = None) -> np.ndarray:
    """Decode one reference to upright uint8 H*W*3 RGB, or raise ReferenceSkipped(reason).

    Sizes are checked from the header, before any pixel is decoded: more than
    ``max_pixels`` (0: no limit; Pillow's decompression-bomb limit still applies)
    or a side below ``min_size`` -- unless ``resize`` and ``allow_upscale`` --
    is skipped.  With ``root``, a file that resolves outside it is skipped.
    """
    if root is not None and resolves_outside(path, root):
        raise ReferenceSkipped(f"resolves outside {root} through a symlink "
                               "(--allow-refs-outside-root reads it)")
    try:
        if os.path.getsize(path) == 0:
            raise ReferenceSkipped("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(*im.size, resize, min_size, max_pixels, allow_upscale)
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
    if resize is None:
        return img
    sw, sh = cover_size(img.shape[1], img.shape[0], resize)
    if max_pixels and sw * sh > max_pixels:  # an extreme aspect ratio
        raise ReferenceSkipped(f"--resize {resize[0]}x{resize[1]} would first scale this "
                               f"{img.shape[1]}x{img.shape[0]} px image to {sw}x{sh} px, more "
                               f"than --max-pixels {max_pixels}")
    return resize_cover(img, resize)
