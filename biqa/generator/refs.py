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
    """References: ``ids[i]`` names the file ``paths[i]`` (``rel[i]`` as listed), which must
    resolve inside ``roots[i]`` (None: anywhere, for files named directly).  Sorted by id,
    except a walk's table, which keeps list order.  ``types[i]``, where the list names them
    (a second column), are the types to make of reference ``i``, by id.

    Ids are what sample keys and seeds are built from, so they depend only on
    the file names as listed, never on list positions or the machine.
    """

    ids: tuple[str, ...]
    paths: tuple[str, ...]
    rel: tuple[str, ...]
    roots: tuple[str | None, ...]
    types: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def digest(self) -> str:
        """sha256 over (id, listed name[, listed types]): identifies the reference set (and
        its groups) for resume checks."""
        h = hashlib.sha256()
        for i, (ref_id, rel) in enumerate(zip(self.ids, self.rel)):
            listed = "" if self.types is None else "\t" + ",".join(map(str, self.types[i]))
            h.update(f"{ref_id}\t{rel}{listed}\n".encode())
        return h.hexdigest()


def sanitise_stem(stem: str) -> str:
    """ASCII letters, digits, ``_`` and ``-`` only: no dots, slashes or spaces can reach a key."""
    ascii_stem = stem if stem.isascii() else \
        unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
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


def _read_list(list_file: Path) -> list[tuple[str, str | None, int]]:
    """(name, second column or None, line number) of each row of a .csv (or a tab-separated
    .txt); a first row that names no image file is a header (KADIS-700k's lists have one)."""
    with open(list_file, newline="", encoding="utf-8-sig") as f:
        if list_file.suffix.lower() == ".csv":
            reader = csv.reader(f)
            rows = [(row, reader.line_num) for row in reader]
        else:
            rows = [(line.rstrip("\r\n").split("\t"), n) for n, line in enumerate(f, 1)]
    named = [(fields[0].strip(), fields[1].strip() if len(fields) > 1 else None, n)
             for fields, n in rows if fields and fields[0].strip()]
    if named and posixpath.splitext(named[0][0])[1].lower() not in IMAGE_EXTENSIONS:
        named = named[1:]
    return named


def _list_folder(folder: Path) -> list[str]:
    """Image files under ``folder`` as posix paths relative to it, in name order (string
    ops: fast for 10^6)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        found.extend(prefix + f for f in sorted(filenames)
                     if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return found


def _glob_root(pattern: str) -> Path:
    """The folder before the first wildcard: listed names are relative to it."""
    parts = Path(pattern).parts
    first_magic = next((i for i, p in enumerate(parts) if _GLOB_MAGIC.search(p)), len(parts))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


class _ListedTypes:
    """Reads a list's type column (an id or a name per row) and refuses, naming the row,
    one that is empty, unknown or not among the run's types."""

    def __init__(self, allowed: tuple[int, ...], what: str):
        self.allowed, self.what = set(allowed), what
        self._known: dict[str, int] = {}

    def __call__(self, text: str | None, where: str) -> int:
        if text in self._known:
            return self._known[text]
        if not text:
            raise ValueError(f"{where}: no distortion type in the second column ({self.what} "
                             "reads one type per row)")
        from biqa.distortions import get
        try:
            type_id = get(text).id
        except ValueError:
            raise ValueError(f"{where}: {text!r} in the second column is not a distortion type "
                             "(an id such as 7 or a name)") from None
        if type_id not in self.allowed:
            raise ValueError(f"{where}: type {type_id} ({get(type_id).name}) is not among the "
                             f"selected distortions ({', '.join(map(str, sorted(self.allowed)))});"
                             " add it to --distortions or fix the list")
        self._known[text] = type_id
        return type_id


Entry = tuple[str, str, str | None, int | None]  # listed name, path, root, listed type


def _entries(source: str, refs_root: str | None, outside_root: bool,
             listed_types: _ListedTypes | None = None) -> list[Entry]:
    """(listed name, path, root it must stay in, listed type) of each file of one ``--refs``
    value, in list order (folders and globs: in name order)."""
    path = Path(source)
    is_list = path.suffix.lower() in LIST_EXTENSIONS and path.is_file()
    if listed_types is not None and not is_list:
        raise ValueError(f"--refs {source}: {listed_types.what} reads each reference's type "
                         "from the second column of a .csv/.txt list; this is not one")
    if path.is_dir():
        return [(rel, str(path / rel), None, None) for rel in _list_folder(path)]
    if is_list:
        root = os.path.abspath(refs_root or str(path.parent))
        entries = [(n.replace("\\", "/"), os.path.join(root, n), root,
                    None if listed_types is None
                    else listed_types(column, f"{source} line {line} ({n})"))
                   for n, column, line in _read_list(path)]
        if outside_root:
            return [(rel, p, None, t) for rel, p, _, t in entries]
        _refuse_escapes(source, refs_root, root, entries)
        return entries
    if _GLOB_MAGIC.search(source):
        root = _glob_root(source)
        return [(Path(p).relative_to(root).as_posix(), p, None, None)
                for p in sorted(glob.glob(source, recursive=True)) if Path(p).is_file()]
    if path.is_file():
        return [(path.name, str(path), None, None)]
    raise ValueError(f"--refs {source!r}: no such folder, list file (.csv/.txt), glob match "
                     "or image file")


def _refuse_escapes(source: str, refs_root: str | None, root: str,
                    entries: list[Entry]) -> None:
    """ValueError naming the list entries that lead outside ``root`` (absolute names, ``..``)."""
    inside = os.path.join(root, "")  # root with one trailing separator
    escaping = [e[0] for e in entries
                if not (path := os.path.normpath(e[1])).startswith(inside) and path != root]
    if escaping:
        where = f"--refs-root {refs_root}" if refs_root else f"the list's folder {root}"
        shown = ", ".join(repr(e) for e in escaping[:5])
        more = f" and {len(escaping) - 5} more" if len(escaping) > 5 else ""
        raise ValueError(f"--refs {source}: {len(escaping)} entries lead outside {where}: "
                         f"{shown}{more}. Fix the list, or pass --allow-refs-outside-root "
                         "to read them anyway.")


def _collect(sources, refs_root: str | None, outside_root: bool,
             listed_types: _ListedTypes | None = None
             ) -> tuple[list[tuple[str, str, str | None]], list[set[int]] | None]:
    """(listed name, absolute path, root) of every file, each once, in the order given, and
    with ``listed_types`` the set of types its rows name."""
    entries: list[tuple[str, str, str | None]] = []
    types: list[set[int]] = []
    position: dict[str, int] = {}
    for source in sources:
        for rel, path, root, type_id in _entries(source, refs_root, outside_root, listed_types):
            absolute = os.path.abspath(path)
            if absolute not in position:
                position[absolute] = len(entries)
                entries.append((rel, absolute, root))
                types.append(set())
            if type_id is not None:  # a (reference, type) listed twice is made once
                types[position[absolute]].add(type_id)
    if not entries:
        raise ValueError(f"--refs {' '.join(sources)}: no image files found")
    return entries, types if listed_types is not None else None


def _table(entries, ids: list[str], types: list[set[int]] | None, order) -> RefTable:
    return RefTable(ids=tuple(ids[i] for i in order),
                    paths=tuple(entries[i][1] for i in order),
                    rel=tuple(entries[i][0] for i in order),
                    roots=tuple(entries[i][2] for i in order),
                    types=None if types is None else tuple(tuple(sorted(types[i]))
                                                           for i in order))


def _by_id(ids: list[str]) -> list[int]:
    """Table order: by ``id + "_"``, so that samples written in table order are also in
    byte order of their keys ``<id>_<TT>_<LL>``."""
    return sorted(range(len(ids)), key=lambda i: ids[i] + "_")


def resolve_refs(sources: list[str] | tuple[str, ...] | None,
                 refs_root: str | None = None, outside_root: bool = False,
                 listed_types: tuple[int, ...] | None = None,
                 recipe: str = "--recipe kadis700k") -> RefTable:
    """Resolve ``--refs`` values (default: the bundled sample images) into a RefTable
    sorted by id.

    List entries that lead outside their root are refused (ValueError naming them)
    unless ``outside_root``.  With ``listed_types`` (the run's types) every value must be
    a list whose second column names each row's type, one of those (``recipe`` names the
    option that asks for it in errors).
    """
    if not sources:
        from biqa.data import SAMPLE_REFS_DIR
        sources = [str(SAMPLE_REFS_DIR)]
    reader = None if listed_types is None else _ListedTypes(listed_types, recipe)
    entries, types = _collect(sources, refs_root, outside_root, reader)
    ids = assign_ids([rel for rel, _, _ in entries])
    return _table(entries, ids, types, _by_id(ids))


def resolve_refs_and_walk(sources, walk_sources, refs_root: str | None = None,
                          outside_root: bool = False) -> tuple[RefTable, RefTable]:
    """The references (sorted by id) and a walk's references (in list order) with ids
    assigned over both, so that a file in both lists has one id, and two files never
    share one."""
    if not sources:
        from biqa.data import SAMPLE_REFS_DIR
        sources = [str(SAMPLE_REFS_DIR)]
    entries, _ = _collect(sources, refs_root, outside_root)
    walk, _ = _collect(walk_sources, refs_root, outside_root)
    known = {path for _, path, _ in entries}
    union = entries + [e for e in walk if e[1] not in known]
    id_of = dict(zip((path for _, path, _ in union), assign_ids([rel for rel, _, _ in union])))
    ids, walk_ids = [id_of[p] for _, p, _ in entries], [id_of[p] for _, p, _ in walk]
    return (_table(entries, ids, None, _by_id(ids)),
            _table(walk, walk_ids, None, range(len(walk))))


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
