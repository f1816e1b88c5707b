"""Reading and checking a BioImage Model Zoo package for chunked prediction.

A Zoo package is a ``.zip`` or a folder holding ``rdf.yaml``/``bioimageio.yaml``.
:func:`read_description` loads and validates its description (format 0.4 is
converted to 0.5); :func:`inspect_description` checks that the model fits
chunked prediction (one image input and one image output on the same spatial
grid, 2D or 3D, ``pytorch_state_dict`` or ``torchscript`` weights) and sums up
what prediction needs in a :class:`ZooSpec`.  Running the model is
:mod:`n2v_chunked.zoo.load`'s.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import IncompatibleModelError, first_line

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript")


def is_zoo_package(path: Any) -> bool:
    """Whether ``path`` is a Zoo package: a ``.zip`` file or a folder holding an RDF."""
    if not isinstance(path, (str, Path)):
        return False
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() == ".zip"
    return p.is_dir() and any((p / n).is_file() for n in RDF_NAMES)


def _raw_rdf(path: Path) -> dict[str, Any]:
    """The package's RDF as plain YAML (for checks before ``bioimageio.spec`` validates it)."""
    try:
        if path.is_file():
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n in RDF_NAMES]
                if not names:
                    raise IncompatibleModelError(f"{path} is not a BioImage Model Zoo package: no rdf.yaml or bioimageio.yaml in it")
                text = zf.read(names[0]).decode()
        else:
            text = next((path / n) for n in RDF_NAMES if (path / n).is_file()).read_text()
        rdf = yaml.safe_load(text)
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise IncompatibleModelError(f"cannot read Zoo package {path}: {first_line(exc)}") from None
    if not isinstance(rdf, dict):
        raise IncompatibleModelError(f"cannot read Zoo package {path}: its RDF is not a mapping")
    return rdf


def _version(v: Any) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(v).split(".")[:3])
    except ValueError:
        return (0,)


def read_description(path: str | Path) -> Any:
    """Load and validate a Zoo model description (format 0.4 is converted to 0.5).

    Raises
    ------
    IncompatibleModelError
        The package is unreadable, newer than the installed ``bioimageio.spec``,
        not a model, or fails validation (the first error is named).
    """
    from .export import require_bioimageio

    require_bioimageio()
    from bioimageio.spec import InvalidDescr, load_model_description
    from bioimageio.spec.model import v0_5

    path = Path(path)
    rdf = _raw_rdf(path)
    have = v0_5.ModelDescr.implemented_format_version
    fv = rdf.get("format_version")
    if _version(fv) > _version(have):
        raise IncompatibleModelError(f"Zoo package {path} has format version {fv}, newer than the {have} this bioimageio.spec "
                       "reads; update it (pip install -U 'n2v-chunked[zoo]')")
    if rdf.get("type", "model") != "model":
        raise IncompatibleModelError(f"Zoo package {path} describes a {rdf.get('type')!r}, not a model")
    try:
        descr = load_model_description(path, format_version="latest", perform_io_checks=False)
    except ValueError as exc:  # "Invalid model description:" then one line per error
        lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip(" -")]
        first = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines or ["invalid"])[0]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 and lines[0].endswith(":") else ""
        raise IncompatibleModelError(f"Zoo package {path} fails validation: {first[:200]}{more}") from None
    if isinstance(descr, InvalidDescr) or not isinstance(descr, v0_5.ModelDescr):
        errors = getattr(getattr(descr, "validation_summary", None), "errors", None) or []
        first = f"{'.'.join(str(p) for p in errors[0].loc)}: {errors[0].msg}" if errors else "invalid description"
        raise IncompatibleModelError(f"Zoo package {path} fails validation: {first[:200]}")
    return descr


@dataclasses.dataclass(frozen=True)
class ZooSpec:
    """What chunked prediction needs to know of a Zoo model description.

    ``spatial`` lists the model's space axes in ``zyx`` order; ``halo`` is the
    declared output halo per spatial axis (None when it declares none);
    ``sizes`` holds ``(min, step)`` per spatial axis.
    """

    input_id: str
    output_id: str
    batch: bool
    channel: bool
    channels: int
    spatial: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    halo: tuple[int, ...] | None
    weight_formats: tuple[str, ...]


def inspect_description(descr: Any, where: str) -> ZooSpec:
    """Check that a model fits chunked prediction; one clear line when it does not."""
    from bioimageio.spec.model import v0_5 as s

    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise IncompatibleModelError(f"{where} has {len(descr.inputs)} input(s) and {len(descr.outputs)} output(s); "
                       "chunked prediction runs models with one image input and one image output")
    inp, out = descr.inputs[0], descr.outputs[0]
    formats = tuple(f for f in WEIGHT_FORMATS if getattr(descr.weights, f, None) is not None)
    if not formats:
        have = [f for f, v in descr.weights if v is not None]
        raise IncompatibleModelError(f"{where} has weights as {', '.join(have)} only; n2v-chunked runs pytorch_state_dict or "
                       "torchscript weights (convert them with bioimageio.core's weight converters)")
    in_axes = {str(a.id): a for a in inp.axes}
    out_axes = {str(a.id): a for a in out.axes}
    spatial = tuple(d for d in ("z", "y", "x") if d in in_axes)
    other = [f"{i} ({a.type})" for i, a in in_axes.items() if a.type not in ("batch", "channel", "space")]
    other += [f"{i}" for i, a in in_axes.items() if a.type == "space" and i not in ("z", "y", "x")]
    if other or len(spatial) not in (2, 3) or "y" not in spatial or "x" not in spatial:
        raise IncompatibleModelError(f"{where}: input axes {', '.join(in_axes)} are not batch, channel and 2 or 3 of z, y, x; "
                       "chunked prediction needs an image model")
    if set(out_axes) != set(in_axes):
        raise IncompatibleModelError(f"{where}: output axes {', '.join(out_axes)} differ from the input axes {', '.join(in_axes)}")
    sizes, halo = [], []
    for d in spatial:
        size = in_axes[d].size
        if isinstance(size, s.ParameterizedSize):
            sizes.append((int(size.min), int(size.step)))
        elif isinstance(size, s.DataDependentSize) or size is None:
            sizes.append((1, 1))
        else:
            raise IncompatibleModelError(f"{where}: input axis {d} has a fixed size ({size}); chunked prediction needs sizes "
                           "that grow (min + n * step)")
        oa = out_axes[d]
        ref = oa.size
        ok = isinstance(ref, s.SizeReference) and str(ref.tensor_id) == str(inp.id) and str(ref.axis_id) == d \
            and ref.offset == 0 and float(oa.scale) == float(in_axes[d].scale)
        if not ok:
            raise IncompatibleModelError(f"{where}: output axis {d} is not on the input's grid (size {ref}); chunked prediction "
                           "needs an output of the input's shape")
        halo.append(int(getattr(oa, "halo", 0) or 0))
    cin = in_axes["channel"].size if "channel" in in_axes else 1
    cout = out_axes["channel"].size if "channel" in out_axes else 1
    if not isinstance(cin, int) or cin != cout:
        raise IncompatibleModelError(f"{where}: {cout} output channel(s) for {cin} input channel(s); chunked prediction needs "
                       "as many output channels as input channels")
    return ZooSpec(str(inp.id), str(out.id), "batch" in in_axes, "channel" in in_axes, int(cin), spatial,
                   tuple(sizes), tuple(halo) if any(halo) else None, formats)
