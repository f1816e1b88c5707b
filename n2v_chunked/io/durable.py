"""Making written blocks durable before their resume markers are.

A process kill loses nothing the operating system has accepted, but a node or
power loss may drop recently written files in any order: a marker that outlives
its chunk would make ``--resume`` skip a block that then reads as the fill
value.  On a local (or network) file system the chunk files of a block are
therefore ``fsync``ed, with the folders that name them, before its marker is
written (two ``fsync`` calls per block when a block is one chunk).  Object
stores need none of this: a PUT is durable once it returns, and the marker is
put only after the block's chunks.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Sequence

from zarr.storage import LocalStore

from . import objects


def fsync_path(path: str) -> None:
    """``fsync`` a file or a folder (a folder's entries: names created in it); a missing path is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_root(arr: Any) -> str | None:
    """The folder of a Zarr array on a local file system, or None for other stores."""
    store = arr.store_path.store
    if not isinstance(store, LocalStore):
        return None
    return os.path.join(str(store.root), arr.store_path.path) if arr.store_path.path else str(store.root)


def sync_region(arr: Any, region: Sequence[slice]) -> None:
    """``fsync`` the stored chunk files that ``region`` of ``arr`` covers, and their folders.

    Chunks that hold only the fill value are not stored (nothing to sync: they
    read back correctly).  Stores that are not local files are left alone.
    """
    root = local_root(arr)
    if root is None:
        return
    ranges = [range(s.start // c, math.ceil(s.stop / c)) for s, c in zip(region, arr.chunks)]
    folders = set()
    for coords in itertools.product(*ranges):
        path = os.path.join(root, arr.metadata.encode_chunk_key(coords))
        fsync_path(path)
        folders.add(os.path.dirname(path))
    for folder in sorted(folders):
        fsync_path(folder)


def write_marker(path: str) -> None:
    """Create the empty marker ``path`` (after :func:`sync_region` of its block).

    The marker itself is not ``fsync``ed: losing it only makes ``--resume``
    recompute its block, and its data is already durable whenever it is.
    """
    objects.write(path, b"")


def sync_tree(root: str, exclude: Sequence[str] = (), recursive: bool = True) -> None:
    """``fsync`` every file and folder under the local folder ``root`` (not a URL).

    ``exclude`` names top-level entries to skip (e.g. level 0, whose chunks
    were synced block by block).  ``recursive=False`` syncs only the files
    directly in ``root`` (the group's metadata) and ``root`` itself.
    """
    if not os.path.isdir(root):
        return
    for folder, dirs, files in os.walk(root):
        if folder == root:
            dirs[:] = [d for d in dirs if d not in exclude] if recursive else []
        for name in files:
            if folder != root or name not in exclude:
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)
