"""n2v_chunked: Noise2Void for terabyte-scale microscopy volumes.

Data flow for training: source -> sampler -> masking -> model -> loss.
Data flow for prediction: source -> halo plan -> per-block predict -> writer.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("n2v-chunked")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

from .errors import N2VError  # noqa: E402

__all__ = ["N2VError", "__version__"]
