"""The ``n2v-chunked`` command line.

Every subcommand is a thin layer over a library function: parse, call, print.
Options can also come from a YAML file (``--config``), one section per
subcommand, e.g.::

    predict:
      chunks: [1, 512, 512]
      scheduler: slurm

Errors a user can cause are :class:`~n2v_chunked.errors.N2VError`: one line on
stderr and a non-zero exit.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .errors import N2VError

log = logging.getLogger("n2v_chunked")

Handler = Callable[[argparse.Namespace], int | None]


# ----------------------------------------------------------------------------
# Subcommands.  Each has an ``add_<name>`` that declares its options and sets
# ``handler``; the handler imports its library module lazily so that
# ``n2v-chunked --help`` starts in well under a second.
# ----------------------------------------------------------------------------


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
        "  torchrun --nproc_per_node=4 -m n2v_chunked.cli train big.ome.zarr --model-dir models/big",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="OME-Zarr, Zarr, TIFF file/folder/glob, or fsspec URL")
    p.add_argument("--model-dir", required=True, help="directory for the model and its checkpoints")
    p.add_argument("--axes", help="axes of inputs whose metadata has none, e.g. tyx or czyx")
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale OME-Zarr (default 0)")
    p.add_argument("--dims", type=int, choices=[2, 3], help="model dimensionality (default: 3 if the data has z)")
    p.add_argument("--resume", action="store_true", help="continue training the model in --model-dir")
    g = p.add_argument_group("schedule (defaults: the paper's settings)")
    g.add_argument("--steps", type=int, default=2000, help="total optimiser steps (default 2000)")
    g.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    g.add_argument("--batch-size", type=int, default=128, help="patches per step (default 128)")
    g.add_argument("--patch", help="patch shape, e.g. 64,64 or 32,32,32 (default fits the data)")
    g.add_argument("--lr", type=float, default=4e-4, help="Adam learning rate (default 4e-4)")
    g.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau",
                   help="plateau: halve the rate when validation stalls (paper, default); cosine: warm up, "
                   "then decay to 0 at the end of --steps or --minutes")
    g.add_argument("--val-interval", type=int, default=100, help="steps between validations (default 100)")
    g.add_argument("--checkpoint-interval", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware supports it (default)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    g = p.add_argument_group("network")
    g.add_argument("--depth", type=int, default=2)
    g.add_argument("--features", type=int, default=32, help="feature maps at the top level (paper: 32, 96 for natural images)")
    g.add_argument("--kernel-size", type=int, default=3)
    g.add_argument("--n2v2", action="store_true", help="N2V2: no top skip, blur-pool, median replacement")
    g.add_argument("--independent-channels", action="store_true", help="denoise channels independently")
    g = p.add_argument_group("masking")
    g.add_argument("--mask-density", type=float, default=1 / 64, help="fraction of masked pixels (paper: 1/64)")
    g.add_argument("--replacement", choices=["uniform", "median"],
                   help="value put into a masked pixel: uniform, a random other pixel of its 5x5 neighbourhood "
                   "(N2V paper, default), or median, the neighbourhood's median without the centre (default with --n2v2)")
    g.add_argument("--struct-span", type=int, default=0, help="structN2V: length of the masked line (odd; 0 off)")
    g.add_argument("--struct-axes", default="x", help="structN2V line axes, e.g. x or yx (default x)")
    g = p.add_argument_group("sampler")
    g.add_argument("--val-fraction", type=float, default=0.1, help="fraction of blocks held out (default 0.1)")
    g.add_argument("--buffer-mb", type=float, default=256, help="decoded-block buffer per stream in MiB (default 256)")
    g.add_argument("--min-std", type=float, help="foreground filter: skip patches with a lower std (input units)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(args: argparse.Namespace) -> int:
        from .config import MaskConfig, ModelConfig, TrainConfig, default_replacement
        from .convert import parse_int_list
        from .train import fit

        model_cfg = ModelConfig(depth=args.depth, features=args.features, kernel_size=args.kernel_size,
                                n2v2=args.n2v2, independent_channels=args.independent_channels)
        mask_cfg = MaskConfig(density=args.mask_density, struct_span=args.struct_span,
                              struct_axes=list(args.struct_axes), replacement=args.replacement or default_replacement(args.n2v2))
        train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, patch_size=list(parse_int_list(args.patch, "--patch") or []),
                                lr=args.lr, schedule=args.schedule, val_interval=args.val_interval,
                                precision=args.precision,
                                checkpoint_interval=args.checkpoint_interval,
                                time_budget=60.0 * args.minutes, seed=args.seed, num_workers=args.workers)
        res = fit(args.input, args.model_dir, axes=args.axes, level=args.level, dims=args.dims,
                  model_cfg=model_cfg, mask_cfg=mask_cfg, train_cfg=train_cfg, resume=args.resume,
                  device=args.device, val_fraction=args.val_fraction, buffer_bytes=int(args.buffer_mb * 2**20),
                  min_std=args.min_std, progress=not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary from rank 0
            print(f"trained {res.step} steps in {res.seconds:.0f} s ({res.patches_per_second:.0f} patches/s); "
                  f"best validation loss {res.best_val_loss:.4f}; model in {res.model_dir}")
        return 0

    p.set_defaults(handler=handler)


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image: format, axes, shape, chunks, levels, scale, size",
        description="Describe any readable image (OME-Zarr, Zarr, TIFF / OME-TIFF, folder or glob of TIFFs, "
        "fsspec URL) without reading its pixels: format and NGFF version, axes, shape, dtype, chunks and "
        "shards, resolution levels, pixel size, and size on disk vs in memory.",
        epilog="examples:\n  n2v-chunked info data/volume.ome.zarr\n  n2v-chunked info stack.tif --axes zyx\n"
        "  n2v-chunked info 's3://bucket/image.zarr' --level 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="image path, folder, glob or URL")
    p.add_argument("--axes", help="axis letters from tczyx in stored order, for sources without metadata (e.g. zyx)")
    p.add_argument("--level", type=int, default=0, help="resolution level to describe (default: 0)")

    def handler(args: argparse.Namespace) -> int:
        from .convert import format_info, info

        print(format_info(info(args.path, axes=args.axes, level=args.level)))
        return 0

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
    p.add_argument("--axes", help="axis letters from tczyx in stored order, for inputs without metadata (e.g. zyx)")
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale input (default: 0)")
    p.add_argument("--chunks", help="output chunk shape in tczyx order, e.g. 1,256,256 (default: about 2 MiB)")
    p.add_argument("--shards", help="Zarr v3 shard shape, a multiple of the chunks (NGFF 0.5 only)")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5",
                   help="NGFF version: 0.5 = Zarr v3 (default), 0.4 = Zarr v2")
    p.add_argument("--dtype", help="output data type, e.g. float32 or uint16 (default: keep the input's); "
                   "integers are rounded and clipped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Zarr output")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(args: argparse.Namespace) -> int:
        import os

        import zarr

        from .convert import convert, parse_int_list
        from .ome import MAX_THREADS

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
        log.info("wrote %s", out)
        return 0

    p.set_defaults(handler=handler)


def _int_list(text: str | None, option: str) -> list[int] | None:
    """``"1,512,512"`` -> ``[1, 512, 512]``; None stays None."""
    if text is None or isinstance(text, list):
        return text
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise N2VError(f"{option} must be comma-separated integers, e.g. 1,512,512; got {text!r}") from None


def add_predict(sub: argparse._SubParsersAction) -> None:
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
        "  n2v-chunked predict big.ome.zarr out.ome.zarr --model-dir m --scheduler tcp://10.0.0.5:8786\n"
        "  n2v-chunked predict big.ome.zarr out.ome.zarr --model-dir m --scheduler slurm "
        "--jobqueue-config my-jobqueue.yaml --jobs 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="input image path, folder, glob or URL")
    p.add_argument("output", help="output OME-Zarr path")
    p.add_argument("--model-dir", required=True, help="model directory written by training")
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
    p.add_argument("--axes", help="axis letters from tczyx in stored order, for inputs without metadata (e.g. zyx)")
    p.add_argument("--level", type=int, default=0, help="resolution level of a multiscale input (default: 0)")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5", help="NGFF version: 0.5 = Zarr v3 (default), 0.4 = Zarr v2")
    p.add_argument("--dtype", default="float32", help="output data type (default: float32); integers are rounded and clipped")
    p.add_argument("--boundary", choices=["reflect", "nearest", "periodic", "constant"], default="reflect",
                   help="how to extend the image at its borders (default: reflect)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="network arithmetic (default auto: bf16 on CPUs with AVX-512 BF16/AMX and on GPUs "
                   "with bf16, else fp32; bf16 is within 0.01 dB of fp32 on BSD68 and nuclei; fp32 for "
                   "bit-for-bit needs)")
    p.add_argument("--runtime", choices=["auto", "torch", "openvino", "onnxruntime"], default="auto",
                   help="engine of the network (default auto: OpenVINO on CPU when installed, else ONNX Runtime "
                   "for fp32, else PyTorch; PyTorch on GPUs); OpenVINO installs with n2v-chunked, ONNX Runtime "
                   "with pip install 'n2v-chunked[cpu]'")
    p.add_argument("--batch-blocks", type=int, help="blocks per submitted dask graph (default: 512)")
    p.add_argument("--device", help="torch device of the workers (default: cuda when available, else cpu)")
    p.add_argument("--no-pyramid", action="store_true", help="write level 0 only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(args: argparse.Namespace) -> int:
        from .predict import predict

        out = predict(
            args.input,
            args.output,
            args.model_dir,
            chunks=_int_list(args.chunks, "--chunks"),
            boundary=args.boundary,
            tta=args.tta,
            blend=args.blend,
            precision=args.precision,
            runtime=args.runtime,
            resume=args.resume,
            overwrite=args.overwrite,
            scheduler=args.scheduler,
            ngff_version=str(args.ngff),
            dtype=args.dtype,
            axes=args.axes,
            level=args.level,
            batch_blocks=args.batch_blocks,
            progress=not args.no_progress,
            device=args.device,
            pyramid=not args.no_pyramid,
            jobqueue_config=args.jobqueue_config,
            jobs=args.jobs,
        )
        s = out.attrs.get("predict_stats", {})
        print(f"n2v-chunked: wrote {args.output}: {s.get('blocks_computed', 0)} block(s) computed, "
              f"{s.get('blocks_skipped', 0)} skipped of {s.get('blocks_total', 0)}, "
              f"{s.get('mpix_per_s', 0.0):.2f} MPix/s, {s.get('seconds', 0.0):.1f} s"
              f"{' (' + s['runtime'] + ')' if s.get('runtime') else ''}", flush=True)
        return 0

    p.set_defaults(handler=handler)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo, add_train, add_info, add_convert, add_predict]


# ----------------------------------------------------------------------------
# Plumbing.
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one sub-parser per command."""
    parser = argparse.ArgumentParser(
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


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Use the ``--config`` YAML file's section for the chosen command as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if not known.config:
        return
    from .config import read_config_file

    data = read_config_file(known.config)
    command = next((a for a in rest if not a.startswith("-")), None)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in subparsers.choices:
        return
    sp = subparsers.choices[command]
    section: dict[str, Any] = data.get(command, {}) or {}
    if not isinstance(section, dict):
        raise N2VError(f"config file {known.config}: section '{command}' must be a mapping")
    dests = {a.dest for a in sp._actions}
    unknown = sorted(k for k in section if k.replace("-", "_") not in dests)
    if unknown:
        raise N2VError(f"config file {known.config}: unknown option(s) for '{command}': {', '.join(unknown)}")
    sp.set_defaults(**{k.replace("-", "_"): v for k, v in section.items()})
    # Positionals given in the file satisfy argparse only if they are optional there.
    for action in sp._actions:
        if action.dest in {k.replace("-", "_") for k in section} and not action.option_strings:
            action.nargs = "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``n2v-chunked`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        _apply_config_file(parser, argv)
        args = parser.parse_args(argv)
        level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(args.handler(args) or 0)
    except N2VError as exc:
        if debug:
            raise
        print(f"n2v-chunked: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("n2v-chunked: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"n2v-chunked: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
