"""Command-line entry points: a thin click layer over the library.

Each command only parses flags and calls the library function that does the work,
so everything a flag does can also be done from Python.
"""

from __future__ import annotations

import click

# ============================================================== biqa-gen (generator)
# (section owned by the generator work: biqa.generator)

# ============================================================ biqa-train-dpm (training)
# (section owned by the DPM training work: biqa.training.pretrain)

# ================================================== biqa-finetune / biqa-score (finetune)
# (section owned by the fine-tuning work: biqa.training.finetune)
