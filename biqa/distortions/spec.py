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

    ``fn(img, param, rng)`` does the pixel work.  With ``kadid_stretch`` (types
    1-25) it receives a float32 H*W*3 image in [0,1] that has been min-max
    stretched, and returns a float image that is stretched again before the 8-bit
    conversion, exactly as the KADID entry point does.  Without it (types 26+)
    it receives and returns uint8 H*W*3.
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
