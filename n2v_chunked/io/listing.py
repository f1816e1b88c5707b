"""Which images a folder, a glob or a URL prefix holds, listed from names and markers only (no image opened).

Shared by :mod:`~n2v_chunked.io.sources` (a folder of TIFFs that stack into one
image, or a set of images refused as a collection) and
:mod:`~n2v_chunked.io.collections` (a folder listed image by image).
"""

from __future__ import annotations

import fnmatch
import glob
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from . import objects
from .formats import plugin_for
from .stores import ZARR_MARKERS, is_url
from .tiff import TIFF_SUFFIXES

T = TypeVar("T")
R = TypeVar("R")

METADATA_THREADS = 32  # metadata reads in flight: on an object store each is a request that waits on latency
GLOB = re.compile(r"[*?\[]")


def natural_key(s: str) -> list[Any]:
    """Sort ``frame_2`` before ``frame_10``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", s)]


def strip_file(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name.strip('/')}"


def map_concurrently(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(i) for i in items]``, ``threads`` at a time (metadata reads wait on the store, not the CPU)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="n2v-list") as pool:
        futures = [pool.submit(fn, i) for i in items]
        try:
            return [f.result() for f in futures]
        except BaseException:  # the first failure is the answer: do not wait for reads not yet started
            for f in futures:
                f.cancel()
            raise


def is_image_file(name: str) -> bool:
    return name.lower().endswith(TIFF_SUFFIXES) or plugin_for(name) is not None


def is_local_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)


def folder_images(source: str, storage_options: dict[str, Any] | None = None,
                  threads: int = METADATA_THREADS) -> list[tuple[str, str]]:
    """``(name, path)`` of the images in a folder, URL prefix or glob, in natural order.

    Images are Zarr stores (folders with a Zarr marker) and files that
    :func:`~n2v_chunked.io.sources.open_image` reads by their suffix; hidden
    entries and anything else (notes, CSV tables) are left out.  A folder is
    not searched below its own entries; a glob may use ``**``.
    """
    s, options = strip_file(str(source)), storage_options or {}
    if is_url(s):
        parent, pattern = (s.rsplit("/", 1) if GLOB.search(s) else (s.rstrip("/"), None))
        names = [n for n in objects.listdir(parent, options=options) if not n.startswith(".")]
        if pattern is not None:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        zarrs = map_concurrently(lambda n: is_image_file(n) or bool(
            set(objects.listdir(join(parent, n), options=options)) & set(ZARR_MARKERS)), names, threads)
        found = [(n, join(parent, n)) for n, ok in zip(names, zarrs) if ok]
    elif GLOB.search(s):
        fixed = s[: GLOB.search(s).start()].rsplit("/", 1)[0] if "/" in s[: GLOB.search(s).start()] else "."
        base = Path(fixed).expanduser().resolve()
        matches = [Path(m).resolve() for m in glob.glob(s, recursive=True)]
        stores = {m for m in matches if is_local_zarr(m)}  # ``**`` also matches their arrays: not images of their own
        found = [(str(m.relative_to(base)) if m.is_relative_to(base) else str(m), str(m)) for m in matches
                 if not m.name.startswith(".") and not stores.intersection(m.parents)
                 and (m in stores or (m.is_file() and is_image_file(m.name)))]
    else:
        base = Path(s).expanduser().resolve()
        found = [(p.name, str(p)) for p in base.iterdir() if not p.name.startswith(".")
                 and (is_local_zarr(p) or (p.is_file() and is_image_file(p.name)))]
    return sorted(found, key=lambda item: natural_key(item[0]))
