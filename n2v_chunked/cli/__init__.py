"""The ``n2v-chunked`` command line: the only package that may import every other.

- :mod:`~n2v_chunked.cli.commands`: the subcommands (``train``, ``predict``, ``convert``, ``info``,
  ``export``, ``demo``) and :func:`main`, the console script ``n2v-chunked``;
- :mod:`~n2v_chunked.cli.config_file`: options from a YAML file (``--config``) and ``--storage-options``;
- :mod:`~n2v_chunked.cli.logs`: one-line messages on stderr, quiet third-party loggers;
- :mod:`~n2v_chunked.cli.demo`: ``n2v-chunked demo`` and its sample images.

``python -m n2v_chunked.cli`` runs the command too (:mod:`~n2v_chunked.cli.__main__`).
"""

from .commands import main

__all__ = ["main"]
