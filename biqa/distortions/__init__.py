"""Distortion types of KADID-10k / KADIS-700k, VIPNet's extras and a codec family.

>>> from biqa.distortions import distort, registry
>>> out = distort(image, "gaussian_blur", 3, rng=0)
"""

from .api import distort
from .registry import get, registry, resolve_distortions
from .spec import DistortionNotApplicable, DistortionSpec

__all__ = ["distort", "registry", "get", "resolve_distortions", "DistortionSpec",
           "DistortionNotApplicable"]
