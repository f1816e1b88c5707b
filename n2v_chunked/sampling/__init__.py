"""The training data path: source -> blocks -> patches.

:mod:`~n2v_chunked.sampling.grid` (block geometry, validation hold-out, patch
origins), :mod:`~n2v_chunked.sampling.access` (reading windows from zarr, dask
or numpy, bad chunks), :mod:`~n2v_chunked.sampling.stream` (one stream's
buffer of blocks) and :mod:`~n2v_chunked.sampling.dataset`
(:class:`~n2v_chunked.sampling.dataset.ZarrPatchDataset`, :func:`~n2v_chunked.sampling.dataset.batches`).
"""
