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
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget in minutes (default: 2)")
    p.add_argument("--steps", type=int, default=400, help="maximum training steps (default: 400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    def handler(args: argparse.Namespace) -> int:
        from .demo import run_demo

        run_demo(args.out, minutes=args.minutes, steps=args.steps, seed=args.seed, overwrite=args.overwrite)
        return 0

    p.set_defaults(handler=handler)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo]


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
