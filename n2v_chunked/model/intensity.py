"""Does the input look like the model's training data?  Which statistics normalise it?

A model normalises its input with the mean and std of its training data.  Data
of another intensity range (a model trained on SEM values around 50,000 applied
to a fluorescence stack of 104-375) then reaches the network far outside
anything it was trained on, and the output is nonsense (about -8,450 there)
with no error.  :func:`choose_normalization` samples the input's own
statistics once per run, as training does (:func:`~n2v_chunked.model.normalization.channel_stats`),
warns when they are far from the model's, and returns the statistics to use:
the model's (``"model"``, the default) or the input's (``"data"``, for a user
who knows the noise is of the same kind).

Thresholds (per channel): the input's mean more than :data:`MEAN_SIGMAS`
model-stds from the model's mean, or the ratio of the stds outside
``[1/STD_RATIO, STD_RATIO]``.  After the model's normalisation a training
image has mean 0 and std 1; an input mean 3 stds off puts the average pixel
where fewer than 0.3% of (Gaussian-like) training pixels were, and a std
ratio of 3 means the network sees contrasts 3 times larger or smaller than
it ever saw.  Both leave room for the ordinary spread between images of one
kind (another field of view, a dimmer z-range: well under 1 std of the mean,
a std ratio under 2 in the test data), and catch a change of modality or bit
depth (SEM vs fluorescence: about 10 stds and a ratio near 100).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ConfigError, N2VError, first_line

log = logging.getLogger("n2v_chunked")

NORMALIZE_MODES = ("model", "data")
MEAN_SIGMAS = 3.0
STD_RATIO = 3.0


def resolve_normalize(mode: str, trained_with: str) -> str:
    """The normalisation to run: ``mode``, or for ``"auto"`` the one the model was trained with.

    Parameters
    ----------
    mode : {"auto", "model", "data"}
        What the user asked for.
    trained_with : {"model", "data"}
        The model contract's ``normalize`` (:class:`n2v_chunked.model.contract.ModelContract`).

    Examples
    --------
    >>> resolve_normalize("auto", "data"), resolve_normalize("model", "data")
    ('data', 'model')
    """
    if mode != "auto" and mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of auto, {', '.join(NORMALIZE_MODES)}, got {mode!r}")
    return trained_with if mode == "auto" else mode


def mismatch(
    data_mean: np.ndarray, data_std: np.ndarray, model_mean: np.ndarray, model_std: np.ndarray,
) -> list[int]:
    """Channels whose input statistics are far from the model's (see the module's thresholds)."""
    dm, ds = np.asarray(data_mean, np.float64), np.asarray(data_std, np.float64)
    mm, ms = np.asarray(model_mean, np.float64), np.asarray(model_std, np.float64)
    ratio = ds / ms
    far = (np.abs(dm - mm) > MEAN_SIGMAS * ms) | (ratio > STD_RATIO) | (ratio < 1.0 / STD_RATIO)
    return [int(k) for k in np.flatnonzero(far)]


def _fmt(v: np.ndarray) -> str:
    return ", ".join(f"{x:.4g}" for x in np.asarray(v, np.float64))


def choose_normalization(data: Any, model_mean: np.ndarray, model_std: np.ndarray, mode: str = "model") -> dict[str, Any]:
    """Sample the input's statistics, warn when they are far from the model's, pick the ones to use.

    Parameters
    ----------
    data : xarray.DataArray
        The input (lazy); the channel axis is its ``c`` dim.
    model_mean, model_std : numpy.ndarray
        The model's stored normalisation, ``(C,)``.
    mode : {"model", "data"}
        Normalise with the model's statistics, or with the input's own.

    Returns
    -------
    dict
        Provenance record: ``mode``, ``mean`` and ``std`` (the ones used),
        ``input_mean``/``input_std`` (None when they could not be sampled, e.g.
        a constant image) and ``model_mean``/``model_std``.

    Raises
    ------
    ConfigError
        An unknown ``mode``.
    N2VError
        ``mode="data"`` on an input whose statistics cannot be computed
        (NaN/Inf, a constant channel).
    """
    from .normalization import channel_stats

    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")
    model_mean, model_std = np.asarray(model_mean, np.float64), np.asarray(model_std, np.float64)
    try:
        data_mean, data_std = channel_stats(data)
    except (N2VError, OSError) as exc:  # NaN, a constant channel, an unreadable chunk; other errors are bugs
        what = first_line(exc) if isinstance(exc, N2VError) else f"{type(exc).__name__}: {exc}"
        if mode == "data":
            raise N2VError(f"--normalize data: cannot sample the input's statistics: {what}") from exc
        # advisory only: a bad block stops the prediction itself, with the block named and --resume offered
        log.warning("input statistics not checked against the model's: %s", what)
        data_mean = data_std = None
    record: dict[str, Any] = {
        "mode": mode,
        "input_mean": None if data_mean is None else [float(v) for v in data_mean],
        "input_std": None if data_std is None else [float(v) for v in data_std],
        "model_mean": [float(v) for v in model_mean],
        "model_std": [float(v) for v in model_std],
    }
    used = (data_mean, data_std) if mode == "data" else (model_mean, model_std)
    record["mean"], record["std"] = [float(v) for v in used[0]], [float(v) for v in used[1]]
    if mode == "model" and data_mean is not None:
        far = mismatch(data_mean, data_std, model_mean, model_std)
        if far:
            k = far[0]
            others = "" if len(model_mean) == 1 else (
                f"; all channels: input mean [{_fmt(data_mean)}] std [{_fmt(data_std)}], "
                f"model mean [{_fmt(model_mean)}] std [{_fmt(model_std)}]")
            log.warning(
                "the input's intensities are far from the model's training data (channel %d: input mean %.4g std "
                "%.4g, model mean %.4g std %.4g, i.e. %.1f model stds apart, std ratio %.3g%s): the output is likely "
                "wrong; use a model trained on data like this, or pass --normalize data if the noise is of the same kind",
                k, data_mean[k], data_std[k], model_mean[k], model_std[k],
                abs(data_mean[k] - model_mean[k]) / model_std[k], data_std[k] / model_std[k], others,
            )
    elif mode == "data":
        log.info("normalising with the input's own statistics: mean [%s] std [%s] (model's: mean [%s] std [%s])",
                 _fmt(data_mean), _fmt(data_std), _fmt(model_mean), _fmt(model_std))
    return record
