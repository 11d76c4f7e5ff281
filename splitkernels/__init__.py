"""splitkernels: fused low-bit kernels and a split-computing runtime for LLMs.

``import splitkernels`` never fails because the C++ extension, Triton or a GPU is missing:
:func:`backends` reports what is available and :func:`use_backend` selects one.
:func:`quantize_` with a :class:`QuantConfig` or :class:`OPSCConfig` quantises a model in place.
"""
from .nn.config import OPSCConfig, QuantConfig
from .quantize import quantize_
from .registry import backends, current_backend, use_backend

__version__ = "0.1.0"

__all__ = ["quantize_", "QuantConfig", "OPSCConfig", "backends", "use_backend", "current_backend", "__version__"]
