"""The engine: running a trained network on arrays, wherever and in whatever precision.

- :mod:`~n2v_chunked.engine.inference`: :func:`~n2v_chunked.engine.inference.denoise` (a whole
  in-memory image) and :func:`~n2v_chunked.engine.inference.run_network` (one batch of padded blocks:
  TTA, blending, batching by memory);
- :mod:`~n2v_chunked.engine.runtimes`: PyTorch, OpenVINO and ONNX Runtime behind one runner interface,
  and the choice of runtime and precision (``auto``);
- :mod:`~n2v_chunked.engine.transfer`: host/device copies overlapped with compute, pinned buffers;
- :mod:`~n2v_chunked.engine.padding`: the border rule shared by whole-image and chunked prediction;
- :mod:`~n2v_chunked.engine.symmetry`: the dihedral group of TTA (and of training's augmentation).
"""
