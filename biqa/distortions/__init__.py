"""Distortion types of KADID-10k / KADIS-700k, VIPNet's extras and a codec family.

>>> from biqa.distortions import distort, distort_with_draws, registry
>>> out = distort(image, "gaussian_blur", 3, rng=0)
>>> out, draws = distort_with_draws(image, "motion_blur", 3, rng=0)  # {"angle": ...}
"""

from .api import distort, distort_with_draws
from .registry import get, registry, resolve_distortions
from .spec import DistortionNotApplicable, DistortionSpec

__all__ = ["distort", "distort_with_draws", "registry", "get", "resolve_distortions",
           "DistortionSpec", "DistortionNotApplicable"]
