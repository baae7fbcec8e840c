"""Torch training: DPM pre-training on shards (``pretrain``), the backbones (``models``), the
streaming input pipeline (``data``) and VIPNet fine-tuning.

Import the submodules directly (``from biqa.training.models import create_model``): this
package imports nothing itself, so ``import biqa`` never needs torch.
"""
