"""Sample reference images shipped with biqa (scikit-image's data, public domain or CC0;
see docs/sample_refs.md), resized to cover 512x384 and centre-cropped."""

from __future__ import annotations

from pathlib import Path

SAMPLE_REFS_DIR = Path(__file__).resolve().parent / "refs"


def sample_reference_paths() -> list[Path]:
    """The bundled reference images, sorted by name."""
    return sorted(SAMPLE_REFS_DIR.glob("*.png"))
