"""Shared fixtures.  The reference outputs of the original generator are found
through one place: ``$BIQA_REFERENCE``, else ``../shared/reference`` beside the
checkout.  Where neither exists (a user's clone) the tests that need them skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from biqa.fidelity import Reference

REPO = Path(__file__).resolve().parents[1]


def _reference_root() -> Path | None:
    env = os.environ.get("BIQA_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "reference")
    for c in candidates:
        if (c / "stats.csv").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def reference() -> Reference:
    root = _reference_root()
    if root is None:
        pytest.skip("reference outputs not found: set $BIQA_REFERENCE or place them in "
                    "../shared/reference")
    return Reference(root)
