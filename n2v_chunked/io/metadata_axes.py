"""What a source's metadata says about its axes, and ``--axes`` against it.

``--axes`` names a source's axes in the order they are stored (the order of
the shape that tifffile or zarr report), which for a channels-last RGB TIFF
(stored ``yxc``) is not the ``tczyx`` order ``info`` prints (``cyx``).  A user
who copies the printed order into ``--axes`` would silently get 512 channels
of 672 x 3 pixels.  So where the metadata states axes, ``--axes`` may only
confirm them; where it states none, ``--axes`` is what tells them.

What counts as stated, per format:

* OME-Zarr ``multiscales`` axes (when valid), plain Zarr ``dimension_names``
  (v3) or ``_ARRAY_DIMENSIONS`` (xarray's v2), and an xarray DataArray's dims:
  all axes.
* TIFF: all axes where an ImageJ, OME-XML, tifffile-shaped (with ``axes``) or
  vendor description (LSM, STK, Micro-Manager, ...) gives them; in a plain
  TIFF only the samples axis (``SamplesPerPixel`` > 1, e.g. RGB), which the
  file's own tags place.  Letters we have no name for (tifffile's ``Q``,
  ``I``, ...) state nothing.
* numpy and dask arrays, plain Zarr without names: nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import AxesError

Stated = tuple[str | None, ...]

CANONICAL: tuple[str, ...] = ("t", "c", "z", "y", "x")
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}  # NGFF axis types
ASK_AXES = "pass --axes (letters from tczyx, e.g. --axes zyx)"
# tifffile series kinds whose axes are its own guesses, not the file's metadata
_GUESSED_KINDS = ("generic", "uniform")


def tiff_stated_axes(tf: Any, series: Any) -> Stated:
    """Per stored axis of ``series``, the axis the file's metadata states (None where it states none).

    Parameters
    ----------
    tf : tifffile.TiffFile
        The open file.
    series : tifffile.TiffPageSeries
        The series that will be read.
    """
    letters = series.axes.upper()
    shaped_axes = bool(tf.is_shaped and tf.shaped_metadata and tf.shaped_metadata[0].get("axes"))
    described = series.kind not in _GUESSED_KINDS and (series.kind != "shaped" or shaped_axes)
    out: list[str | None] = []
    for a in letters:
        name = "c" if a == "S" and "C" not in letters else a.lower()
        known = name in CANONICAL and (described or a == "S")
        out.append(name if known else None)
    return tuple(out)


def check_axes_agree(given: Sequence[str], stated: Stated | None, source: str, shape: Sequence[int]) -> None:
    """Raise :class:`AxesError` unless ``given`` (``--axes``) agrees with the stated axes.

    Parameters
    ----------
    given : sequence of str
        Validated axis letters from the user, in stored order.
    stated : tuple or None
        :func:`tiff_stated_axes`-style axes from the metadata; None when it states none.
    source : str
        The source, for the message.
    shape : sequence of int
        Stored shape, for the message.
    """
    if stated is None or all(s is None for s in stated):
        return
    if len(stated) == len(given) and all(s is None or s == g for s, g in zip(stated, given)):
        return
    said = "".join(s or "?" for s in stated)
    if None not in stated:
        fix = f"leave --axes out or pass --axes {said}"
    else:
        fix = f"pass letters that agree with {said!r} ('?' is not stated)"
        free = iter(g for g in given if g not in stated)
        example = "".join(s or next(free, "?") for s in stated) if len(stated) == len(given) else ""
        if example and "?" not in example:
            fix += f", e.g. --axes {example}"
    raise AxesError(
        f"--axes {''.join(given)} contradicts the metadata of {source}, which gives the axes in stored order as "
        f"{said!r} (shape {' x '.join(map(str, shape))}); --axes names the axes in the order they are stored, "
        f"not the tczyx order that info prints: {fix}"
    )


def parse_axes(axes: str | Sequence[str], ndim: int) -> tuple[str, ...]:
    """Validate an axes string such as ``"zyx"`` against an array's ndim.

    Parameters
    ----------
    axes : str or sequence of str
        Letters from ``tczyx`` (any case), no repeats, one per dimension.
    ndim : int
        Number of dimensions of the array the axes describe.

    Returns
    -------
    tuple of str
        Lower-case axis names in the given (not canonical) order.
    """
    letters = tuple(a.lower() for a in (axes.replace(",", "").strip() if isinstance(axes, str) else axes))
    bad = sorted({a for a in letters if a not in CANONICAL})
    if bad:
        raise AxesError(
            f"unknown axis letter(s) {', '.join(map(repr, bad))} in axes {''.join(letters)!r}: use letters from tczyx"
        )
    if len(set(letters)) != len(letters):
        raise AxesError(f"repeated axis letter in axes {''.join(letters)!r}")
    if len(letters) != ndim:
        raise AxesError(f"axes {''.join(letters)!r} has {len(letters)} letters but the data has {ndim} dimensions")
    return letters
