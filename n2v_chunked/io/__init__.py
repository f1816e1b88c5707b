"""Reading and writing images: the two ends of both data paths.

Reading: :mod:`~n2v_chunked.io.sources` (``open_image``: any input as a lazy
DataArray in canonical axis order) over the format readers
:mod:`~n2v_chunked.io.zarr_read`, :mod:`~n2v_chunked.io.tiff` and
:mod:`~n2v_chunked.io.formats` (bioio), which share
:mod:`~n2v_chunked.io.readers`; axes in :mod:`~n2v_chunked.io.metadata_axes`.
Writing: :mod:`~n2v_chunked.io.ome` (OME-Zarr outputs),
:mod:`~n2v_chunked.io.pyramid` (block-aligned stores, pyramids),
:mod:`~n2v_chunked.io.ngff` (multiscales metadata),
:mod:`~n2v_chunked.io.durable` (fsync).  Store utilities (URLs, credentials,
retries): :mod:`~n2v_chunked.io.stores`; object operations and the store
clients: :mod:`~n2v_chunked.io.objects`.  Around them:
:mod:`~n2v_chunked.io.convert` (``convert`` and ``info``: any input to
OME-Zarr), :mod:`~n2v_chunked.io.lock` (one writer per output or model
directory) and :mod:`~n2v_chunked.io.pictures` (PNG previews).
"""
