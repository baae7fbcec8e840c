"""biqa-gen: distorted images from reference images into WebDataset shards.

>>> from biqa.generator import generate
>>> manifest = generate(distortions="vipnet", out="shards/", workers=8)

Imports neither torch nor any training code, so it runs on plain CPU nodes.
"""

from .job import generate, make_plan, parse_levels, parse_size, summary_line

__all__ = ["generate", "make_plan", "parse_levels", "parse_size", "summary_line"]
