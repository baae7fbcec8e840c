"""Command-line entry points: a thin click layer over the library.

Each command only parses flags and calls the library function that does the work,
so everything a flag does can also be done from Python.
"""

from __future__ import annotations

import click

# ============================================================== biqa-gen (generator)
# (section owned by the generator work: biqa.generator)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--refs", multiple=True, metavar="PATH",
              help="Reference images: a folder (searched recursively), a glob ('imgs/**/*.png', "
                   "quoted), an image file, or a .csv/.txt list whose first column names the "
                   "files (header allowed; KADIS-700k's dataset_ref_img.csv works). Repeatable. "
                   "Default: the sample images shipped with biqa.")
@click.option("--refs-root", type=click.Path(file_okay=False), default=None,
              help="Folder that the names in a .csv/.txt list are relative to "
                   "(default: the list's folder).")
@click.option("--distortions", default="all", show_default=True, metavar="SPEC",
              help="all, kadid (1-25), vipnet (the 30 VIPNet types), codecs, or a comma list of "
                   "ids, id ranges and names, e.g. '1-5,11,jpeg'. The order sets the class "
                   "index: class = index*5 + level-1.")
@click.option("--levels", default="1-5", show_default=True,
              help="Levels to generate: a range or comma list, e.g. 1-5 or 1,3,5.")
@click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: *.tar shards (or loose images), manifest.json, stats/.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Global seed; each sample's seed derives from (seed, reference, type, level).")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Worker processes (loky) or LocalCluster workers (dask without --scheduler). "
                   "Default: all cores.")
@click.option("--backend", default="loky", show_default=True, type=click.Choice(["loky", "dask"]),
              help="Local processes, or a Dask cluster via joblib's dask backend "
                   "(output is byte-identical).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler, e.g. tcp://10.0.0.1:8786 (with --backend dask; without "
                   "it a loopback LocalCluster is started). Workers must see --out and the "
                   "references at the same paths.")
@click.option("--per-shard", default=500, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard, rounded down to a multiple of the number of levels.")
@click.option("--image-format", default="webp", show_default=True,
              type=click.Choice(["png", "webp"]),
              help="Lossless encoding of the images (WebP: cheaper to encode and decode, "
                   "and smaller; see docs/generator.md).")
@click.option("--format", "out_format", default="webdataset", show_default=True,
              type=click.Choice(["webdataset", "folder"]),
              help="Tar shards, or loose OUT/<ref>_<TT>_<LL>.webp|png files.")
@click.option("--resize", default=None, metavar="WxH",
              help="Scale each reference to cover WxH and centre-crop it first.")
@click.option("--overwrite", is_flag=True,
              help="Delete the output of a different job in --out instead of refusing.")
@click.option("--preview", default=None, metavar="OUT.png", type=click.Path(dir_okay=False),
              help="Instead of generating, render a contact sheet of the first reference "
                   "through every selected type and level.")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines; only the summary.")
def gen(refs, refs_root, distortions, levels, out, seed, workers, backend, scheduler, per_shard,
        image_format, out_format, resize, overwrite, preview, quiet):
    """Generate distorted images from reference images into WebDataset shards.

    \b
    biqa-gen --distortions all --out shards/
    biqa-gen --refs kadis700k/dataset_ref_img.csv --refs-root kadis700k/ref_imgs \\
             --distortions vipnet --out /data/vipnet --workers 32
    biqa-gen --preview sheet.png --refs photo.jpg --distortions kadid

    Re-running the same command resumes after an interruption. Exits with
    status 1 if some shards failed (they are listed in manifest.json).
    """
    from biqa.generator import generate, make_plan, summary_line
    from biqa.generator.preview import write_contact_sheet
    from biqa.generator.refs import ReferenceSkipped
    try:
        if preview:
            plan = make_plan(refs, refs_root, distortions, levels, out, seed, per_shard,
                             image_format, out_format, resize)
            ref_id, ref_path = plan.refs.ids[0], plan.refs.paths[0]
            failures = write_contact_sheet(preview, ref_path, ref_id, plan.settings.type_ids,
                                           plan.settings.levels, seed, plan.settings.resize)
            for failure in failures:
                click.echo(f"biqa-gen: warning: {failure}", err=True)
            click.echo(f"biqa-gen: contact sheet of {ref_id} written to {preview}")
            return
        manifest = generate(refs, refs_root, distortions, levels, out, seed, per_shard,
                            image_format, out_format, resize, workers, backend, scheduler,
                            overwrite, progress=not quiet)
    except (ValueError, ReferenceSkipped) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(summary_line(manifest))
    for failed in manifest["failed"]:
        last_line = failed["error"].strip().splitlines()[-1]
        click.echo(f"biqa-gen: {failed['shard']} failed after {failed['attempts']} attempts: "
                   f"{last_line}", err=True)
    if manifest["failed"]:
        raise SystemExit(1)


def gen_main() -> None:
    """Console entry point of ``biqa-gen``."""
    gen()


# ============================================================ biqa-train-dpm (training)
# (section owned by the DPM training work: biqa.training.pretrain)

# ================================================== biqa-finetune / biqa-score (finetune)
# (section owned by the fine-tuning work: biqa.training.finetune)
