"""Command-line entry points: a thin click layer over the library.

Each command only parses flags and calls the library function that does the work,
so everything a flag does can also be done from Python.
"""

from __future__ import annotations

import os
import re

import click

from biqa.training.config import ARCHS as TRAIN_ARCHS


def _size(min_side: int):
    """A click callback turning 'WxH' into (W, H); every size flag is width x height."""
    def parse(ctx, param, value):
        from biqa.generator.job import parse_size
        if value is None:
            return None
        try:
            return parse_size(value, min_side)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return parse

# ============================================================== biqa-gen (generator)


def _fr_metric_names(ctx, param, value) -> tuple[str, ...]:
    """A comma list of full-reference metrics as ``biqa-gen --fr-metrics`` reads it."""
    if not value:
        return ()
    from biqa.fr_metrics import parse_fr_metrics
    try:
        return parse_fr_metrics(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--refs", multiple=True, metavar="PATH",
              help="Reference images: a folder (searched recursively), a glob ('imgs/**/*.png', "
                   "quoted), an image file, or a .csv/.txt list whose first column names the "
                   "files (header allowed; KADIS-700k's dataset_ref_img.csv works; --recipe "
                   "kadis700k also reads a second column, the type). Repeatable. Default: the "
                   "sample images shipped with biqa.")
@click.option("--refs-root", type=click.Path(file_okay=False), default=None,
              help="Folder that the names in a .csv/.txt list are relative to "
                   "(default: the list's folder).")
@click.option("--distortions", default=None, metavar="SPEC",
              help="all, kadid (1-25), vipnet (the 30 VIPNet types), codecs, or a comma list of "
                   "ids, id ranges and names, e.g. '1-5,11,jpeg'. The order sets the class "
                   "index: class = index*5 + level-1. [default: all; with --recipe: kadid "
                   "for kadis700k, vipnet for vipnet]")
@click.option("--recipe", default=None, type=click.Choice(["kadis700k", "vipnet"]),
              help="A published set (docs/generator.md, Recipes). kadis700k: each row of the "
                   "--refs list names its reference and, in the second column, its one type "
                   "(kadis700k_ref_imgs.csv), made at every level. vipnet: every type but 27 on "
                   "the --refs list (dataset_ref_img.csv), and chromatic aberration (27) from "
                   "the --walk-refs list, walked in order until --walk-count references have "
                   "all five levels.")
@click.option("--types-per-ref", default=None, type=click.IntRange(min=1), metavar="K",
              help="Make K of the --distortions types for each reference, drawn from "
                   "(--seed, reference name): KADIS-style sets of your own. [default: all]")
@click.option("--walk-refs", multiple=True, metavar="PATH",
              help="With --recipe vipnet: the list walked in order for chromatic aberration "
                   "(27), VIPNet's dataset_ref_img_140k.csv; names relative to --refs-root.")
@click.option("--walk-count", default=None, type=click.IntRange(min=1), metavar="N",
              help="With --recipe vipnet: stop the walk once N references have all five "
                   "levels of type 27. [default: 40000]")
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
@click.option("--per-shard", default=200, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard, rounded down to a multiple of the number of levels.")
@click.option("--image-format", default=None, type=click.Choice(["png", "webp", "zstd"]),
              help="Lossless encoding of the images. Default: webp for shards (cheaper to "
                   "encode and decode than PNG, and smaller; see docs/generator.md), png "
                   "with --format folder.")
@click.option("--format", "out_format", default="webdataset", show_default=True,
              type=click.Choice(["webdataset", "folder"]),
              help="Tar shards, or loose OUT/<ref>_<TT>_<LL>.png files.")
@click.option("--resize", default=None, metavar="WxH",
              help="Scale each reference to cover WxH (aspect ratio kept, Lanczos) and "
                   "centre-crop it first. At most 16384 px a side and --max-pixels.")
@click.option("--fr-metrics", default=None, metavar="METRICS",
              help="Record full-reference scores of each sample against its reference in its "
                   "JSON (pseudo-MOS for ranking and weak labels): psnr, ssim, ms_ssim, gmsd, "
                   "vif or all, e.g. ssim,ms_ssim (docs/fr_metrics.md: what each costs).")
@click.option("--allow-upscale", is_flag=True,
              help="Let --resize enlarge references smaller than the selected distortions "
                   "need (skipped as too small otherwise).")
@click.option("--max-pixels", default=50_000_000, show_default=True, type=click.IntRange(min=0),
              help="Skip references with more pixels (read from the header, before decoding); "
                   "0: no limit (Pillow's decompression-bomb limit still applies).")
@click.option("--allow-refs-outside-root", is_flag=True,
              help="Read list entries that lead outside --refs-root (absolute names, '..', "
                   "symlinks) instead of refusing them.")
@click.option("--overwrite", is_flag=True,
              help="Replace the output of a different job in --out instead of refusing: "
                   "deletes only the shards, images and stats biqa-gen recorded there.")
@click.option("--preview", default=None, metavar="OUT.png", type=click.Path(dir_okay=False),
              help="Instead of generating, render a contact sheet of the first reference "
                   "through every selected type and level.")
@click.option("--quiet", is_flag=True, help="No progress bar or log lines; only the summary.")
def gen(refs, refs_root, distortions, recipe, types_per_ref, walk_refs, walk_count, levels, out,
        seed, workers, backend, scheduler, per_shard, image_format, out_format, resize,
        fr_metrics, allow_upscale, max_pixels, allow_refs_outside_root, overwrite, preview,
        quiet):
    """Generate distorted images from reference images into WebDataset shards.

    \b
    biqa-gen --distortions all --out shards/
    biqa-gen --recipe kadis700k --refs kadis700k_ref_imgs.csv --refs-root ref_imgs/ \\
             --out /data/kadis700k
    biqa-gen --recipe vipnet --refs dataset_ref_img.csv \\
             --walk-refs dataset_ref_img_140k.csv --refs-root ref_imgs/ --out /data/vipnet
    biqa-gen --preview sheet.png --refs photo.jpg --distortions kadid

    Re-running the same command resumes after an interruption. Exits with
    status 1 if some shards failed (they are listed in manifest.json), 130 after
    Ctrl-C and 143 after SIGTERM.
    """
    from biqa.generator import generate, make_plan, summary_line
    from biqa.generator.preview import write_contact_sheet
    from biqa.generator.refs import ReferenceSkipped
    options = dict(max_pixels=max_pixels, allow_upscale=allow_upscale, fr_metrics=fr_metrics,
                   refs_outside_root=allow_refs_outside_root, recipe=recipe,
                   types_per_ref=types_per_ref or 0, walk_refs=walk_refs, walk_count=walk_count)
    try:
        with _SigtermAsInterrupt():
            if preview:
                plan = make_plan(refs, refs_root, distortions, levels, out, seed, per_shard,
                                 image_format, out_format, resize, **options)
                failures = write_contact_sheet(preview, plan)
                for failure in failures:
                    click.echo(f"biqa-gen: warning: {failure}", err=True)
                click.echo(f"biqa-gen: contact sheet of {plan.refs.ids[0]} written to {preview}")
                return
            manifest = generate(refs, refs_root, distortions, levels, out, seed, per_shard,
                                image_format, out_format, resize, workers, backend, scheduler,
                                overwrite, progress=not quiet, **options)
    except (ValueError, ReferenceSkipped) as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt as exc:
        what, code = ("terminated", 143) if isinstance(exc, _Terminated) else ("interrupted", 130)
        click.echo(f"\nbiqa-gen: {what}; completed shards are kept, re-run the same "
                   "command to finish the rest", err=True)
        raise SystemExit(code) from None
    except OSError as exc:  # e.g. the output disk is full while writing the manifest
        click.echo(f"biqa-gen: cannot write the output: {exc}; completed shards are kept, "
                   "re-run the same command once the problem is fixed", err=True)
        raise SystemExit(1) from None
    click.echo(summary_line(manifest))
    for failed in manifest["failed"]:
        last_line = failed["error"].strip().splitlines()[-1]
        click.echo(f"biqa-gen: {failed['shard']} failed after {failed['attempts']} attempts: "
                   f"{last_line}", err=True)
    if manifest["failed"]:
        raise SystemExit(1)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that it stops the workers the same way."""


class _SigtermAsInterrupt:
    """While the block runs (in the main thread), SIGTERM raises ``_Terminated``."""

    def __enter__(self):
        import signal
        import threading
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise _Terminated()

    def __exit__(self, *exc):
        import signal
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def gen_main() -> None:
    """Console entry point of ``biqa-gen``."""
    gen()


# ============================================================ biqa-train-dpm (training)


def _plan_line(config, shards, val_shards) -> str:
    """What a run is about to do, from the manifest alone (printed before torch loads)."""
    per_step = config.batch_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(shards.samples // (per_step * world), 0)
    steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    w, h = config.input_size
    val = (f"; validating on {val_shards.samples} samples" if val_shards is not None
           else "; no --val-shards: no validation")
    missing = (f" ({shards.missing_samples} samples of missing shards skipped)"
               if shards.missing else "")
    recipe = " (VIPNet's published recipe)" if config.protocol == "paper" else ""
    return (f"biqa-train-dpm: {shards.samples} samples in {len(shards.urls)} shards{missing}, "
            f"{len(shards.class_table)} types ({shards.num_classes} classes){val}; {config.arch} "
            f"at {w}x{h}, batch {per_step}{f' x {world} ranks' if world > 1 else ''}, "
            f"{steps_per_epoch} steps per epoch, {steps} steps{recipe}; loading torch ...")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--shards", required=True, help="Shard folder (with manifest.json) or brace URL pattern.")
@click.option("--val-shards", default=None, help="Held-out shards for validation (same type table).")
@click.option("--out", default="runs/dpm", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: last.pt, best.pt, metrics.jsonl, confusion.png.")
@click.option("--smoke", is_flag=True,
              help="A short CPU run that shows the whole pipeline working (tiny model at "
                   "128x96, batch 32, 150 steps: about a minute on two cores). Flags given "
                   "explicitly still win.")
@click.option("--arch", default="botnet50", show_default=True, type=click.Choice(TRAIN_ARCHS),
              help="botnet50-vipnet: the VIPNet authors' exact BoTNet (their weights load into "
                   "it, see biqa-convert-dpm).")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after N steps.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per step and process.")
@click.option("--lr", default=0.05, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="DataLoader workers per process [default: the cores available per process, "
                   "less one].")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="cuda (with torchrun: LOCAL_RANK modulo the visible GPUs) when available.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision [default: on for CUDA, off on the CPU].")
@click.option("--amp-dtype", default=None, type=click.Choice(["bf16", "fp16"]),
              help="Autocast dtype [default: bf16 where the GPU has it natively, else fp16 with "
                   "a grad scaler].")
@click.option("--ranking-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Weight of the pairwise quality ranking loss (0: off).")
@click.option("--rank-pairs", default="group", show_default=True,
              type=click.Choice(["group", "reference"]),
              help="Ranking pairs: two levels of one (reference, type), ordered by level "
                   "(RankIQA); or any two samples of one reference across types, ordered by "
                   "--pseudo-mos (PINet-style).")
@click.option("--pseudo-mos", default=None, metavar="METRIC",
              help="Full-reference metric that orders --rank-pairs reference (recorded by "
                   "biqa-gen --fr-metrics; psnr always is).")
@click.option("--regress", default=None, metavar="METRICS", callback=_fr_metric_names,
              help="Also regress these full-reference metrics as weak labels "
                   "(DeepFL-IQA-style), e.g. ssim,ms_ssim.")
@click.option("--regression-weight", default=1.0, show_default=True,
              type=click.FloatRange(min=0), help="Weight of the regression loss.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt if it exists.")
@click.option("--input-size", default="384x288", show_default=True, callback=_size(32),
              help="Training crop, WIDTHxHEIGHT.")
@click.option("--init-weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="torchvision-format ImageNet state dict (resnet*/botnet50), or a biqa DPM "
                   "checkpoint of the same --arch (e.g. from biqa-convert-dpm).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--save-every", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--val-every", default=1, show_default=True, type=click.IntRange(min=1),
              help="Validate every N epochs (and after the last step).")
@click.option("--kadid-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="KADID-10k folder (dmos.csv, images/) to evaluate on each epoch.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--allow-incomplete", is_flag=True,
              help="Train on the complete shards of a biqa-gen run that did not finish.")
@click.option("--protocol", default="biqa", show_default=True,
              type=click.Choice(["biqa", "paper"]),
              help="paper: VIPNet's published recipe -- 40 epochs, 320 images per step over all "
                   "GPUs, the cosine warm restarts advanced once per epoch (docs/training.md).")
@click.pass_context
def train_dpm_main(ctx, shards, val_shards, out, smoke, arch, epochs, max_steps, batch_size, lr,
                   workers, device, amp, amp_dtype, ranking_weight, rank_pairs, pseudo_mos,
                   regress, regression_weight, resume, input_size, init_weights, compile_,
                   log_every, save_every, val_every, kadid_root, seed, allow_incomplete,
                   protocol):
    """Pre-train the distortion perception model on biqa-gen shards (VIPNet's recipe by
    default: needs a GPU); run under torchrun for data parallelism.

    \b
    biqa-train-dpm --shards shards/ --smoke                 # a one-minute CPU run
    biqa-train-dpm --shards shards/ --val-shards val/      # VIPNet's recipe on a GPU
    torchrun --nproc-per-node 8 $(which biqa-train-dpm) --shards shards/  # 8 GPUs
    """
    import logging

    from biqa.shards.reader import open_shards
    from biqa.training.config import PAPER, SMOKE, TrainConfig

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    settings = dict(shards=shards, val_shards=val_shards, out=out, arch=arch, epochs=epochs,
                    max_steps=max_steps, batch_size=batch_size, lr=lr, workers=workers,
                    device=device, amp=amp, amp_dtype=amp_dtype, ranking_weight=ranking_weight,
                    rank_pairs=rank_pairs, pseudo_mos=pseudo_mos,
                    regress=regress, regression_weight=regression_weight, resume=resume,
                    input_size=input_size, init_weights=init_weights,
                    compile=compile_, log_every=log_every, save_every=save_every,
                    val_every=val_every, kadid_root=kadid_root, seed=seed,
                    allow_incomplete=allow_incomplete, protocol=protocol)
    if smoke:
        settings.update({k: v for k, v in SMOKE.items() if not given(k)})
    config = TrainConfig(**settings)
    fixed = [k for k in (*PAPER, "batch_size") if k in settings and given(k)]
    if protocol == "paper" and fixed:
        raise click.UsageError(f"--protocol paper fixes {', '.join(fixed)} (the published "
                               "recipe); leave them out, or use --protocol biqa")
    try:
        config = config.for_world(int(os.environ.get("WORLD_SIZE", "1")))
        config.validate()
        train_shards = open_shards(config.shards, config.allow_incomplete)
        held_out = (open_shards(config.val_shards, config.allow_incomplete)
                    if config.val_shards else None)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        click.echo(_plan_line(config, train_shards, held_out), err=True)

    import torch  # only now: flag errors above come back at once

    if not torch.cuda.is_available() and config.device in (None, "auto") and not smoke \
            and not given("arch"):
        raise click.UsageError(
            f"no CUDA GPU here, and the default recipe ({config.arch} at "
            f"{config.input_size[0]}x{config.input_size[1]}, {config.epochs} epochs) would take "
            f"days on a CPU. For a short CPU run that shows everything working:\n"
            f"  biqa-train-dpm --shards {shards} --smoke\n"
            "or choose the CPU run yourself with --device cpu (and e.g. --arch tiny "
            "--max-steps N).")
    from biqa.training.pretrain import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = train(config)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    except OSError as exc:  # e.g. a full disk while saving a checkpoint (never torn)
        raise click.ClickException(f"{exc}; the last complete checkpoint is kept, "
                                   "--resume continues from it")
    if summary["rank"] == 0:
        best = (f"best validation accuracy {summary['best_acc']:.4f}"
                if summary["validated"] else "no validation (no --val-shards)")
        skipped = (f", {summary['skipped']} samples skipped (see the warnings above)"
                   if summary["skipped"] else ", no sample skipped")
        click.echo(f"done: {summary['steps']} steps, {best}{skipped}, "
                   f"checkpoint {summary['last_checkpoint']}")


# ================================================== biqa-finetune / biqa-score (finetune)


def _reason(exc: Exception) -> str:
    """An error's own message in one line: an error raised in a DataLoader worker reaches
    the main process wrapped in the worker's traceback, whose last line is the reason."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\w+Error: ", "", last)


def _cross_datasets(ctx, param, values) -> dict:
    """NAME=DIR (or NAME, read from $BIQA_DATA/NAME) -> {name: root or None}."""
    from biqa.training.iqa_datasets import DATASET_NAMES
    out = {}
    for value in values:
        name, _, root = value.partition("=")
        if name not in DATASET_NAMES:
            raise click.BadParameter(f"{value!r}: dataset must be one of {', '.join(DATASET_NAMES)}")
        out[name] = root or None
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--dataset", required=True,
              type=click.Choice(["tid2013", "kadid10k", "live", "csiq", "livec", "koniq10k", "csv"]),
              help="Dataset to fine-tune and test on (layouts: docs/datasets.md).")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Dataset folder [default: $BIQA_DATA/<dataset>].")
@click.option("--dpm", default=None, type=click.Path(exists=True, dir_okay=False),
              help="biqa-train-dpm checkpoint for the frozen distortion branch; without it the "
                   "branch (--dpm-arch) is trained from scratch and the results say so.")
@click.option("--dpm-arch", default="botnet50", show_default=True,
              type=click.Choice(TRAIN_ARCHS),
              help="Distortion branch trained from scratch when no --dpm is given.")
@click.option("--cpm-arch", default="resnet50", show_default=True,
              type=click.Choice(["resnet50", "resnet18", "tiny"]), help="Content branch.")
@click.option("--cpm-weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="torchvision-format ImageNet state dict for the content branch.")
@click.option("--rounds", default=10, show_default=True, type=click.IntRange(min=1),
              help="Train/test rounds, each with its own reference-disjoint split.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--patches", default=12, show_default=True, type=click.IntRange(min=1),
              help="Random patches per image per epoch in training; fixed crops averaged at test.")
@click.option("--patch-size", default="384x288", show_default=True, callback=_size(16),
              help="Patch WIDTHxHEIGHT.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Patches per step.")
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", default=5e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seeds the splits, crops and initialisation of every round.")
@click.option("--val-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="Share of the references, taken from the training part, that picks the epoch.")
@click.option("--select-on-test", is_flag=True,
              help="Pick the epoch on the test part (the published code's optimistic protocol; "
                   "labelled as such in results.json).")
@click.option("--logistic/--no-logistic", default=True, show_default=True,
              help="PLCC and RMSE after the 4-parameter logistic fit.")
@click.option("--cross", multiple=True, callback=_cross_datasets, metavar="NAME=DIR",
              help="Also test each round's model on this dataset (repeatable).")
@click.option("--out", default="runs/finetune", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@click.option("--protocol", default="biqa", show_default=True,
              type=click.Choice(["biqa", "paper"]),
              help="paper: VIPNet's published protocol, to compare with the paper's table -- 35 "
                   "epochs with early stopping, exponential LR decay 0.85, 12 random patches "
                   "with flips at test too (16 on KADID-10k), raw PLCC, the best test epoch "
                   "reported (labelled in results.json).")
@click.pass_context
def finetune(ctx, dataset, root, dpm, dpm_arch, cpm_arch, cpm_weights, rounds, epochs, patches,
             patch_size, batch_size, lr, weight_decay, seed, val_fraction, select_on_test,
             logistic, cross, out, device, workers, protocol):
    """Fine-tune VIPNet on an IQA dataset over reference-disjoint rounds; writes
    OUT/results.json, OUT/round_NN/best.pt and a per-type SRCC plot."""
    from biqa.training.config import PAPER_FINETUNE, FinetuneConfig
    from biqa.training.iqa_datasets import DatasetError, check_patch_fits, load_dataset
    cfg = FinetuneConfig(dataset=dataset, root=root, out=out, dpm=dpm, dpm_arch=dpm_arch,
                         cpm_arch=cpm_arch, cpm_weights=cpm_weights, rounds=rounds, epochs=epochs,
                         patches=patches, patch_size=patch_size, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, val_fraction=val_fraction,
                         select_on_test=select_on_test, logistic=logistic, cross=cross,
                         device=device, workers=workers, protocol=protocol)
    fixed = [name for name in ("epochs", "patches", "batch_size", "lr", "weight_decay",
                               "val_fraction", "select_on_test", "logistic")
             if name in {*PAPER_FINETUNE, "patches"}
             and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if protocol == "paper" and fixed:
        raise click.UsageError(f"--protocol paper fixes {', '.join(fixed)} (the published "
                               "protocol); leave them out, or use --protocol biqa")
    try:  # settings and datasets are checked before torch is imported (fast errors)
        cfg.check()
        check_patch_fits(load_dataset(cfg.dataset, cfg.root), cfg.patch_size)
        for name, cross_root in cfg.cross.items():
            check_patch_fits(load_dataset(name, cross_root), cfg.patch_size)
    except (DatasetError, ValueError) as exc:
        raise click.UsageError(str(exc))
    from biqa.training.finetune import run_finetune, summary_table
    try:
        results = run_finetune(cfg, say=lambda line: click.echo(line, err=True))
    except (DatasetError, ValueError) as exc:  # e.g. an image that fails to decode
        raise click.UsageError(_reason(exc))
    except OSError as exc:  # e.g. a full disk while saving a round (never torn)
        raise click.ClickException(f"{exc}; finished rounds are kept, re-running the same "
                                   "command reuses them")
    click.echo(summary_table(results))
    click.echo(f"results: {out}/results.json")


def finetune_main() -> None:
    """Console entry point of ``biqa-finetune``."""
    finetune()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A round's best.pt written by biqa-finetune.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Patches per forward pass.")
@click.option("--patches", default=None, type=click.IntRange(min=1),
              help="Fixed crops averaged per image [default: the model's].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0))
def score(model_path, images, batch_size, patches, device, workers):
    """Print 'PATH<TAB>SCORE' for every image (folders are searched recursively), on the
    training dataset's score scale (its direction: for DMOS datasets lower is better)."""
    from biqa.training.config import check_device_name
    from biqa.training.score import image_files, score_images
    try:
        check_device_name(device)
        paths = image_files(images)
        for path, value in score_images(model_path, paths, batch_size, patches, device, workers,
                                        warn=lambda line: click.echo(line, err=True)):
            click.echo(f"{path}\t{value:.6f}")
    except ValueError as exc:
        raise click.UsageError(_reason(exc))


def score_main() -> None:
    """Console entry point of ``biqa-score``."""
    score()
