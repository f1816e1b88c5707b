"""Training: patches in, a model directory out.

- :mod:`~n2v_chunked.training.fit`: :func:`~n2v_chunked.training.fit.fit`, the Python door (an image or
  a path in, statistics, the sampler, then the loop);
- :mod:`~n2v_chunked.training.loop`: the training loop (steps, validation, checkpoints, resume, DDP);
- :mod:`~n2v_chunked.training.masking`: N2V's blind-spot masking and the masked loss;
- :mod:`~n2v_chunked.training.augment`: rotations and flips of a batch on its device;
- :mod:`~n2v_chunked.training.validation`: the held-out loss (and its runtime);
- :mod:`~n2v_chunked.training.plots`: ``training.png``, ``training.csv``, ``preview.png``, TensorBoard.

Patches come from :mod:`n2v_chunked.sampling`; the network and its files from :mod:`n2v_chunked.model`.
"""
