"""The contact sheet: one reference through every selected type × level, in a labelled grid.

Rows are types (id and name), columns levels; each thumbnail carries the level
parameter and its PSNR to the reference.  Samples use the dataset's seeds, so
the sheet shows exactly what ``biqa-gen`` writes for that reference.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from biqa.distortions import DistortionNotApplicable, get
from biqa.distortions._matlab import psnr
from biqa.distortions.api import apply_spec
from biqa.shards.writer import atomic_write_bytes

from .plan import Plan
from .refs import load_reference
from .seeding import sample_rng

LABEL_WIDTH = 190
HEADER_HEIGHT = 22
CAPTION_HEIGHT = 14
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (200, 200, 200)


def _thumbnail(img: np.ndarray, width: int) -> Image.Image:
    h, w = img.shape[:2]
    return Image.fromarray(img).resize((width, max(1, round(h * width / w))),
                                       Image.Resampling.LANCZOS)


def _view(img: np.ndarray, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """What a cell shows: the whole image, or the ``crop`` box (left, top, width, height),
    which at ``thumb_width`` equal to its width shows pixels 1:1 (noise, blocking)."""
    if crop is None:
        return img
    left, top, width, height = crop
    if left < 0 or top < 0 or width < 1 or height < 1 or left + width > img.shape[1] \
            or top + height > img.shape[0]:
        raise ValueError(f"crop {crop} (left, top, width, height) is not inside the "
                         f"{img.shape[1]}x{img.shape[0]} image")
    return np.ascontiguousarray(img[top:top + height, left:left + width])


def _cell(img: np.ndarray, ref_id: str, type_id: int, level: int, seed: int):
    """(distorted image or None, caption) for one grid cell."""
    spec = get(type_id)
    try:
        out = apply_spec(spec, img, level, sample_rng(seed, ref_id, type_id, level))
    except DistortionNotApplicable:
        return None, "not applicable"
    except Exception as exc:  # a broken type must not hide the others on the sheet
        return None, f"failed: {type(exc).__name__}"
    return out, f"{spec.params[level - 1]}  {psnr(img, out):.1f} dB"


def render_contact_sheet(img: np.ndarray, ref_id: str, type_ids, levels=(1, 2, 3, 4, 5),
                         seed: int = 0, thumb_width: int = 192,
                         crop: tuple[int, int, int, int] | None = None
                         ) -> tuple[Image.Image, list[str]]:
    """The grid for an RGB uint8 reference; returns (sheet, list of cells that failed).
    Captions are about the whole image even when ``crop`` shows a part of it."""
    shown = _view(img, crop)
    thumb_h = max(1, round(shown.shape[0] * thumb_width / shown.shape[1]))
    row_h = thumb_h + CAPTION_HEIGHT
    sheet = Image.new("RGB", (LABEL_WIDTH + len(levels) * thumb_width,
                              HEADER_HEIGHT + (len(type_ids) + 1) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 4), f"reference: {ref_id}", fill=(0, 0, 0), font=font)
    for c, level in enumerate(levels):
        draw.text((LABEL_WIDTH + c * thumb_width + 4, 4), f"level {level}", fill=(0, 0, 0),
                  font=font)
    shown_label = "reference" if crop is None else f"reference ({crop[2]}x{crop[3]} crop)"
    rows = [(None, shown_label)] + [(t, f"{t:2d} {get(t).name}") for t in type_ids]
    failures = []
    for r, (type_id, label) in enumerate(rows):
        y = HEADER_HEIGHT + r * row_h
        draw.text((4, y + thumb_h // 2), label, fill=(0, 0, 0), font=font)
        for c, level in enumerate(levels):
            x = LABEL_WIDTH + c * thumb_width
            if type_id is None:
                if c == 0:
                    sheet.paste(_thumbnail(shown, thumb_width), (x, y))
                continue
            out, caption = _cell(img, ref_id, type_id, level, seed)
            if out is None:
                draw.rectangle((x, y, x + thumb_width - 1, y + thumb_h - 1), fill=EMPTY_CELL)
                if caption.startswith("failed"):
                    failures.append(f"type {type_id} level {level}: {caption}")
            else:
                sheet.paste(_thumbnail(_view(out, crop), thumb_width), (x, y))
            draw.text((x + 2, y + thumb_h), caption, fill=(0, 0, 0), font=font)
    return sheet, failures


def write_contact_sheet(out_png: str, plan: Plan, thumb_width: int = 192,
                        crop: tuple[int, int, int, int] | None = None) -> list[str]:
    """Render the sheet for the plan's first reference into ``out_png``; returns failed
    cells.  The reference is loaded as the job would load it (same size checks)."""
    s = plan.settings
    img = load_reference(plan.refs.paths[0], s.resize, s.min_size, s.max_pixels,
                         s.allow_upscale, plan.refs.roots[0])
    sheet, failures = render_contact_sheet(img, plan.refs.ids[0], s.type_ids, s.levels, s.seed,
                                           thumb_width, crop)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out_png, buf.getvalue())
    return failures
