"""BioImage Model Zoo packages: export a model directory, and load a package as a model source.

- :mod:`~n2v_chunked.zoo.export`: ``n2v-chunked export``, a Zoo package with the
  self-contained architecture (:mod:`n2v_chunked.model.architecture`), test tensors and a cover;
- :mod:`~n2v_chunked.zoo.load`: a package (``.zip`` or folder with ``rdf.yaml``) as a model for
  prediction or as the start of training (``--init-from``);
- :mod:`~n2v_chunked.zoo.spec`: reading a package's description (axes, halo, weights), and whether
  the ``[zoo]`` extra is installed.
"""
