"""The training data path: source -> blocks -> patches.

:mod:`~n2v_chunked.sampling.grid` (block geometry, strata of equally shaped
blocks, patch origins), :mod:`~n2v_chunked.sampling.order` (validation
hold-out and per-pass block orders, computed per block),
:mod:`~n2v_chunked.sampling.access` (reading windows from zarr, dask
or numpy, bad chunks), :mod:`~n2v_chunked.sampling.stream` (one stream's
buffer of blocks) and :mod:`~n2v_chunked.sampling.dataset`
(:class:`~n2v_chunked.sampling.dataset.ZarrPatchDataset`, :func:`~n2v_chunked.sampling.dataset.batches`).
"""
