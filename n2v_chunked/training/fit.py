"""Training from a source: ``source -> sampler -> loop``.

:func:`fit` opens any source the data layer reads, fits the patch shape to
the data, takes the normalisation statistics from a sample of blocks (or
from the model it starts from, ``init_from``), builds the streaming sampler
with its held-out validation patches, and hands the batches to the training
loop (:func:`n2v_chunked.training.loop.train`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import CollectionError, ConfigError, IncompatibleModelError
from ..io.collections import Collection, check_consistent, collection_kind, open_collection, select_images
from ..io.sources import open_image
from ..io.stores import REMOTE_IO_THREADS, protocol, redact
from ..model import checkpoint as ckpt
from ..model.config import MaskConfig, ModelConfig, TrainConfig, resume_changes, resumed, to_dict
from ..model.normalization import channel_stats
from ..model.unet import size_multiple
from ..sampling.collection import CollectionPatchDataset
from ..sampling.dataset import DEFAULT_BUFFER_BYTES, ZarrPatchDataset, batches
from .loop import TrainResult, default_patch, init_distributed, train
from .masking import grid_cell

log = logging.getLogger(__name__)


def fit_patch_shape(sizes: dict[str, int], spatial: tuple[str, ...], model_cfg: ModelConfig,
                    requested: list[int] | None) -> list[int]:
    """The patch shape to train with.

    A requested shape must fit the data.  The default (64x64 or 32^3) shrinks
    to the largest multiple of ``2**depth`` that fits each axis, so 3D
    stacks with few slices and small images train instead of crashing.
    """
    m = size_multiple(model_cfg)
    if requested:
        for d, p in zip(spatial, requested):
            if p > sizes[d]:
                raise ConfigError(f"patch size {p} along '{d}' is larger than the image ({sizes[d]} pixels)")
        return list(requested)
    patch = []
    for d, p in zip(spatial, default_patch(len(spatial))):
        fitted = min(p, sizes[d] // m * m)
        if fitted < m:
            raise IncompatibleModelError(f"axis '{d}' has {sizes[d]} pixels, fewer than the {m} a depth-{model_cfg.depth} U-Net needs")
        patch.append(fitted)
    return patch


def _refuse_new_network(model_cfg: ModelConfig | None, stored_model: ModelConfig, mask_cfg: MaskConfig | None,
                        stored_mask: MaskConfig) -> None:
    """On resume the network and masking are the stored ones: a different one asked for is refused, not dropped."""
    asked = [(f"network setting {k}", v, getattr(stored_model, k)) for k, v in vars(model_cfg or stored_model).items()
             if k not in ("dims", "in_channels") and v != getattr(stored_model, k)]
    asked += [(f"masking setting {k}", v, getattr(stored_mask, k)) for k, v in vars(mask_cfg or stored_mask).items()
              if v != getattr(stored_mask, k)]
    if asked:
        name, value, was = asked[0]
        raise ConfigError(f"{name} cannot change on --resume (stored {was!r}, asked {value!r}): the network and its "
                          "masking are fixed when training starts; resume without it, or train a new model in "
                          "another --model-dir")


def fit(
    source: Any,
    model_dir: str | Path,
    *,
    axes: str | None = None,
    level: int = 0,
    dims: int | None = None,
    model_cfg: ModelConfig | None = None,
    mask_cfg: MaskConfig | None = None,
    train_cfg: TrainConfig | dict[str, Any] | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    val_fraction: float | None = None,
    buffer_bytes: int | None = None,
    min_std: float | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
    tensorboard: bool = False,
    allow_unvalidated: bool = False,
    select: str | Sequence[str] | None = None,
    normalize_per: str | None = None,
    val_by: str | None = None,
) -> TrainResult:
    """Train from any source the data layer opens, or from a collection of images, streaming patches.

    ``source -> sampler -> masking -> model -> loss``: the image opened lazily, statistics from a
    sample of blocks, patches streamed from a bounded buffer of chunk-aligned blocks
    (:class:`~n2v_chunked.sampling.dataset.ZarrPatchDataset`); of all images of a collection
    (:class:`~n2v_chunked.sampling.collection.CollectionPatchDataset`; docs/collections.md).

    Parameters
    ----------
    source : path, URL, array or Collection
        OME-Zarr, Zarr, TIFF, numpy, dask or xarray; or a collection.
    model_dir : str or Path
        Where the model goes.
    axes : str, optional
        Axes of a source whose metadata has none (``"tyx"``).
    level : int
        Resolution level of a multiscale OME-Zarr.
    dims : {2, 3}, optional
        Default 3D when the data has ``z``; with 2, ``z`` is a sample axis.
    model_cfg, mask_cfg, train_cfg : config dataclasses, optional
        ``dims`` and ``in_channels`` of ``model_cfg`` are set from the data.
        Without ``mask_cfg``, :class:`MaskConfig`'s defaults (N2V2's median
        replacement; ``MaskConfig(replacement="uniform")`` is the paper's).
    resume : bool
        Continue the model in ``model_dir`` with its stored settings.  ``train_cfg``
        then holds the changes (:func:`~n2v_chunked.model.config.resume_changes`): each
        takes effect or is refused with one line (:func:`~n2v_chunked.model.config.resumed`);
        ``model_cfg``/``mask_cfg``, when given, must equal the stored ones.
    device : optional
        Default: CUDA when present.
    val_fraction : float, optional
        Blocks (or images, ``val_by="image"``) held out for validation (default 0.1; on resume the stored one).
    buffer_bytes, min_std : optional
        Bound on the sampler's decoded-block buffer; foreground filter (skip
        patches whose std is below ``min_std``, in input units).
    init_from : str or Path, optional
        Start from another model's weights, architecture, masking and normalisation: a
        package of ``n2v-chunked export`` or a model directory (:func:`n2v_chunked.zoo.load.init_source`).
    progress, tensorboard : bool
        A progress bar; TensorBoard events too (see :func:`train`).
    allow_unvalidated : bool
        ``init_from``: start from a model directory without validated weights (see
        :func:`n2v_chunked.model.checkpoint.check_trained`); refused by default.
    select, normalize_per, val_by : optional
        Collections only: the images (:func:`~n2v_chunked.io.collections.select_images`); statistics over
        the ``"collection"`` or per ``"image"``; validation by ``"block"`` or by ``"image"`` (defaults
        :data:`DEFAULT_NORMALIZE_PER`, :data:`DEFAULT_VAL_BY`; on resume the stored ones).

    Returns
    -------
    TrainResult
    """
    info = init_distributed()  # before the sampler, so it shards by rank
    collection, data, data_dims, sizes = _open(source, axes, level, select, normalize_per, val_by)
    model_cfg, mask_cfg, train_cfg, val_fraction, init, resume = _settings(
        model_dir, model_cfg, mask_cfg, train_cfg, val_fraction, resume, init_from, allow_unvalidated)
    model_cfg, train_cfg, spatial = _shapes(model_cfg, mask_cfg, train_cfg, data_dims, sizes, dims, collection is not None,
                                            resume, init, model_dir if resume else init_from)
    io_threads = _io_threads(data.attrs.get("source", "") if collection is None else collection.source)
    options = dict(buffer_bytes=buffer_bytes or DEFAULT_BUFFER_BYTES, min_std=min_std, io_threads=io_threads)
    if collection is None:
        make, stats, extra = _image_sampler(data, source, model_dir, spatial, train_cfg, resume, options)
    else:
        make, stats, extra = _collection_sampler(collection, model_dir, spatial, train_cfg, val_fraction, resume, init,
                                                 normalize_per, val_by, axes=axes, level=level, **options)
    if init is not None:
        stats = (init[1], init[2])  # the units the initial network works in
    mean, std, dataset, val, stream = _streams(make, stats, train_cfg, val_fraction, device, model_cfg.in_channels)
    if isinstance(dataset, CollectionPatchDataset) and dataset.val_by == "image":
        extra["collection"]["held_out"] = dataset.held_out_images
    # on resume every setting as a mapping: one set back to its default is still a change (config.resume_changes)
    return train(
        stream, val, mean, std, model_dir, model_cfg, mask_cfg, to_dict(train_cfg) if resume else train_cfg,
        resume=resume, device=device, sampler=dataset, axes="".join(data_dims), progress=progress,
        tensorboard=tensorboard, init_weights=init[0] if init else None,
        extra_meta={**extra, "val_fraction": val_fraction, "spatial_dims": list(spatial), "world_size": info.world_size,
                    **({"init_from": redact(str(init_from))} if init else {})})


def _image_sampler(data: Any, source: Any, model_dir: Any, spatial: tuple[str, ...], train_cfg: TrainConfig,
                   resume: bool, options: dict[str, Any],
                   ) -> tuple[Callable[[float], ZarrPatchDataset], Any, dict[str, Any]]:
    """The sampler factory, statistics (None on resume) and ``config.yaml`` record of training on one image."""
    if resume and "collection" in ckpt.read_config(model_dir):
        raise ConfigError(f"the model in {model_dir} was trained on a collection; --resume continues it on that "
                          "collection (give it, with the same --select), not on one image")
    def make(fraction: float) -> ZarrPatchDataset:
        return ZarrPatchDataset(data, train_cfg.patch_size, spatial, seed=train_cfg.seed, val_fraction=fraction,
                                **options)

    # statistics first: they read every block of a small image, so a NaN there is named as such
    # instead of surfacing as blocks the sampler skips until none is left
    stats = None if resume else channel_stats(data, seed=train_cfg.seed)
    label = data.attrs.get("source", source if isinstance(source, (str, Path)) else "")
    return make, stats, {"input": redact(str(label))}  # no URL password


def _open(source: Any, axes: str | None, level: int, select: Any, normalize_per: str | None,
          val_by: str | None) -> tuple[Collection | None, Any, tuple[str, ...], dict[str, int]]:
    """The collection (or None) or the image (else None), the dims and the size along each (a collection's smallest)."""
    collection = _collection(source, axes, level, select, bool(select or normalize_per or val_by))
    if collection is not None:
        check_consistent(collection.images)
        dims = tuple(collection.images[0].axes)
        return collection, None, dims, {d: min(im.shape[k] for im in collection.images) for k, d in enumerate(dims)}
    asked = [n for n, v in (("select", select), ("normalize_per", normalize_per), ("val_by", val_by)) if v]
    if asked:  # an option that cannot take effect is refused, not dropped
        raise ConfigError(f"{asked[0]} is for collections of images (plate, container, folder); "
                          f"{source if isinstance(source, (str, Path)) else 'this source'} is one image")
    data = open_image(source, axes=axes, level=level)
    return None, data, tuple(str(d) for d in data.dims), dict(data.sizes)


def _shapes(model_cfg: ModelConfig, mask_cfg: MaskConfig | None, train_cfg: TrainConfig, data_dims: tuple[str, ...],
            sizes: dict[str, int], dims: int | None, collection: bool, resume: bool, init: Any,
            origin: Any) -> tuple[ModelConfig, TrainConfig, tuple[str, ...]]:
    """The network's dims and channels and the patch shape for the data; the spatial dims.

    ``origin``: the model resumed or started from (for messages).
    """
    has_z = "z" in data_dims
    if dims is None:
        dims = model_cfg.dims if resume or init else (3 if has_z else 2)
    if dims == 3 and not has_z:
        raise IncompatibleModelError(f"a 3D model needs a 'z' axis; the data has axes {''.join(data_dims)}")
    spatial = ("z", "y", "x") if dims == 3 else ("y", "x")
    channels = int(sizes.get("c", 1))
    if (resume or init) and (model_cfg.dims != dims or model_cfg.in_channels != channels):
        raise IncompatibleModelError(f"model in {origin} is {model_cfg.dims}D with {model_cfg.in_channels} channel(s); "
                                     f"the data gives {dims}D with {channels}")
    model_cfg = dataclasses.replace(model_cfg, dims=dims, in_channels=channels)
    if mask_cfg is not None:
        grid_cell(mask_cfg.density, dims)  # a density the grid cannot express fails before any data is read
    if collection:  # the default fits the smallest image; the sampler names the images too small
        m = size_multiple(model_cfg)  # for the patch, or for a network of this depth
        sizes = {d: max(n, m, *train_cfg.patch_size) for d, n in sizes.items()}
    patch = fit_patch_shape(sizes, spatial, model_cfg, train_cfg.patch_size)
    return model_cfg, dataclasses.replace(train_cfg, patch_size=patch), spatial


def _io_threads(source: Any) -> int:
    """Block reads in flight per stream: an object store answers in tens of ms, so keep more (benchmarks/remote.py)."""
    return REMOTE_IO_THREADS if protocol(str(source)) else 2


def _collection(source: Any, axes: str | None, level: int, select: Any, asked: bool) -> Collection | None:
    """``source`` as a collection (listed from metadata, ``select`` applied); None for one image.

    A folder of TIFFs of one shape and dtype is one stack, as before, unless a
    collection's option is ``asked`` for.
    """
    if isinstance(source, Collection):
        return select_images(source, select) if select is not None else source
    if not isinstance(source, (str, Path)):
        return None
    kind = collection_kind(source)
    if kind is None:
        return None
    if kind == "folder" and not asked:
        try:
            open_image(source, axes=axes, level=level)
            return None
        except CollectionError:
            pass
    return open_collection(source, axes=axes, level=level, select=select)


#: Normalisation statistics of a collection: per image or over the collection (docs/collections.md measures both:
#: per image denoised frames of different gains and offsets better, 0.929 against 0.848 frame correlation).
DEFAULT_NORMALIZE_PER = "image"
#: A collection's validation split: blocks of every image (docs/collections.md says why).
DEFAULT_VAL_BY = "block"


def _collection_settings(model_dir: Any, collection: Collection, resume: bool, normalize_per: str | None,
                         val_by: str | None) -> tuple[str, str, dict[str, Any]]:
    """``normalize_per``, ``val_by`` (given, stored on resume, or the defaults) and the ``collection`` record.

    On resume both are fixed, and so are the images: the stream resumes in
    a block space numbered over them.
    """
    names = "\n".join(im.name for im in collection.images)
    record = {"source": redact(collection.source), "kind": collection.kind, "images": len(collection.images),
              "selection": collection.selection, "names_sha256": hashlib.sha256(names.encode()).hexdigest()[:16]}
    if resume:
        stored = ckpt.read_config(model_dir).get("collection")
        if not isinstance(stored, dict):
            raise ConfigError(f"the model in {model_dir} was trained on one image; --resume continues it on that "
                              "image, not on a collection (train a new model in another --model-dir)")
        if stored.get("names_sha256") != record["names_sha256"]:
            raise ConfigError(f"--resume needs the images the model began with ({stored.get('images')} then, "
                              f"{record['images']} now, or other names): give the same collection and --select")
        for key, asked in (("normalize_per", normalize_per), ("val_by", val_by)):
            if asked is not None and asked != stored.get(key):
                raise ConfigError(f"{key} cannot change on --resume (stored {stored.get(key)!r}, asked {asked!r})")
        normalize_per, val_by = stored.get("normalize_per"), stored.get("val_by")
    normalize_per = normalize_per or DEFAULT_NORMALIZE_PER
    val_by = val_by or DEFAULT_VAL_BY
    return normalize_per, val_by, {**record, "normalize_per": normalize_per, "val_by": val_by}


def _collection_sampler(collection: Collection, model_dir: Any, spatial: tuple[str, ...],
                        train_cfg: TrainConfig, val_fraction: float, resume: bool, init: Any, normalize_per: str | None,
                        val_by: str | None, **options: Any,
                        ) -> tuple[Callable[[float], ZarrPatchDataset], Any, dict[str, Any]]:
    """The sampler factory, statistics and ``config.yaml`` record of training on a collection.

    ``options``: ``axes``, ``level``, ``buffer_bytes``, ``min_std``, ``io_threads``.
    """
    patch = train_cfg.patch_size
    normalize_per, val_by, record = _collection_settings(model_dir, collection, resume, normalize_per, val_by)
    reference: tuple[np.ndarray, np.ndarray] | None = None
    first: list[CollectionPatchDataset] = []  # the run's samplers open each image once, between them

    def make(fraction: float) -> CollectionPatchDataset:
        dataset = CollectionPatchDataset(
            collection.images, patch, spatial, axes=options["axes"], level=options["level"], val_by=val_by,
            normalize_per=normalize_per, seed=train_cfg.seed, val_fraction=fraction,
            buffer_bytes=options["buffer_bytes"], min_std=options["min_std"],
            io_threads=options["io_threads"])
        dataset.reference = reference
        if first:
            dataset.share_images(first[0])
        else:
            first.append(dataset)
        return dataset

    if val_by == "image" and val_fraction > 0:
        make(val_fraction)  # too few images to hold one out: refused before any pixel is read
    if resume:
        norm = ckpt.read_config(model_dir)["normalization"]
        reference, stats = (np.asarray(norm["mean"]), np.asarray(norm["std"])), None
    else:
        reference = stats = (init[1], init[2]) if init is not None else make(0.0).collection_stats()
    return make, stats, {"input": record["source"], "collection": record}


def _settings(model_dir: Any, model_cfg: ModelConfig | None, mask_cfg: MaskConfig | None,
              train_cfg: TrainConfig | dict[str, Any] | None, val_fraction: float | None, resume: bool,
              init_from: Any, allow_unvalidated: bool) -> tuple[Any, Any, TrainConfig, float, Any, bool]:
    """The run's configs: new, resumed (the one resume rule) or from ``--init-from``; whether it resumes.

    Returns the model, mask and training configs, the validation fraction,
    ``(weights, mean, std)`` of the initial model (or None) and ``resume``
    (False where there was nothing to resume).
    """
    if init_from is None:  # (with --init-from, --resume stays refused below)
        resume = ckpt.resume_or_start(model_dir, resume)
    if resume:
        meta = ckpt.read_config(model_dir)
        stored_model, stored_mask, stored = ckpt.configs_from_meta(meta, Path(model_dir) / ckpt.CONFIG)
        _refuse_new_network(model_cfg, stored_model, mask_cfg, stored_mask)
        model_cfg, mask_cfg = stored_model, stored_mask
        train_cfg = resumed(stored, resume_changes(train_cfg))  # the one resume rule (config.ON_RESUME)
        stored_fraction = meta.get("val_fraction", val_fraction)
        if val_fraction is not None and stored_fraction is not None and val_fraction != stored_fraction:
            raise ConfigError(f"--val-fraction cannot change on --resume (stored {stored_fraction}, asked "
                              f"{val_fraction}): the held-out blocks are fixed when training starts")
        val_fraction = stored_fraction
    elif isinstance(train_cfg, dict):
        raise ConfigError("a mapping of training settings is a resumed run's changes; a new run takes a TrainConfig")
    val_fraction = 0.1 if val_fraction is None else val_fraction
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()  # mask_cfg: train() picks the default that goes with the model
    init = None
    if init_from is not None:
        if resume:
            raise ConfigError("--init-from starts a new model from another one; it cannot be combined with --resume")
        from ..zoo.load import init_source

        meta, weights = init_source(init_from, allow_unvalidated)
        model_cfg, mask_cfg, _ = ckpt.configs_from_meta(meta, init_from)
        init = (weights, np.asarray(meta["normalization"]["mean"]), np.asarray(meta["normalization"]["std"]))
    return model_cfg, mask_cfg, train_cfg, val_fraction, init, resume


def _streams(make: Callable[[float], ZarrPatchDataset], stats: tuple[np.ndarray, np.ndarray] | None,
             train_cfg: TrainConfig, val_fraction: float, device: Any,
             channels: int) -> tuple[np.ndarray, np.ndarray, ZarrPatchDataset, np.ndarray, Iterable[Any]]:
    """Normalisation statistics, the sampler, the validation patches and the stream of training batches.

    ``make(fraction)`` builds the sampler; ``stats`` are the statistics
    (None on resume: the loop uses the stored ones).
    """
    mean, std = stats if stats is not None else (np.zeros(channels), np.zeros(channels))
    dataset = make(0.0)
    if val_fraction > 0 and dataset.grid.n_blocks >= 2:
        dataset = make(val_fraction)
        val = dataset.validation_patches(train_cfg.val_patches)
    else:
        # Too small to hold out a block (e.g. one small image): validate on a
        # fixed draw of training patches, as other N2V tools do, and say so.
        log.warning("image too small to hold out validation blocks; validating on training patches")
        val = next(batches(make(0.0), train_cfg.val_patches)).numpy()
    # batches in page-locked memory for a GPU: their copies then overlap the step before
    pin = torch.device(device).type == "cuda" if device else torch.cuda.is_available()
    if train_cfg.num_workers > 0:
        stream: Iterable[Any] = DataLoader(
            dataset, batch_size=train_cfg.batch_size, num_workers=train_cfg.num_workers,
            persistent_workers=True, pin_memory=pin,
        )
    else:
        stream = batches(dataset, train_cfg.batch_size, pin=pin)
    return mean, std, dataset, val, stream
