"""Chunked prediction: source -> halo plan -> per-block predict -> writer.

- :mod:`~n2v_chunked.prediction.model_source`: which model a path names (:func:`open_source`); what every
  source promises is :class:`~n2v_chunked.model.contract.ModelContract`;
- :mod:`~n2v_chunked.prediction.options`: every setting, declared once (:class:`PredictOptions`);
- :mod:`~n2v_chunked.prediction.plan`: the halo and the block grid (:func:`plan`, pure);
- :mod:`~n2v_chunked.prediction.blocks`: the worker's model cache, :func:`predict_block`,
  and the graph of a batch of blocks with its borders padded;
- :mod:`~n2v_chunked.prediction.writer`: each block's chunks and its marker (:func:`done_blocks`);
- :mod:`~n2v_chunked.prediction.run`: :func:`predict`, which ties them together
  (schedulers: :mod:`n2v_chunked.cluster`), for one image or a collection;
- :mod:`~n2v_chunked.prediction.collection`: a plate, container or folder in, the same layout out
  (:class:`PredictedCollection`);
- :mod:`~n2v_chunked.prediction.preview`: ``predict --preview``, input and output side by side.
"""

from .blocks import batch_prediction, get_model, model_token, predict_block
from .collection import PredictedCollection
from ..model.checkpoint import ModelDir
from ..model.contract import BlockModel, ModelContract, ModelSource
from .model_source import open_source
from .options import PredictOptions
from .plan import BLOCK_ACTIVATION_BYTES, Plan, check_compatible, model_spatial_dims, plan
from .run import predict
from .writer import MARKER_DIR, done_blocks

__all__ = [
    "BLOCK_ACTIVATION_BYTES", "MARKER_DIR", "BlockModel", "ModelContract", "ModelDir", "ModelSource", "Plan",
    "PredictOptions", "PredictedCollection", "batch_prediction", "check_compatible", "done_blocks", "get_model", "model_spatial_dims",
    "model_token", "open_source", "plan", "predict", "predict_block",
]
