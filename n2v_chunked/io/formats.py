"""Image formats beyond Zarr and TIFF, read through bioio (the optional ``[formats]`` extra).

:func:`~n2v_chunked.io.sources.open_image` reads OME-Zarr, Zarr and TIFF itself
(the fast paths).  Any other file comes here: PNG and JPEG (bioio-imageio),
OME-TIFF through bioio-ome-tiff when asked directly, and the microscope
vendors' formats (CZI, LIF, ND2, ...) when their bioio plugin is installed.
bioio reads lazily into dask, with the dims and physical pixel sizes from
the file's metadata.  Without bioio, or without the plugin a file needs, the
user gets one line naming what to install.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from ..errors import AxesError, ConfigError, UnreadableDataError, first_line
from .readers import Raw, SourceInfo

log = logging.getLogger(__name__)

#: The extra that installs bioio and the plugins for common formats.
EXTRA = "pip install 'n2v-chunked[formats]'"

#: File suffix -> the bioio plugin that reads it (the ones the ``[formats]`` extra lacks are named in messages).
PLUGINS = {
    ".png": "bioio-imageio", ".jpg": "bioio-imageio", ".jpeg": "bioio-imageio", ".gif": "bioio-imageio",
    ".bmp": "bioio-imageio",
    ".ome.tif": "bioio-ome-tiff", ".ome.tiff": "bioio-ome-tiff",
    ".czi": "bioio-czi", ".lif": "bioio-lif", ".nd2": "bioio-nd2", ".dv": "bioio-dv", ".r3d": "bioio-dv",
    ".sldy": "bioio-sldy", ".ims": "bioio-imaris", ".oib": "bioio-bioformats", ".oif": "bioio-bioformats",
    ".vsi": "bioio-bioformats", ".lsm": "bioio-tifffile",
}

#: The plugins the ``[formats]`` extra installs (pyproject.toml).
IN_EXTRA = ("bioio-imageio", "bioio-ome-tiff", "bioio-tifffile")

#: Letters bioio uses -> ours; ``S`` (RGB samples) is the channel axis when there is no other.
_DIMS = {"T": "t", "C": "c", "Z": "z", "Y": "y", "X": "x"}


def plugin_for(path: str) -> str | None:
    """The bioio plugin that reads ``path`` by its suffix, if known."""
    name = path.lower()
    for suffix in sorted(PLUGINS, key=len, reverse=True):  # .ome.tif before .tif
        if name.endswith(suffix):
            return PLUGINS[suffix]
    return None


def _installed(plugin: str) -> bool:
    return importlib.util.find_spec(plugin.replace("-", "_")) is not None


def _refusal(path: str) -> UnreadableDataError:
    """One line for a file no installed reader opens, naming what to install."""
    plugin = plugin_for(path)
    if plugin is None:
        return UnreadableDataError(f"unsupported input file {path}: expected OME-Zarr, Zarr, TIFF, or an image format "
                        f"a bioio plugin reads ({EXTRA} for PNG and JPEG; CZI, LIF, ND2 need their own plugin)")
    install = EXTRA + ("" if plugin in IN_EXTRA else f" {plugin}")
    if importlib.util.find_spec("bioio") is None:
        return UnreadableDataError(f"unsupported input file {path}: reading it needs bioio; {install}")
    if not _installed(plugin):
        return UnreadableDataError(f"unsupported input file {path}: no bioio reader for it is installed; {install}")
    return UnreadableDataError(f"cannot read {path}: {plugin} is installed but cannot read it (a damaged or truncated file?)")


def open_with_bioio(path: str, level: int = 0) -> Any:
    """Open a file with bioio as a :class:`~n2v_chunked.io.sources.Raw` (native dims, lazy).

    Singleton T, Z and C axes are dropped; RGB samples (``S``) become the
    channel axis.  Physical pixel sizes (bioio reports micrometres) become the
    scale of z, y and x.  A file with several scenes (series) opens its first.

    Raises
    ------
    N2VError
        bioio or the plugin the file needs is missing, or no plugin can read it.
    """
    if importlib.util.find_spec("bioio") is None:
        raise _refusal(path)
    from bioio import BioImage
    from bioio_base.exceptions import UnsupportedFileFormatError

    try:
        img = BioImage(path)
    except UnsupportedFileFormatError:
        raise _refusal(path) from None
    except Exception as exc:  # a plugin that chokes on a damaged file
        raise UnreadableDataError(f"cannot read {path}: {type(exc).__name__}: {first_line(exc)}") from None
    if len(img.scenes) > 1:
        log.warning("%s holds %d scenes (series); reading the first, %r", path, len(img.scenes), img.scenes[0])
    if level:
        levels = getattr(img, "resolution_levels", (0,))
        if level not in levels:
            raise ConfigError(f"{path} has no resolution level {level} (levels: {', '.join(map(str, levels))})")
        img.set_resolution_level(level)
    xdata = img.reader.xarray_dask_data  # the file's own dims, not padded to TCZYX
    data, letters = xdata.data, [str(d) for d in xdata.dims]
    if "S" in letters and ("C" not in letters or xdata.sizes["C"] == 1):
        if "C" in letters:
            data = data.squeeze(axis=letters.index("C"))
            letters.remove("C")
        letters[letters.index("S")] = "C"
    for d in ("T", "Z", "C"):  # singleton axes say nothing and would make a 2D image look 3D
        if d in letters and data.shape[letters.index(d)] == 1:
            data = data.squeeze(axis=letters.index(d))
            letters.remove(d)
    extra = [d for d in letters if d not in _DIMS]
    if extra:
        raise AxesError(f"cannot read {path}: bioio gives axes {''.join(letters)}; {', '.join(extra)} "
                       "is not one of t, c, z, y, x (convert it with another tool first)")
    dims = tuple(_DIMS[d] for d in letters)
    raw = Raw(data, dims, type(img.reader).__module__.split(".")[0].replace("_", "-"), path)
    sizes = img.physical_pixel_sizes
    for d, v in (("z", sizes.Z), ("y", sizes.Y), ("x", sizes.X)):
        if d in dims and v:
            raw.scale[dims.index(d)] = float(v)
            raw.units[dims.index(d)] = "micrometer"
    size = Path(path).stat().st_size
    raw.info = SourceInfo(tuple(int(c[0]) for c in data.chunks), None, [tuple(data.shape)], lambda: size,
                          str(data.dtype))
    return raw
