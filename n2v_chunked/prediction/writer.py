"""The writer: each block's task stores its own (whole) output chunks, then a marker.

Blocks are written by the tasks that compute them, chunk-aligned (no two tasks
touch one stored chunk), each followed by a marker file
``<output>/.n2v_blocks/<i>_<j>...`` that a resumed run uses to skip finished
blocks (:func:`done_blocks`).  With :data:`DURABLE` a block's chunks reach the
disk before its marker, so a marker never outlives its data.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any, Sequence

import numpy as np
import zarr

from ..errors import N2VError
from ..io.durable import sync_region, sync_tree, write_marker
from ..io.pyramid import cast_block
from ..io import objects
from ..io.stores import is_url, location, summary, with_retries

MARKER_DIR = ".n2v_blocks"  # hidden: OME-Zarr readers only follow the multiscales datasets
# zarr warns of the marker folder when it lists a group's members (the pyramid does); catch_warnings there is
# not thread-safe, and the images of a collection are written by several threads at once
warnings.filterwarnings("ignore", message=f"Object at {MARKER_DIR} is not recognized", category=UserWarning)
DURABLE = True  # fsync each block's chunks before its marker, the rest before the flag (local files): io/durable.py

_OUTPUTS: dict[str, tuple[str, Any]] = {}
_OUTPUTS_LOCK = threading.Lock()


def _output_array(path: str, run_id: str) -> Any:
    """Level 0 of the output, opened once per process and run."""
    cached = _OUTPUTS.get(path)
    if cached is None or cached[0] != run_id:
        with _OUTPUTS_LOCK:
            cached = _OUTPUTS.get(path)
            if cached is None or cached[0] != run_id:
                cached = (run_id, zarr.open_array(store=objects.zarr_store(f"{path.rstrip('/')}/0"), mode="r+"))
                _OUTPUTS[path] = cached
    return cached[1]


def marker_dir(path: str) -> str:
    """The marker folder of output ``path``."""
    return f"{location(path).rstrip('/')}/{MARKER_DIR}"


def _marker_name(index: Sequence[int]) -> str:
    return "_".join(str(int(i)) for i in index)


def done_blocks(path: str | os.PathLike[str]) -> set[tuple[int, ...]]:
    """Grid indices of the blocks an unfinished run has written (their markers)."""
    out = set()
    for name in objects.listdir(marker_dir(str(path))):
        with contextlib.suppress(ValueError):
            out.add(tuple(int(v) for v in name.split("_")))
    return out


def sync_output(path: str, **kwargs: Any) -> None:
    """:func:`~n2v_chunked.io.durable.sync_tree` of a local output (object stores need none)."""
    if DURABLE and not is_url(path):
        sync_tree(path, **kwargs)


def remove_markers(path: str) -> None:
    """Delete the marker folder (once the output is complete)."""
    objects.remove_tree(marker_dir(path))


def has_output(path: str) -> bool:
    """Whether anything is stored at ``path`` (a run killed before its metadata leaves nothing, or an empty folder)."""
    return bool(objects.listdir(path, 1)) or objects.is_file(path)


def has_level0(path: str) -> bool:
    """Whether level 0 of the output exists (a kill may have come before it)."""
    try:
        zarr.open_array(store=objects.zarr_store(f"{path.rstrip('/')}/0", read_only=True), mode="r")
    except Exception:  # no array metadata there (zarr raises several types for that)
        return False
    return True


def write_task(
    block: np.ndarray, block_info: dict | None = None, *, path: str, run_id: str, lo: Sequence[int],
    offset: Sequence[int], channels: int,
) -> np.ndarray:
    """Store one predicted block in its (whole) output chunks, then mark it done."""
    info = block_info[0]
    region = tuple(slice(o + s, o + e) for o, (s, e) in zip(offset, info["array-location"]))
    index = tuple(l + c for l, c in zip(lo, info["chunk-location"]))

    def write() -> None:
        arr = _output_array(path, run_id)
        arr[region] = cast_block(block, arr.dtype)
        if DURABLE:  # the marker must never outlive its data, even across a node loss
            sync_region(arr, region)
        write_marker(f"{marker_dir(path)}/{_marker_name(index)}")  # only after the data is in the store

    try:  # transient store errors are retried with back-off; the marker comes last, so a retry is safe
        with_retries(write, f"block {index}: writing {path}")
    except N2VError:
        raise
    except Exception as exc:  # the store: disk full, permissions, network
        if not objects.is_store_error(exc):
            raise
        raise N2VError(f"block {index}: cannot write {path}: {type(exc).__name__}: {summary(exc)}") from exc
    return np.full((1,) * block.ndim, block.size // channels, dtype=np.int64)
