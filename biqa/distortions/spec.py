"""The record that describes one distortion type, shared by the registry and its modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


class DistortionNotApplicable(Exception):
    """The distortion has no valid output for this image at this level.

    Raised, for example, when the chromatic-aberration search finds no candidate
    for a level: the original generator drops such images, so callers record the
    outcome instead of treating it as a bug.
    """


@dataclass(frozen=True)
class DistortionSpec:
    """One distortion type.

    ``fn`` does the pixel work.  A type that draws random values (or chooses
    something per image) has a ``sample(img, param, rng) -> dict`` that makes
    every draw, and ``fn(img, param, **draws)`` is then deterministic, so a
    sample can be explained and replayed from its draws; otherwise it is
    ``fn(img, param, rng)``.  ``apply`` composes the two.

    With ``kadid_stretch`` (types 1-25) the image is min-max stretched first and
    the output stretched again before the 8-bit conversion, exactly as the KADID
    entry point does; ``pixels`` says what ``fn`` sees then (see
    ``biqa.distortions.api``): "float" (the stretched float image; returns
    float), "levels" (the uint8 image; ``fn`` only moves values, so the stretch
    becomes a lookup table), "pointwise" (an elementwise ``fn``: evaluated on the
    256 levels only) or "uint8" (the 8-bit conversion of the stretched image;
    returns uint8 read as value/255, as the KADID codecs do).  ``fn`` may also
    return ``(image, paints)``: values written after the pixel work, a list of
    (index, value) with ``image[index] = value``.  Without the stretch (types
    26+) ``fn`` receives and returns uint8 H*W*3.
    """

    id: int
    name: str
    family: str  # "kadid", "vipnet" or "codec"
    params: tuple[Any, ...]  # the five level parameters, mildest first
    stochastic: bool
    fn: Callable
    kadid_stretch: bool = True
    # float32 is plenty for pixel work; a type that quantises its input to 8 bits
    # first (the KADID codecs) needs the stretch in double, as MATLAB has it, or
    # values on exact .5 ties round the wrong way.
    input_dtype: str = "float32"
    min_size: int = 64  # smallest height and width the type supports
    description: str = ""
    pixels: str = "float"
    sample: Callable | None = None
    # draws -> JSON-able summary, where the generic one (``api.record_draws``:
    # small arrays in full, large ones as shape/mean/sd/min/max) explains less.
    summarize: Callable | None = None

    def apply(self, img, param, rng):
        """The pixel work with its draws, on an image already in ``fn``'s domain."""
        if self.sample is None:
            return self.fn(img, param, rng)
        return self.fn(img, param, **self.sample(img, param, rng))

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "family": self.family,
            "params": list(self.params),
            "stochastic": self.stochastic,
            "min_size": self.min_size,
            "description": self.description,
        }
