"""Agreement of biqa's distortions with outputs of the original MATLAB generator.

Used by the tests (which enforce the bounds) and by ``benchmarks/fidelity.py``
(which writes ``docs/fidelity.md``), so both judge with one computation.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


class Reference:
    """Read access to the reference outputs: images, per-output stats, CA picks."""

    def __init__(self, root: Path):
        self.root = root
        with open(root / "stats.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.refs = sorted(p.stem for p in (root / "refs").glob("ref*.png"))

    def image(self, ref: str) -> np.ndarray:
        return np.asarray(Image.open(self.root / "refs" / f"{ref}.png").convert("RGB"))

    def output(self, ref: str, type_id: int, level: int) -> np.ndarray | None:
        p = self.root / "out" / ref / f"{type_id:02d}_{level:02d}.png"
        return np.asarray(Image.open(p).convert("RGB")) if p.is_file() else None

    def stats(self, ref: str, type_id: int, level: int) -> dict | None:
        n = str(int(ref[3:]))
        for r in self.rows:
            if r["ref"] == n and r["type"] == str(type_id) and r["level"] == str(level):
                return r
        return None


