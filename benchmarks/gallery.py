"""Regenerate docs/gallery.png and docs/distortions.md: every distortion type at every level.

    python benchmarks/gallery.py [--out-dir docs] [--distortions all]

``gallery.png`` is biqa-gen's contact sheet (``biqa.generator.preview``) of the
bundled reference ``astronaut``: each cell shows the same box of the face
(``GALLERY_CROP``) at 1:1, where a thumbnail of the whole image would hide noise,
blocking and dithering; the caption is the level's parameter and the PSNR of the whole image.
Seeds are the dataset's (global seed 0), so a rerun writes the same bytes with the
same library versions.

``distortions.md`` is one section per type, from the registry (id, name, level
parameters) and the notes below, with the mean PSNR per level over the seven
bundled references.  The run fails if the levels whose output equals its input
are not exactly ``IDENTITY_LEVELS``, the ones the page documents.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biqa.distortions import DistortionNotApplicable, get, resolve_distortions
from biqa.distortions._matlab import psnr
from biqa.distortions.api import apply_spec, run_stretched
from biqa.generator import make_plan
from biqa.generator.preview import write_contact_sheet
from biqa.generator.refs import load_reference, resolve_refs
from biqa.generator.seeding import sample_rng

REPO = Path(__file__).resolve().parents[1]
GALLERY_REF = "astronaut"
GALLERY_CROP = (200, 64, 96, 72)  # (left, top, width, height): the face, at 1:1
SEED = 0  # biqa-gen's default global seed

# (type, level) whose output equals the image the type receives (for types 1-25 the
# min-max stretched reference): checked on every run against what the code does.
IDENTITY_LEVELS = ((1, 1), (3, 1), (8, 1), (18, 3))


@dataclass(frozen=True)
class Note:
    what: str        # what the type does, in plain words
    parameter: str   # what the level parameter is
    remarks: str = ""  # surprises, substitutes, links


_FIDELITY = "[fidelity.md](fidelity.md)"
_CODEC_REMARK = ("No original (VIPNet's 30th type was only distributed as files); the "
                 "five settings are calibrated to mean PSNR targets from 38 dB down, see "
                 "[codecs.md](codecs.md). ")
_FLOOR_REMARK = ("Level 5 is the codec's coarsest setting (quality 0): the codec cannot "
                 "go below its PSNR floor, so its levels end above KADID's 24 dB.")

NOTES: dict[int, Note] = {
    1: Note("Gaussian blur (MATLAB `imgaussfilt`, replicate borders).", "σ (px)",
            "Level 1 (σ = 0.1) is the identity: the kernel's side taps are about e⁻⁵⁰."),
    2: Note("Pillbox (disk) blur, `fspecial('disk', r)`, replicate borders, like an "
            "out-of-focus lens.", "radius r (px)"),
    3: Note("Blur along a line at a random angle (0–180°), MATLAB's anti-aliased "
            "`fspecial('motion')` kernel.", "length (px)",
            "Random: the angle. Level 1 (length 1) is the identity."),
    4: Note("The original's `imcolorblur`: the CIELAB chroma (a*, b*) is blurred with "
            "σ = 1.5a + 2 and then **multiplied by a**.", "a",
            "Not a gentle colour bleed: from level 2 on (a ≥ 3) every colour is pushed to "
            "extreme saturation in its own hue; most photos turn red, orange and magenta "
            "(skin, warm tones) and blues turn electric blue; see the PSNR row. Faithful "
            "to the original (" + _FIDELITY + ")."),
    5: Note("The green channel is shifted by an integer vector of length about a px and "
            "blended in where the image has edges: green/magenta fringes along edges.",
            "shift length a (px)",
            "Random: the direction. Only green moves, and always down and/or right (both "
            "components ≥ 0), as in the original."),
    6: Note("An n-colour image: a minimum-variance palette (Wu) with Floyd–Steinberg "
            "dithering.", "colours n",
            "Substitute: MATLAB's `rgb2ind` could not be run and its internals are not "
            "documented; what stands in and why: "
            "[quantization_denoise.md](quantization_denoise.md)."),
    7: Note("HSV saturation multiplied by f.", "factor f",
            "Level 4 (f = 0) is grey (each pixel becomes max(R, G, B)); level 5 (f = −0.4) "
            "is not a stronger desaturation but a **hue inversion** (complementary colours)."),
    8: Note("CIELAB chroma (a*, b*) multiplied by s: more saturated colours.", "s",
            "Level 1 (s = 1) is a Lab round trip: the identity."),
    9: Note("JPEG 2000 at a fixed compression ratio.", "ratio r (raw : coded)",
            "Substitute: OpenJPEG in place of MATLAB's Kakadu, which Octave cannot drive; "
            "see [codecs.md](codecs.md)."),
    10: Note("Baseline JPEG, IJG quality tables, 4:2:0 chroma.", "quality q",
             "Bit-identical to the original's outputs; see [codecs.md](codecs.md)."),
    11: Note("Gaussian noise N(0, v) added to every R, G, B sample, clipped.",
             "variance v (image in [0, 1])"),
    12: Note("Gaussian noise N(0, v) added to each of Y, Cb and Cr (BT.601), clipped, "
             "converted back: coloured noise.", "variance v"),
    13: Note("Salt and pepper: each R, G, B sample is set to 0 or 1 with probability d, "
             "independently, so most specks are coloured.", "density d"),
    14: Note("Speckle: J = I + n·I with uniform n of variance v (MATLAB's documented "
             "`imnoise('speckle')`): bright areas get the most noise, black none.",
             "variance v"),
    15: Note("White noise of variance v, then denoised: what remains is a denoiser's "
             "residue (smoothed texture, blotches).", "noise variance v",
             "Substitute: non-local means (OpenCV) in place of MATLAB's DnCNN; see "
             "[quantization_denoise.md](quantization_denoise.md)."),
    16: Note("Brightening tone curve through (0.5, 0.5 + a/2), applied to RGB and to L* "
             "and averaged 2 : 1.", "a"),
    17: Note("Darkening tone curve through (0.5, 0.5 − a/2) on RGB.", "a",
             "The original has a Lab branch too, but never takes it (its `dolab` flag is "
             "never set)."),
    18: Note("Adds δ to every sample and clips; the output min–max stretch undoes most of "
             "the shift, so what remains is clipping plus a contrast stretch (lost "
             "highlights for δ > 0, lost shadows for δ < 0).", "δ",
             "Level 3 (δ = 0) is the identity. The levels are signed, not a severity scale: "
             "PSNR rises from level 1 to 3 and falls after it."),
    19: Note("Five rounds of per-pixel random displacements (Gaussian, sd a px), resampled "
             "bicubically: a grainy, smeared look.", "sd a (px)"),
    20: Note("Copies n random 16×16 patches to nearby positions (up to 8 px away in each "
             "direction): small local misplacements.", "patches n"),
    21: Note("Nearest-neighbour downscale by z = 0.95 − s^0.6 and back up: blocky pixels.",
             "s",
             "The mean PSNR barely changes over levels 1–3 (the nearest-neighbour grid "
             "moves rows and columns at every level); the levels differ in block size."),
    22: Note("Multi-level Otsu thresholds over all samples; each sample is set to its "
             "class's upper threshold: posterised tones.", "thresholds N",
             "Substitute: exact Otsu in place of MATLAB's `multithresh` search (missing in "
             "Octave); see [quantization_denoise.md](quantization_denoise.md)."),
    23: Note("Pastes k squares of 32×32 px in random uniform colours at random positions.",
             "blocks k"),
    24: Note("Unsharp mask on L* with radius 3 (MATLAB `imsharpen`): halos and "
             "exaggerated texture.", "amount a"),
    25: Note("Spline tone curve through (0.3, 0.25 − a/4) and (0.7, 0.75 + a/4): more "
             "contrast for a > −0.2, less below (a = −0.2 puts both knots on the "
             "diagonal).", "a",
             "Level 3 (a = 0) is **not** the identity but mildly more contrast; level 4 "
             "(a = −0.4) is as far on the other side. Signed levels: contrast falls from "
             "level 1 to 5, and PSNR peaks at levels 3–4."),
    26: Note("1/f noise per channel, generated at 512×512, divided by its own maximum, "
             "resized to the image and added: soft, large colour blotches.", "weight w",
             "The amplitude depends on the field's one extreme sample. Types 26–29 "
             "get the raw image (no min–max stretch). See "
             "[vipnet_extras.md](vipnet_extras.md)."),
    27: Note("Red shifted right by up to 24 px, green half as far, then a Gaussian blur; "
             "the original searches 25 shifts × 11 blur sizes for the candidate nearest "
             "each level's target PSNR.", "target PSNR (dB)",
             "A level can have **no candidate** (astronaut, level 4: the "
             "grey cell): `distort` raises `DistortionNotApplicable`, and biqa-gen, like "
             "the original, then writes no type-27 sample of that reference at any level. "
             "Level 1 is the last candidate that passes a loose test, not the best one. "
             "See [vipnet_extras.md](vipnet_extras.md)."),
    28: Note("VIPNet's `simulate_ou`: the HSV value V is raised by a polynomial in V "
             "scaled by L, highlights burn out.", "L"),
    29: Note("VIPNet's `simulate_ou`: V is lowered by a log/power term scaled by L; dark "
             "pixels go black.", "L", "Level 1 is subtle; see the PSNR row."),
    30: Note("", "quality q", _CODEC_REMARK + _FLOOR_REMARK +
             " `--distortions vipnet` uses it for VIPNet's \"lossy compression\"."),
    31: Note("", "quality q", _CODEC_REMARK + _FLOOR_REMARK),
    32: Note("", "quality q", _CODEC_REMARK + "Unlike type 10 (4:2:0), chroma is kept "
             "at full resolution."),
    33: Note("", "target PSNR (dB) of the rate allocator", _CODEC_REMARK + "Unlike type 9 "
             "(fixed ratio), each level has nearly the same PSNR on every image."),
    34: Note("", "quality q", _CODEC_REMARK + _FLOOR_REMARK),
    35: Note("", "quality q", _CODEC_REMARK + _FLOOR_REMARK),
}


@dataclass
class Measured:
    """What the page reports from running every type on the bundled references."""
    psnr: dict[int, list[float]]  # type id -> mean PSNR to the reference per level
    refs: dict[int, int]          # type id -> references it has output for
    samples: int                  # samples biqa-gen writes for the selection
    identical: int                # of which equal to their reference (``psnr: null``)


def generator_input(spec, img: np.ndarray) -> np.ndarray:
    """The 8-bit image a type works on: types 1-25 see the min-max stretched reference."""
    if not spec.kadid_stretch:
        return img
    return run_stretched(lambda x: x, img, spec.input_dtype)


def measure(specs) -> tuple[Measured, dict[tuple[int, int], int]]:
    """Run every type and level on the bundled references with biqa-gen's seeds.

    Returns the page's figures and, per (type, level), on how many references the
    output equals the image the type received.
    """
    refs = resolve_refs(None)
    psnrs: dict[int, list[list[float]]] = {s.id: [[] for _ in range(5)] for s in specs}
    same_as_input: dict[tuple[int, int], int] = {}
    samples = identical = 0
    for ref_id, path in zip(refs.ids, refs.paths):
        img = load_reference(path, None, max(s.min_size for s in specs))
        for spec in specs:
            try:
                outs = [apply_spec(spec, img, lv, sample_rng(SEED, ref_id, spec.id, lv))
                        for lv in range(1, 6)]
            except DistortionNotApplicable:
                continue  # biqa-gen writes none of this type for this reference
            seen = generator_input(spec, img)
            for lv, out in enumerate(outs, 1):
                psnrs[spec.id][lv - 1].append(psnr(img, out))
                if np.array_equal(out, seen):
                    same_as_input[spec.id, lv] = same_as_input.get((spec.id, lv), 0) + 1
                identical += bool(np.array_equal(out, img))
            samples += 5
    means = {t: [float(np.mean(v)) for v in per_level] for t, per_level in psnrs.items()}
    counts = {t: len(per_level[0]) for t, per_level in psnrs.items()}
    return Measured(means, counts, samples, identical), same_as_input


def _fmt_param(p) -> str:
    return "−" + str(-p) if p < 0 else str(p)  # a real minus sign reads better in tables


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def type_section(spec, means: list[float], n_refs: int) -> str:
    note = NOTES[spec.id]
    what = note.what or spec.description[0].upper() + spec.description[1:] + "."
    kind = "random" if spec.stochastic else "deterministic"
    lines = [f"### {spec.id} {spec.name}", "",
             f"{what} *{spec.family}, {kind}.*", ""]
    if note.remarks:
        lines += [note.remarks, ""]
    lines += ["| level | 1 | 2 | 3 | 4 | 5 |", "|---|---|---|---|---|---|",
              f"| {note.parameter} | " + " | ".join(_fmt_param(p) for p in spec.params) + " |",
              f"| mean PSNR (dB), {n_refs} refs | " + " | ".join(_fmt_db(v) for v in means)
              + " |", ""]
    return "\n".join(lines)


def render_markdown(specs, measured: Measured, selection: str) -> str:
    """The whole page; everything measured comes from ``measured``."""
    identity = [f"{get(t).name} ({t}) level {lv}" for t, lv in IDENTITY_LEVELS]
    identity = ", ".join(identity[:-1]) + " and " + identity[-1]
    head = f"""# The distortions, type by type

Generated by `python benchmarks/gallery.py` from the registry
(`biqa.distortions.registry()`) and the notes in that script: edit those, not this
page. The level parameters of types 1–29 are the original generators', literally;
those of 30–35 are biqa's calibrated codec settings.

![every type at every level](gallery.png)

The gallery is biqa-gen's contact sheet (`biqa-gen --preview`) of the bundled
reference `astronaut` ([sample_refs.md](sample_refs.md)) with the dataset's seeds:
rows are types, columns levels. Every cell shows the same
{GALLERY_CROP[2]}×{GALLERY_CROP[3]} px box of the face at 1:1
(left {GALLERY_CROP[0]}, top {GALLERY_CROP[1]} of the 512×384 image),
so noise, blocking and dithering stay visible; a change elsewhere in the image (a
colour block, a moved patch) can fall outside it. A
caption is the level's parameter and the PSNR of the whole image to the reference
(`inf`: identical); a grey cell is a level without output. "mean PSNR" in the
tables below is over the bundled references (512×384), seed {SEED}, as `biqa-gen`
writes them.

`--resize WxH` scales each reference to cover W×H (aspect kept, Lanczos) and
crops the centre before any distortion ([generator.md](generator.md)).

## What a level classifier needs to know

* **Identical images under different labels.**
  {identity}
  return the image they are given unchanged, so for each reference these classes
  hold one and the same image. No model can tell them apart: a level classifier confuses them
  at chance, whatever it learns (drop or merge them if that matters for your task).
  The original generator, which made KADID-10k and KADIS-700k, does the same. With
  `biqa-gen --distortions {selection}` on the bundled references,
  {measured.identical} of the {measured.samples} samples are identical to their reference
  (`"psnr": null` in their JSON).
* **The KADID min–max stretch (types 1–25).** The original stretches every input
  and every output to the full 0..255 range. A reference that does not span it
  (the bundled `chelsea`: 0..215) changes even at the identity levels (about 21 dB
  to its reference, so `psnr` is not null), and those classes still hold one
  identical image (`biqa.distortions.api.run_stretched`). Types 26–35 get the raw
  image.
* **Levels are not always a severity scale.** Mean shift (18) and contrast (25) are
  signed, with level 3 in the middle. HSV saturation (7) level 5 inverts the hue.
  Pixelate (21) has almost the same PSNR at levels 1–3.
* **Colour diffusion (4)** over-saturates every image from level 2 on (red, orange,
  magenta), faithful to the original.
* **Chromatic aberration (27)** can have no output for an image at some level;
  biqa-gen then drops type 27 for that image (5 samples fewer).
* **Substitutes.** Types 6, 9, 15 and 22 could not be run in the original code;
  they are documented stand-ins. The codec family (30–35) has no original.

Agreement with the original, cell by cell: {_FIDELITY}.

## Types

| id | name | family | random | what the parameter is |
|---|---|---|---|---|
"""
    rows = "".join(f"| {s.id} | [{s.name}](#{s.id}-{s.name}) | {s.family} | "
                   f"{'yes' if s.stochastic else 'no'} | {NOTES[s.id].parameter} |\n"
                   for s in specs)
    return head + rows + "\n" + "\n".join(
        type_section(s, measured.psnr[s.id], measured.refs[s.id]) for s in specs)


def check_identity(specs, same_as_input: dict[tuple[int, int], int], n_refs: int) -> str:
    """'' when exactly IDENTITY_LEVELS (of the selection) return their input on every
    reference, else what differs."""
    ids = {s.id for s in specs}
    documented = {c for c in IDENTITY_LEVELS if c[0] in ids}
    found = set(same_as_input)
    partial = sorted(c for c, n in same_as_input.items() if n != n_refs)
    if found == documented and not partial:
        return ""
    return (f"identity levels changed: documented {sorted(documented)}, found "
            f"{sorted(found)}, not on every reference {partial}; update IDENTITY_LEVELS "
            "and the notes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs",
                    help="where gallery.png and distortions.md go (default: docs/)")
    ap.add_argument("--distortions", default="all",
                    help="the types to show, as for biqa-gen (default: all)")
    args = ap.parse_args(argv)
    try:
        specs = sorted(resolve_distortions(args.distortions), key=lambda s: s.id)
    except ValueError as exc:
        print(f"gallery.py: --distortions: {exc}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    refs = resolve_refs(None)
    ref_path = refs.paths[refs.ids.index(GALLERY_REF)]
    png = args.out_dir / "gallery.png"
    plan = make_plan(refs=[ref_path], distortions=",".join(str(s.id) for s in specs),
                     seed=SEED)
    failures = write_contact_sheet(str(png), plan, thumb_width=GALLERY_CROP[2],
                                   crop=GALLERY_CROP)
    if failures:
        print("gallery.py: cells failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"wrote {png} ({png.stat().st_size / 2**20:.2f} MiB)")
    measured, same_as_input = measure(specs)
    problem = check_identity(specs, same_as_input, len(refs))
    if problem:
        print(f"gallery.py: {problem}", file=sys.stderr)
        return 1
    md = args.out_dir / "distortions.md"
    md.write_text(render_markdown(specs, measured, args.distortions))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
