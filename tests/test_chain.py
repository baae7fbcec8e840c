"""The chain transfers: a DPM pre-trained on biqa-gen shards of some contents makes a better
quality model on other contents than the same fine-tuning without it.

A small run of benchmarks/bench_chain.py (tiny branches, Gaussian blur and white noise,
96x72 tiles of the bundled references, 64x48 patches): most tiles for the DPM, the others
(no pixel shared) for a KADID-10k-layout dataset whose MOS is 7 - level + noise.  The full
four-type chain and its figures: docs/finetune.md, "Does the chain learn?".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_chain import ChainConfig, run_chain  # noqa: E402

SMALL = dict(types="1,11", size=(96, 72), patch=(64, 48), finetune_every=12, dpm_steps=800,
             rounds=2, epochs=4, patches=4)


@pytest.fixture(autouse=True)
def two_threads(torch_threads):
    torch_threads(2)


def test_pretrained_dpm_transfers_to_unseen_contents(tmp_path):
    figures = run_chain(ChainConfig(out=str(tmp_path), **SMALL), say=lambda line: None)
    with_dpm, without = figures["with_dpm"]["median_srcc"], figures["without_dpm"]["median_srcc"]
    shown = {k: figures[k] for k in ("contents", "dpm", "probe", "probe_untrained",
                                     "with_dpm", "without_dpm")}
    assert figures["dpm"]["top1"] > 0.5, shown  # chance: 0.1
    assert figures["probe"] > figures["probe_untrained"] + 0.2, shown
    assert with_dpm > 0.8, shown
    assert with_dpm > without + 0.3, shown
