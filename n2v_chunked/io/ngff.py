"""NGFF metadata of an OME-Zarr group: ``multiscales`` entries, read and written
(0.5 under ``attributes["ome"]``, 0.4 at the top level), and opening the group."""

from __future__ import annotations

from typing import Any, Sequence

import zarr

from ..errors import InputNotFoundError, N2VError, UnreadableDataError
from .metadata_axes import AXIS_TYPES
from . import objects


def open_group(path: str, mode: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Open the OME-Zarr group at ``path`` (local path or URL); a one-line error if none."""
    try:
        return zarr.open_group(store=objects.zarr_store(path, read_only=mode == "r", options=storage_options), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
        raise InputNotFoundError(f"no Zarr group at {path}: {type(exc).__name__}") from None
    except PermissionError as exc:
        raise N2VError(f"cannot open {path} for writing: {exc.strerror or exc}") from None


def multiscales_entry(
    dims: Sequence[str], units: dict[str, str], datasets: list[dict[str, Any]], name: str | None, version: str
) -> dict[str, Any]:
    """A ``multiscales`` entry: axes with their NGFF types and units, the datasets."""
    axes = []
    for d in dims:
        ax: dict[str, Any] = {"name": d, "type": AXIS_TYPES[d]}
        if d in units and d != "c":
            ax["unit"] = units[d]
        axes.append(ax)
    entry: dict[str, Any] = {"axes": axes, "datasets": datasets}
    if name:
        entry["name"] = name
    if version == "0.4":
        entry = {"version": "0.4", **entry}
    return entry


def dataset_entry(path: str, scale: Sequence[float], translation: Sequence[float]) -> dict[str, Any]:
    """A ``datasets`` item: the level's path, scale and (when not zero) translation."""
    ct: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if any(t != 0 for t in translation):
        ct.append({"type": "translation", "translation": [float(t) for t in translation]})
    return {"path": path, "coordinateTransformations": ct}


def ome_metadata(attrs: dict[str, Any], key: str) -> tuple[Any, str | None]:
    """The NGFF ``key`` entry of a group's attributes (``plate``, ``well``, ``series``,
    ``bioformats2raw.layout``, ...) and its NGFF version: under ``ome`` in 0.5, at the
    top level in 0.4 (where a ``plate`` or ``well`` carries its own ``version``).

    Returns
    -------
    tuple
        ``(value, version)``; ``(None, None)`` where the attributes have no ``key``.
    """
    ome = attrs.get("ome")
    if isinstance(ome, dict) and key in ome:
        return ome[key], str(ome.get("version", "0.5"))
    if key not in attrs:
        return None, None
    value = attrs[key]
    version = value.get("version") if isinstance(value, dict) else None
    return value, str(version) if version is not None else None


def read_multiscales(group: Any) -> tuple[dict[str, Any], str]:
    """The first multiscales entry of an OME-Zarr group and its NGFF version."""
    attrs = group.attrs.asdict()
    if isinstance(attrs.get("ome"), dict) and attrs["ome"].get("multiscales"):
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if attrs.get("multiscales"):
        return attrs["multiscales"][0], str(attrs["multiscales"][0].get("version", "0.4"))
    raise UnreadableDataError(f"{group.store} has no OME-Zarr multiscales metadata")


def multiscales_attrs(entry: dict[str, Any], version: str) -> dict[str, Any]:
    """Group attributes holding ``entry`` for NGFF ``version``."""
    if version == "0.4":
        return {"multiscales": [entry]}
    entry = {k: v for k, v in entry.items() if k != "version"}
    return {"ome": {"version": "0.5", "multiscales": [entry]}}


def write_multiscales(group: Any, entry: dict[str, Any], version: str) -> None:
    """Write ``entry`` into the group's attributes for NGFF ``version``."""
    group.attrs.update(multiscales_attrs(entry, version))
