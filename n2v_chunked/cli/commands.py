"""The ``n2v-chunked`` command line.

Every subcommand is a thin layer over a library function: parse, call, print.
Options can also come from a YAML file (``--config``), one section per
subcommand (:mod:`n2v_chunked.cli.config_file`), e.g.::

    predict:
      chunks: [1, 512, 512]
      scheduler: slurm

Errors a user can cause are :class:`~n2v_chunked.errors.N2VError`: one line on
stderr and exit 2 (so are failures of the machine: disk, memory, a lost dask
worker).  Anything else is a bug: its traceback, then one line asking for a
report, and exit 70 (``EX_SOFTWARE``).  ``--debug`` shows tracebacks for all.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
import time
from typing import Any, Callable, Sequence

from .. import __version__
from ..errors import INTERNAL_ERROR_EXIT, ConfigError, N2VError, PREEMPTED_EXIT, environment_problem, first_line
from .config_file import add_storage_options, apply_config_file, configure_stores, given_options

log = logging.getLogger("n2v_chunked")

Handler = Callable[[argparse.Namespace], int | None]

AXES_HELP = ("axis letters from tczyx in the order the axes are STORED (the order of the shape tifffile or zarr "
             "reports), e.g. zyx, tyx, or yxc for a channels-last RGB TIFF; not the tczyx order that info prints. "
             "Needed where the metadata states no axes (plain TIFF, plain Zarr, arrays); where it does "
             "(OME-Zarr, OME-TIFF, ImageJ), --axes must agree with it")


# ----------------------------------------------------------------------------
# Subcommands.  Each has an ``add_<name>`` that declares its options and sets
# ``handler``; the handler imports its library module lazily so that
# ``n2v-chunked --help`` starts in well under a second.
# ----------------------------------------------------------------------------


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--progress-interval", metavar="SECONDS|PERCENT",
                   help="without a terminal (batch jobs), print a progress line this often: seconds (default 30) "
                   "or a share of the work, e.g. 10%%")


def _add_allow_unvalidated(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-unvalidated", action="store_true",
                   help=f"{what} a model directory whose training stopped before its first validation (refused by "
                   "default: its weights may be step 0's random ones)")


#: ``train`` options and the config field each sets (``section.field``; ``--paper`` sets those it presets).
_TRAIN_FIELDS = {
    "depth": "model.depth", "features": "model.features", "kernel_size": "model.kernel_size",
    "n2v2": "model.n2v2", "independent_channels": "model.independent_channels",
    "mask_density": "mask.density", "replacement": "mask.replacement", "struct_span": "mask.struct_span",
    "struct_axes": "mask.struct_axes", "minutes": "train.time_budget", "workers": "train.num_workers",
    "patch": "train.patch_size", **{k: f"train.{k}" for k in (
        "steps", "batch_size", "lr", "schedule", "val_interval", "stop_patience", "checkpoint_interval",
        "precision", "seed", "compile", "ema")},
}
_PAPER_SETS = {"replacement", "mask_density", "lr", "stop_patience", "independent_channels", "ema"}


def _resumed_configs(args: argparse.Namespace, model_cfg: Any, mask_cfg: Any, train_cfg: Any) -> tuple[Any, Any, Any]:
    """What ``train --resume`` asks for: the stored network and masking with the given options over them
    (fit refuses any difference), and the given training settings (each takes effect or is refused,
    :func:`n2v_chunked.model.config.resumed`)."""
    import dataclasses

    from ..model import checkpoint as ckpt

    given = set(args.given) | (_PAPER_SETS if "paper" in args.given else set())
    asked: dict[str, dict[str, Any]] = {"model": {}, "mask": {}, "train": {}}
    for dest, target in _TRAIN_FIELDS.items():
        section, field = target.split(".")
        if dest in given:
            asked[section][field] = getattr({"model": model_cfg, "mask": mask_cfg, "train": train_cfg}[section], field)
    stored_model, stored_mask, _ = ckpt.configs_from_meta(ckpt.read_config(args.model_dir), args.model_dir)
    return (dataclasses.replace(stored_model, **asked["model"]), dataclasses.replace(stored_mask, **asked["mask"]),
            asked["train"])


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train briefly on the bundled sample image and denoise it",
        description="Train N2V for about two minutes on the bundled sample image, "
        "denoise it, write the result and a side-by-side PNG (noisy | denoised).",
        epilog="example: n2v-chunked demo --out demo_output --minutes 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    p.add_argument("--sample", default="paxillin", choices=["paxillin", "nuclei"],
                   help="bundled image: real microscopy noise (paxillin) or added noise with ground truth (nuclei)")
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget in minutes (default: 2)")
    p.add_argument("--steps", type=int, default=400, help="maximum training steps (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    def handler(args: argparse.Namespace) -> int:
        from .demo import run_demo

        run_demo(args.out, sample=args.sample, minutes=args.minutes, steps=args.steps, seed=args.seed,
                 overwrite=args.overwrite)
        return 0

    p.set_defaults(handler=handler)


def add_train(sub: argparse._SubParsersAction) -> None:
    """The ``train`` subcommand: one declaration per option (long by nature); :func:`_run_train` runs it."""
    p = sub.add_parser(
        "train",
        help="train an N2V model on any image, streaming patches from disk",
        description="Train Noise2Void on noisy images only.  Patches stream from a bounded buffer of "
        "chunk-aligned blocks, so the image may be far larger than memory.  Under torchrun, training "
        "runs data-parallel with one process per GPU.",
        epilog="examples:\n"
        "  n2v-chunked train stack.ome.zarr --model-dir models/n2v --steps 4000\n"
        "  n2v-chunked train movie.tif --axes tyx --model-dir models/movie --minutes 30 --n2v2\n"
        "  n2v-chunked train stack.ome.zarr --model-dir models/n2v --resume --steps 8000\n"
        "  n2v-chunked train screen.ome.zarr --select 'B*' --model-dir models/screen   # one model, a plate's wells\n"
        "  torchrun --nproc_per_node=4 -m n2v_chunked.cli train big.ome.zarr --model-dir models/big",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="OME-Zarr, Zarr, TIFF file/folder/glob, or fsspec URL; or a collection (HCS "
                   "plate, bioformats2raw container, folder or glob of images): one model for all its images")
    p.add_argument("--model-dir", required=True, help="directory for the model and its checkpoints")
    p.add_argument("--select", metavar="PATTERNS",
                   help="images of a collection to train on, comma-separated globs: wells (B3,C*), fields (B3/0, */1), "
                   "series (0,2-5) or file names (see `n2v-chunked info`)")
    p.add_argument("--axes", help=AXES_HELP)
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale OME-Zarr (default 0)")
    p.add_argument("--dims", type=int, choices=[2, 3], help="model dimensionality (default: 3 if the data has z)")
    p.add_argument("--resume", action="store_true", help="continue training the model in --model-dir")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from another model's weights: a Zoo package written by 'n2v-chunked export' or a model "
                   "directory (its network, masking and normalisation are used; --depth etc. are ignored)")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=2000, help="total optimiser steps (default 2000)")
    g.add_argument("--minutes", type=float, default=0.0,
                   help="time budget: no step starts that would end after it, judged by the previous step's "
                   "duration (0: no limit)")
    g.add_argument("--batch-size", type=int, default=128, help="patches per step (default 128)")
    g.add_argument("--patch", help="patch shape, e.g. 64,64 or 32,32,32 (default fits the data)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 4e-4, the paper's)")
    g.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau",
                   help="plateau: halve the rate when validation stalls (paper, default); cosine: warm up, "
                   "then decay to 0 at the end of --steps or --minutes")
    g.add_argument("--val-interval", type=int, default=100, help="steps between validations (default 100)")
    g.add_argument("--stop-patience", type=int,
                   help="stop early after this many validations without a better validation loss, keeping the best "
                   "weights (default 10; 0: train all --steps)")
    g.add_argument("--checkpoint-interval", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware supports it (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the train step's network (opt-in, for GPUs; compiling takes minutes)")
    g.add_argument("--ema", type=float,
                   help="keep a running average of the weights with this decay (default 0.999, measured better: "
                   "see docs/defaults.md; 0: the last step's weights, the paper's)")
    g = p.add_argument_group("network")
    g.add_argument("--depth", type=int, default=2)
    g.add_argument("--features", type=int, default=32, help="feature maps at the top level (paper: 32, 96 for natural images)")
    g.add_argument("--kernel-size", type=int, default=3)
    g.add_argument("--n2v2", action="store_true", help="N2V2: no top skip, blur-pool, median replacement")
    g.add_argument("--independent-channels", dest="independent_channels", action="store_true", default=True,
                   help="one network shared by the channels, each denoised on its own (default: nothing bleeds "
                   "from one channel into another)")
    g.add_argument("--joint-channels", dest="independent_channels", action="store_false",
                   help="one network sees all channels at once: can use structure the channels share, but after "
                   "short training one channel's structures may show in another")
    g = p.add_argument_group("masking")
    g.add_argument("--mask-density", type=float,
                   help="fraction of masked pixels (default 1/64, the paper's)")
    g.add_argument("--replacement", choices=["uniform", "median"],
                   help="value put into a masked pixel: median, the 5x5 neighbourhood's median without the centre "
                   "(N2V2's; default, measured better: see docs/defaults.md), or uniform, a random other pixel "
                   "of the neighbourhood (the N2V paper's)")
    g.add_argument("--paper", action="store_true",
                   help="the N2V paper's settings where ours differ: uniform replacement, joint channels, no early "
                   "stopping (an option given explicitly still wins)")
    g.add_argument("--struct-span", type=int, default=0, help="structN2V: length of the masked line (odd; 0 off)")
    g.add_argument("--struct-axes", default="x", help="structN2V line axes, e.g. x or yx (default x)")
    g = p.add_argument_group("sampler")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of blocks held out (default 0.1; fixed when training starts)")
    g.add_argument("--buffer-mb", type=float, default=256, help="decoded-block buffer per stream in MiB (default 256)")
    g.add_argument("--min-std", type=float, help="foreground filter: skip patches with a lower std (input units)")
    g.add_argument("--val-by", choices=["block", "image"],
                   help="collections: hold out --val-fraction of the blocks of every image, or of the images "
                   "(default block; fixed when training starts)")
    g.add_argument("--normalize-per", choices=["image", "collection"],
                   help="collections: each image normalised by its own statistics, or all by the collection's "
                   "(default image, measured better; predict then normalises each input by its own; fixed when "
                   "training starts)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events to MODEL_DIR/tensorboard (pip install 'n2v-chunked[tensorboard]'); "
                   "training.png, training.csv and preview.png are always written")
    _add_allow_unvalidated(p, "--init-from: start from")
    _add_progress(p)

    add_storage_options(p)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    """``n2v-chunked train``: the configs from the options (or the stored ones on resume), then fit."""
    from ..io.convert import parse_int_list
    from ..model.config import MaskConfig, ModelConfig, TrainConfig, chosen
    from ..training.fit import fit

    if args.tensorboard:  # before any work
        from ..training.plots import require_tensorboard

        require_tensorboard()
    def option(name: str, default: object) -> object:
        return chosen(name, getattr(args, name), args.paper, default)

    model_cfg = ModelConfig(depth=args.depth, features=args.features, kernel_size=args.kernel_size,
                            n2v2=args.n2v2, independent_channels=args.independent_channels and not args.paper)
    mask_cfg = MaskConfig(density=option("mask_density", MaskConfig.density), struct_span=args.struct_span, struct_axes=list(args.struct_axes),
                          replacement=option("replacement", MaskConfig.replacement))
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, patch_size=list(parse_int_list(args.patch, "--patch") or []),
                            lr=option("lr", TrainConfig.lr), schedule=args.schedule, val_interval=args.val_interval,
                            precision=args.precision,
                            checkpoint_interval=args.checkpoint_interval,
                            time_budget=60.0 * args.minutes, seed=args.seed, num_workers=args.workers,
                            stop_patience=option("stop_patience", TrainConfig.stop_patience), compile=args.compile,
                            ema=option("ema", TrainConfig.ema))
    if args.resume and args.init_from is None:  # nothing to resume: a new model, said in one line
        from ..model import checkpoint as ckpt

        args.resume = ckpt.resume_or_start(args.model_dir, args.resume)
    if args.resume:  # the stored settings, changed only where an option was given (or refused)
        model_cfg, mask_cfg, train_cfg = _resumed_configs(args, model_cfg, mask_cfg, train_cfg)
    res = fit(args.input, args.model_dir, axes=args.axes, level=args.level, dims=args.dims,
              model_cfg=model_cfg, mask_cfg=mask_cfg, train_cfg=train_cfg, resume=args.resume,
              device=args.device,
              val_fraction=args.val_fraction if "val_fraction" in args.given or not args.resume else None,
              buffer_bytes=int(args.buffer_mb * 2**20),
              min_std=args.min_std, progress=not args.no_progress, init_from=args.init_from,
              tensorboard=args.tensorboard, allow_unvalidated=args.allow_unvalidated, select=args.select,
              normalize_per=args.normalize_per, val_by=args.val_by)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary from rank 0
        print(f"trained {res.step} steps in {res.seconds:.0f} s ({res.patches_per_second:.0f} patches/s); "
              f"best validation loss {res.best_val_loss:.4f}; model in {res.model_dir}")
        if res.not_learned:
            print(f"n2v-chunked: warning: {res.not_learned}", file=sys.stderr)
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image: format, axes, shape, chunks, levels, scale, size",
        description="Describe any readable image (OME-Zarr, Zarr, TIFF / OME-TIFF, folder or glob of TIFFs, "
        "fsspec URL) without reading its pixels: format and NGFF version, axes, shape, dtype, chunks and "
        "shards, resolution levels, pixel size, and size on disk vs in memory.",
        epilog="examples:\n  n2v-chunked info data/volume.ome.zarr\n  n2v-chunked info stack.tif --axes zyx\n"
        "  n2v-chunked info 's3://bucket/image.zarr' --level 2\n  n2v-chunked info plate.ome.zarr --select 'B3,C*'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="image path, folder, glob or URL; or a collection: HCS plate, bioformats2raw "
                   "container, folder or glob of images")
    p.add_argument("--axes", help=AXES_HELP)
    p.add_argument("--level", type=int, default=0, help="resolution level to describe (default: 0)")
    p.add_argument("--select", metavar="PATTERNS",
                   help="images of a collection to list, comma-separated globs: wells (B3,C*), fields (B3/0, */1), "
                   "series (0,2-5 or a series name), or file names (*.tif)")

    def handler(args: argparse.Namespace) -> int:
        from ..errors import CollectionError
        from ..io.collections import open_collection
        from ..io.convert import format_collection, format_info, info

        if args.select is None:
            try:
                print(format_info(info(args.path, axes=args.axes, level=args.level)))
                return 0
            except CollectionError:  # a plate, container or folder of images: list it instead
                pass
        print(format_collection(open_collection(args.path, axes=args.axes, level=args.level, select=args.select)))
        return 0

    add_storage_options(p)
    p.set_defaults(handler=handler)


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert any readable image to OME-Zarr (lazily, in bounded memory)",
        description="Convert an image (OME-Zarr, Zarr, TIFF / OME-TIFF, folder or glob of TIFFs, fsspec URL) "
        "to OME-Zarr, streaming it chunk by chunk with dask so that memory stays bounded whatever the size. "
        "Axes, pixel sizes, units and translation are copied; a multiscale pyramid is added unless "
        "--no-pyramid. The output is marked complete only once everything is written.",
        epilog="examples:\n  n2v-chunked convert stack.tif stack.ome.zarr --axes zyx --chunks 32,256,256\n"
        "  n2v-chunked convert frames/ movie.ome.zarr --ngff 0.4\n"
        "  n2v-chunked convert big.tif big.ome.zarr --chunks 1,256,256 --shards 16,2048,2048",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="input image path, folder, glob or URL")
    p.add_argument("output", help="output OME-Zarr path")
    p.add_argument("--axes", help=AXES_HELP)
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale input (default: 0)")
    p.add_argument("--chunks", help="output chunk shape in tczyx order, e.g. 1,256,256 (default: about 2 MiB)")
    p.add_argument("--shards", help="Zarr v3 shard shape, a multiple of the chunks (NGFF 0.5 only)")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5",
                   help="NGFF version: 0.5 = Zarr v3 (default), 0.4 = Zarr v2")
    p.add_argument("--dtype", help="output data type, e.g. float32 or uint16 (default: keep the input's); "
                   "integers are rounded and clipped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Zarr output")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only")
    _add_progress(p)

    def handler(args: argparse.Namespace) -> int:
        import os

        import zarr

        from ..io.convert import convert, human_bytes, info, parse_int_list
        from ..io.pyramid import MAX_THREADS

        t0 = time.perf_counter()

        # dask already runs one block per thread; zarr's own default pool
        # (cpu + 4 threads) would only add buffers, so match it to dask's.
        zarr.config.set({"threading.max_workers": min(os.cpu_count() or 1, MAX_THREADS)})
        out = convert(
            args.input,
            args.output,
            axes=args.axes,
            level=args.level,
            chunks=parse_int_list(args.chunks, "--chunks"),
            shards=parse_int_list(args.shards, "--shards"),
            ngff_version=str(args.ngff),
            dtype=args.dtype,
            overwrite=args.overwrite,
            pyramid=not args.no_pyramid,
            progress=not args.no_progress,
        )
        d = info(out)
        print(f"n2v-chunked: wrote {out}: axes {d['axes']}, shape {' x '.join(map(str, d['shape']))}, {d['dtype']}, "
              f"{len(d['levels'])} level(s), {human_bytes(d['bytes_on_disk'])} on disk, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        return 0

    add_storage_options(p)
    p.set_defaults(handler=handler)


class _Choices:
    """A prediction option's allowed values, read from :class:`~n2v_chunked.prediction.options.PredictOptions` on use.

    Declared once there; read lazily so that building the parser imports no torch.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _values(self) -> tuple[str, ...]:
        from ..prediction.options import choices

        return choices(self.name)

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Any:
        return iter(self._values())


def add_predict(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` subcommand: one declaration per option; :func:`_run_predict` runs it."""
    p = sub.add_parser(
        "predict",
        help="denoise an image of any size block by block into OME-Zarr",
        description="Denoise an image (OME-Zarr, Zarr, TIFF, folder of TIFFs, URL) with a trained model, "
        "block by block with dask map_overlap: each block is extended by the network's receptive field "
        "(the halo) so the result equals whole-image prediction. Blocks are written to OME-Zarr as they "
        "finish; the output is marked complete only when every block and the pyramid are written, and "
        "--resume finishes an interrupted run. While it runs, OUTPUT.lock keeps a second run off the same "
        "output (a lock left by a killed run is taken over). By default a local dask cluster runs the blocks "
        "and its dashboard link is printed.",
        epilog="examples:\n"
        "  n2v-chunked predict noisy.ome.zarr denoised.ome.zarr --model-dir models/n2v\n"
        "  n2v-chunked predict movie.tif out.ome.zarr --model-dir m --axes tyx --chunks 1,512,512\n"
        "  n2v-chunked predict big.ome.zarr out.ome.zarr --model-dir m --resume\n"
        "  n2v-chunked predict plate.ome.zarr denoised-plate.ome.zarr --model-dir m --select 'B3,C*'\n"
        "  n2v-chunked predict big.ome.zarr out.ome.zarr --model-dir m --scheduler tcp://10.0.0.5:8786\n"
        "  n2v-chunked predict big.ome.zarr out.ome.zarr --model-dir m --scheduler slurm "
        "--jobqueue-config my-jobqueue.yaml --jobs 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="input image path, folder, glob or URL; or a collection: HCS plate, bioformats2raw "
                   "container, folder or glob of images")
    p.add_argument("output", help="output OME-Zarr path (for a collection: a plate, container or folder of the same "
                   "layout)")
    p.add_argument("--select", metavar="PATTERNS",
                   help="images of a collection to predict, comma-separated globs: wells (B3,C*), fields (B3/0, */1), "
                   "series (0,2-5 or a series name), or file names (*.tif)")
    p.add_argument("--model", "--model-dir", dest="model_dir", required=True, metavar="PATH",
                   help="model directory written by training, or a BioImage Model Zoo package (.zip, or a folder "
                   "holding rdf.yaml / bioimageio.yaml)")
    p.add_argument("--halo", metavar="N",
                   help="Zoo models: halo in pixels (one, or one per spatial axis zyx) when the package declares none")
    p.add_argument("--chunks", help="working and output chunks, one per axis in tczyx order (e.g. 1,512,512) "
                   "or one per spatial axis (default: sized to memory, multiples of 2**depth)")
    p.add_argument("--scheduler", default="local",
                   help="local (a LocalCluster, default), tcp://HOST:PORT (join a running scheduler), "
                   "slurm (dask-jobqueue), threads or sync (in this process)")
    p.add_argument("--jobqueue-config", metavar="PATH", help="dask-jobqueue YAML for --scheduler slurm")
    p.add_argument("--jobs", type=int, help="number of SLURM worker jobs for --scheduler slurm")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run, skipping written blocks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Zarr output")
    p.add_argument("--tta", action="store_true", help="average the 8 rotations/flips of the YX plane (8x slower)")
    p.add_argument("--blend", action="store_true",
                   help="mix in the noisy input with the model's noise-aware weight (higher PSNR, some grain)")
    p.add_argument("--axes", help=AXES_HELP)
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale input (default: 0)")
    p.add_argument("--ngff", choices=_Choices("ngff_version"), default=None,
                   help="NGFF version: 0.5 = Zarr v3 (default), 0.4 = Zarr v2")
    p.add_argument("--dtype", default="float32",
                   help="output data type (default: float32); integers are rounded and clipped")
    p.add_argument("--boundary", choices=_Choices("boundary"), default=None,
                   help="how to extend the image at its borders (default: reflect)")
    p.add_argument("--precision", choices=_Choices("precision"), default=None,
                   help="network arithmetic (default auto: bf16 on CPUs with AVX-512 BF16/AMX and on GPUs "
                   "with bf16, else fp32; bf16 is within 0.01 dB of fp32 on BSD68 and nuclei; fp32 for "
                   "bit-for-bit needs)")
    p.add_argument("--runtime", choices=_Choices("runtime"), default=None,
                   help="engine of the network (default auto: OpenVINO on CPU when installed, else ONNX Runtime "
                   "for fp32, else PyTorch; PyTorch on GPUs); OpenVINO installs with n2v-chunked, ONNX Runtime "
                   "with pip install 'n2v-chunked[cpu]'; torch-compile: PyTorch through torch.compile, opt-in "
                   "(compiles each block shape once; not measured to win yet)")
    p.add_argument("--normalize", choices=_Choices("normalize"), default=None,
                   help="model: normalise with the training data's statistics (default; a warning when the input's "
                   "are far from them); data: with the input's own, sampled once per run, for data whose noise is "
                   "of the same kind in another intensity range")
    p.add_argument("--batch-blocks", type=int, help="blocks per submitted dask graph (default: 512)")
    p.add_argument("--device", help="torch device of the workers (default: cuda when available, else cpu)")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only")
    p.add_argument("--preview", action="store_true",
                   help="also write OUTPUT.preview.png: the middle slice, noisy | denoised")
    _add_allow_unvalidated(p, "predict with")
    _add_progress(p)

    add_storage_options(p)
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    """``n2v-chunked predict``: the options object from the command line, then predict and a summary line."""
    import xarray as xr

    from ..io.convert import parse_int_list
    from ..prediction import PredictOptions, predict
    from ..prediction.run import is_collection

    named = {"boundary": "boundary", "precision": "precision", "runtime": "runtime", "ngff_version": "ngff",
             "normalize": "normalize"}
    given = {k: getattr(args, a) for k, a in named.items() if getattr(args, a) is not None}
    opts = PredictOptions(  # options left out take PredictOptions' defaults, the same as Python's predict()
        **given,
        chunks=parse_int_list(args.chunks, "--chunks"),
        tta=args.tta,
        blend=args.blend,
        resume=args.resume,
        overwrite=args.overwrite,
        scheduler=args.scheduler,
        dtype=args.dtype,
        axes=args.axes,
        level=args.level,
        batch_blocks=args.batch_blocks,
        progress=not args.no_progress,
        device=args.device,
        pyramid=not args.no_pyramid,
        jobqueue_config=args.jobqueue_config,
        jobs=args.jobs,
        halo=parse_int_list(args.halo, "--halo", minimum=0),
        allow_unvalidated=args.allow_unvalidated,
        select=args.select,
    )
    if args.preview and (args.select is not None or is_collection(args.input, opts)):
        raise ConfigError("--preview shows one image: drop it for a collection (n2v-chunked info lists its images)")
    out = predict(args.input, args.output, args.model_dir, opts)
    if not isinstance(out, xr.DataArray):  # a collection, written in its own layout
        print(f"n2v-chunked: wrote {args.output}: {len(out.images)} images ({out.kind}), {out.blocks_computed} "
              f"block(s) computed, {out.blocks_skipped} skipped, {out.seconds:.1f} s", flush=True)
        return 0
    if args.preview:
        from ..io.sources import open_image
        from ..prediction.preview import write_predict_preview

        shown = write_predict_preview(args.output, open_image(args.input, axes=args.axes, level=args.level), out)
        if shown is not None:
            print(f"n2v-chunked: preview (noisy | denoised, middle slice): {shown}", flush=True)
    s = out.attrs.get("predict_stats", {})
    print(f"n2v-chunked: wrote {args.output}: {s.get('blocks_computed', 0)} block(s) computed, "
          f"{s.get('blocks_skipped', 0)} skipped of {s.get('blocks_total', 0)}, "
          f"{s.get('mpix_per_s', 0.0):.2f} MPix/s, {s.get('seconds', 0.0):.1f} s"
          f"{' (' + s['runtime'] + ')' if s.get('runtime') else ''}", flush=True)
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model directory as a BioImage Model Zoo package (.zip)",
        description="Export a trained model as a BioImage Model Zoo package (model description format 0.5): "
        "pytorch_state_dict weights with a self-contained architecture file and torchscript weights, "
        "fixed normalisation, the output halo, test tensors, a cover and a README. Fiji/deepImageJ, ilastik, "
        "napari and `bioimageio predict` open it; `n2v-chunked predict --model` and `train --init-from` read it "
        "back. Needs the zoo extra (pip install 'n2v-chunked[zoo]').",
        epilog="example:\n  n2v-chunked export --model-dir models/n2v n2v_model.zip --author 'Ada Lovelace' --license CC-BY-4.0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("output", help="package to write (.zip)")
    p.add_argument("--model-dir", required=True, help="model directory written by training")
    p.add_argument("--name", help="model name (default: N2V <dims>D <model id>)")
    p.add_argument("--author", action="append", default=[], help="author name (repeat for several)")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX licence id (default: CC-BY-4.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    _add_allow_unvalidated(p, "export")

    def handler(args: argparse.Namespace) -> int:
        from ..zoo.export import export

        out = export(args.model_dir, args.output, name=args.name, authors=args.author, license=args.license,
                     overwrite=args.overwrite, allow_unvalidated=args.allow_unvalidated)
        print(f"n2v-chunked: wrote {out}", flush=True)
        return 0

    p.set_defaults(handler=handler)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo, add_train, add_info, add_convert, add_predict,
                                                                   add_export]


# ----------------------------------------------------------------------------
# Plumbing.
# ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors instead of a usage dump."""

    def error(self, message: str) -> Any:  # argparse's signature; never returns
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _glue_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--chunks -8,32,32`` -> ``--chunks=-8,32,32``.

    argparse takes a value starting with ``-`` for an option unless it is a
    plain number, so a negative size in a list would give "expected one
    argument"; glued, it reaches the option's own check, which says what is wrong.
    """
    takes_value = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.option_strings and action.nargs != 0:
                takes_value.update(action.option_strings)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in takes_value and i + 1 < len(argv) and re.match(r"-[\d.]", argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per command."""
    parser = _Parser(
        prog="n2v-chunked",
        description="Noise2Void denoising of terabyte-scale microscopy volumes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    parser.add_argument("--config", metavar="YAML", help="read option defaults from this YAML file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _quiet_on_ctrl_c() -> None:
    """Ctrl-C first quiets dask's shutdown chatter, then interrupts as usual."""
    import signal
    import threading

    from .logs import quiet_shutdown

    def on_int(signum: int, frame: Any) -> None:
        quiet_shutdown()
        signal.default_int_handler(signum, frame)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_int)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``n2v-chunked`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    from ..io import objects, stores

    stores.remember_secrets()
    url = next((a for a in argv if stores.protocol(a)), "the object store")
    try:
        top = apply_config_file(parser, argv)
        glued = _glue_negative_values(parser, argv)
        args = parser.parse_args(glued)
        # what train --resume was asked to change (the one command that needs it: a second parse)
        args.given = given_options(parser, glued, args) if args.command == "train" else frozenset()
        from ..cluster.progress import set_interval
        from .logs import setup_logging

        setup_logging(verbose=args.verbose, debug=args.debug)
        _quiet_on_ctrl_c()
        stores.install_log_redaction()
        set_interval(getattr(args, "progress_interval", None))
        configure_stores(args, top)
        return int(args.handler(args) or 0)
    except N2VError as exc:
        if debug:
            raise
        what = "" if exc.exit_code in (130, PREEMPTED_EXIT) else "error: "  # interrupted or stopped: no mistake
        print(f"n2v-chunked: {what}{stores.redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("n2v-chunked: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        problem = stores.store_problem(exc, url)  # a refused bucket or credentials is the user's to fix
        if problem is not None:
            print(f"n2v-chunked: error: {stores.redact(problem)}", file=sys.stderr)
            return 2
        if environment_problem(exc):  # the machine (disk, memory, a lost worker), not our code
            print(f"n2v-chunked: error: {type(exc).__name__}: {stores.redact(first_line(exc))}", file=sys.stderr)
            return 2
        print(stores.redact(traceback.format_exc()), end="", file=sys.stderr)  # a bug: what a report needs
        print(f"n2v-chunked: internal error (a bug): {type(exc).__name__}: {stores.redact(first_line(exc))}; "
              "please report it with the traceback above", file=sys.stderr)
        return INTERNAL_ERROR_EXIT
    finally:
        objects.unconfigure()
