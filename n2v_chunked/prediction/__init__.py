"""Chunked prediction: source -> halo plan -> per-block predict -> writer.

- :mod:`~n2v_chunked.prediction.plan`: the halo and the block grid (:func:`plan`, pure);
- :mod:`~n2v_chunked.prediction.blocks`: the worker's model cache, :func:`predict_block`,
  and the graph of a batch of blocks with its borders padded;
- :mod:`~n2v_chunked.prediction.writer`: each block's chunks and its marker (:func:`done_blocks`);
- :mod:`~n2v_chunked.prediction.run`: :func:`predict`, which ties them together
  (schedulers: :mod:`n2v_chunked.cluster`);
- :mod:`~n2v_chunked.prediction.preview`: ``predict --preview``, input and output side by side.
"""

from .blocks import batch_prediction, get_model, model_token, predict_block
from .plan import BLOCK_ACTIVATION_BYTES, Plan, check_compatible, model_spatial_dims, plan
from .run import predict
from .writer import MARKER_DIR, done_blocks

__all__ = [
    "BLOCK_ACTIVATION_BYTES", "MARKER_DIR", "Plan", "batch_prediction", "check_compatible", "done_blocks",
    "get_model", "model_spatial_dims", "model_token", "plan", "predict", "predict_block",
]
