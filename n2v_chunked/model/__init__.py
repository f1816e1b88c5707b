"""The model: the network, its configuration and its files.

- :mod:`~n2v_chunked.model.unet`: :class:`~n2v_chunked.model.unet.UNet` built from a config, its
  receptive field, halo and size multiple;
- :mod:`~n2v_chunked.model.architecture`: the U-Net as a self-contained PyTorch module (no n2v_chunked
  imports: it is copied into every BioImage Model Zoo package);
- :mod:`~n2v_chunked.model.checkpoint`: the model directory (``config.yaml``, weights, training state),
  :func:`~n2v_chunked.model.checkpoint.load_model`;
- :mod:`~n2v_chunked.model.config`: ``ModelConfig``, ``MaskConfig``, ``TrainConfig`` and their YAML;
- :mod:`~n2v_chunked.model.typecheck`: strict types of config values (one line naming key, value, type);
- :mod:`~n2v_chunked.model.normalization`: per-channel statistics and the noise level of the data;
- :mod:`~n2v_chunked.model.intensity`: the model's statistics or the input's own at prediction.
"""
