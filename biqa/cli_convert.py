"""``biqa-convert-dpm``: the VIPNet authors' released DPM as a biqa checkpoint (a thin click
layer over ``biqa.training.dpm_weights.convert_vipnet_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--distortions", default="vipnet", show_default=True, metavar="SPEC",
              help="The types the DPM was trained on, in class order (class = index*5 + "
                   "level-1), as biqa-gen's --distortions; VIPNet's 30 by default.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert_dpm(src, dst, distortions, overwrite):
    """Convert SRC, a DPM saved by the VIPNet authors' pre-training code (e.g. their
    botnet_model_best.pth.tar), into DST, a biqa checkpoint (arch botnet50-vipnet) for
    biqa-finetune --dpm and biqa-train-dpm --init-weights.

    \b
    biqa-convert-dpm botnet_model_best.pth.tar vipnet_dpm.pt
    biqa-finetune --dataset kadid10k --dpm vipnet_dpm.pt --cpm-weights resnet50.pth
    """
    from biqa.training.dpm_weights import convert_vipnet_checkpoint

    if Path(dst).exists() and not overwrite:
        raise click.UsageError(f"{dst} exists; pass --overwrite to replace it")
    if Path(dst).resolve() == Path(src).resolve():
        raise click.UsageError("DST must not be SRC: the original file is kept")
    try:
        config = convert_vipnet_checkpoint(src, dst, distortions)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:  # e.g. a full disk: nothing is left at DST
        raise click.ClickException(str(exc)) from None
    width, height = config["input_size"]
    click.echo(f"{dst}: {config['arch']}, {config['num_classes']} classes "
               f"({len(config['class_table'])} types), input {width}x{height}")


def convert_dpm_main() -> None:
    """Console entry point of ``biqa-convert-dpm``."""
    convert_dpm()
