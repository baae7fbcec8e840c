"""The one table of distortion types: id -> name -> function -> five level parameters.

The level parameters are the datasets' identity (KADID-10k, KADIS-700k, VIPNet);
they are copied here literally from the original generators.
"""

from __future__ import annotations

from . import blur, color, compression, denoise, extras, noise, quantize, spatial, tone
from .spec import DistortionSpec

_K = "kadid"
_V = "vipnet"

_TABLE: tuple[DistortionSpec, ...] = (
    DistortionSpec(1, "gaussian_blur", _K, (0.1, 0.5, 1, 2, 5), False, blur.gaussian_blur),
    DistortionSpec(2, "lens_blur", _K, (1, 2, 4, 6, 8), False, blur.lens_blur),
    DistortionSpec(3, "motion_blur", _K, (1, 2, 4, 6, 10), True, blur.motion_blur_at,
                   sample=blur.sample_motion),
    DistortionSpec(4, "color_diffusion", _K, (1, 3, 6, 8, 12), False, color.color_diffusion),
    DistortionSpec(5, "color_shift", _K, (1, 3, 6, 8, 12), True, color.color_shift,
                   sample=color.sample_color_shift),
    DistortionSpec(6, "color_quantization", _K, (64, 48, 32, 16, 8), False,
                   quantize.color_quantization),
    DistortionSpec(7, "color_saturation_hsv", _K, (0.4, 0.2, 0.1, 0, -0.4), False,
                   color.color_saturation_hsv),
    DistortionSpec(8, "color_saturation_lab", _K, (1, 2, 3, 6, 9), False,
                   color.color_saturation_lab),
    DistortionSpec(9, "jpeg2000", _K, (16, 32, 45, 120, 400), False, compression.jpeg2000,
                   input_dtype="float64", pixels="uint8"),
    DistortionSpec(10, "jpeg", _K, (43, 36, 24, 7, 4), False, compression.jpeg,
                   input_dtype="float64", pixels="uint8"),
    DistortionSpec(11, "white_noise", _K, (0.001, 0.002, 0.003, 0.005, 0.01), True,
                   noise.white_noise, sample=noise.sample_gaussian),
    DistortionSpec(12, "white_noise_color", _K, (0.0001, 0.0005, 0.001, 0.002, 0.003), True,
                   noise.white_noise_color, sample=noise.sample_gaussian),
    DistortionSpec(13, "impulse_noise", _K, (0.001, 0.005, 0.01, 0.02, 0.03), True,
                   noise.impulse_noise, pixels="levels", sample=noise.sample_impulse,
                   summarize=noise.summarize_impulse),
    DistortionSpec(14, "multiplicative_noise", _K, (0.001, 0.005, 0.01, 0.02, 0.05), True,
                   noise.multiplicative_noise, sample=noise.sample_speckle),
    DistortionSpec(15, "denoise", _K, (0.01, 0.03, 0.05, 0.1, 0.15), True, denoise.denoise,
                   sample=noise.sample_gaussian),
    DistortionSpec(16, "brighten", _K, (0.1, 0.2, 0.4, 0.7, 1.1), False, tone.brighten),
    DistortionSpec(17, "darken", _K, (0.05, 0.1, 0.2, 0.4, 0.8), False, tone.darken,
                   pixels="pointwise"),
    DistortionSpec(18, "mean_shift", _K, (0.15, 0.08, 0, -0.08, -0.15), False, tone.mean_shift,
                   pixels="pointwise"),
    DistortionSpec(19, "jitter", _K, (0.05, 0.1, 0.2, 0.5, 1), True, spatial.jitter,
                   sample=spatial.sample_jitter),
    DistortionSpec(20, "non_eccentricity_patch", _K, (20, 40, 60, 80, 100), True,
                   spatial.non_eccentricity_patch, pixels="levels",
                   sample=spatial.sample_patches),
    DistortionSpec(21, "pixelate", _K, (0.01, 0.05, 0.1, 0.2, 0.5), False, spatial.pixelate,
                   pixels="levels"),
    DistortionSpec(22, "quantization", _K, (20, 16, 13, 10, 7), False, quantize.quantization),
    DistortionSpec(23, "color_block", _K, (2, 4, 6, 8, 10), True, spatial.color_block,
                   pixels="levels", sample=spatial.sample_blocks),
    DistortionSpec(24, "high_sharpen", _K, (1, 2, 3, 6, 12), False, blur.high_sharpen),
    DistortionSpec(25, "contrast_change", _K, (0.3, 0.15, 0, -0.4, -0.6), False,
                   tone.contrast_change, pixels="pointwise"),
    DistortionSpec(26, "pink_noise", _V, (0.061, 0.127, 0.211, 0.316, 0.543), True,
                   extras.pink_noise, kadid_stretch=False, sample=extras.sample_pink),
    DistortionSpec(27, "chromatic_aberration", _V, (33, 30, 27, 24, 21), False,
                   extras.chromatic_aberration, kadid_stretch=False, sample=extras.sample_ca),
    DistortionSpec(28, "overexposure", _V, (2, 6, 9, 12, 17), False, extras.overexposure,
                   kadid_stretch=False),
    DistortionSpec(29, "underexposure", _V, (2, 6, 9, 12, 17), False, extras.underexposure,
                   kadid_stretch=False),
) + tuple(compression.CODEC_SPECS)

_BY_ID = {s.id: s for s in _TABLE}
_BY_NAME = {s.name: s for s in _TABLE}

# VIPNet's 30th type, "lossy compression", was only ever distributed as files;
# type 30 (the first codec of the family) stands in for it.
VIPNET_CODEC_ID = 30

NAMED_SETS = ("all", "kadid", "vipnet", "codecs")


def registry() -> list[DistortionSpec]:
    """Every distortion type, ordered by id."""
    return list(_TABLE)


def get(kind: int | str) -> DistortionSpec:
    """Look a type up by id (int or digit string) or by name."""
    if isinstance(kind, str) and kind.strip().isdigit():
        kind = int(kind)
    if isinstance(kind, (int,)) and not isinstance(kind, bool):
        if kind in _BY_ID:
            return _BY_ID[kind]
        raise ValueError(f"unknown distortion id {kind}; valid ids are "
                         f"{min(_BY_ID)}..{max(_BY_ID)}")
    if isinstance(kind, str):
        key = kind.strip().lower()
        if key in _BY_NAME:
            return _BY_NAME[key]
        raise ValueError(f"unknown distortion name {kind!r}; known names: "
                         + ", ".join(sorted(_BY_NAME)))
    raise ValueError(f"distortion kind must be an int id or a name, not {type(kind).__name__}")


def resolve_distortions(spec: str) -> list[DistortionSpec]:
    """Parse a ``--distortions`` value: a named set or a comma list of ids/names.

    The order is the order given (named sets: by id); duplicates are refused
    because they would silently double a class.
    """
    chosen: list[DistortionSpec] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        low = part.lower()
        if low == "all":
            chosen.extend(_TABLE)
        elif low == "kadid":
            chosen.extend(s for s in _TABLE if s.family == "kadid")
        elif low == "vipnet":
            chosen.extend(s for s in _TABLE if s.family in ("kadid", "vipnet"))
            chosen.append(_BY_ID[VIPNET_CODEC_ID])
        elif low == "codecs":
            chosen.extend(s for s in _TABLE if s.family == "codec")
        elif "-" in low and all(x.strip().isdigit() for x in low.split("-", 1)):
            a, b = (int(x) for x in low.split("-", 1))
            chosen.extend(get(i) for i in range(a, b + 1))
        else:
            chosen.append(get(part))
    if not chosen:
        raise ValueError("no distortion selected")
    ids = [s.id for s in chosen]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"distortion types selected twice: {dup}")
    return chosen
