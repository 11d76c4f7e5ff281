"""Drop-in low-bit layers: :class:`QuantLinear`, :class:`QuantEmbedding` and :func:`replace_linear`."""
from .config import PER_CHANNEL, OPSCConfig, QuantConfig
from .linear import QuantEmbedding, QuantLinear
from .replace import replace_linear

__all__ = ["QuantConfig", "OPSCConfig", "QuantLinear", "QuantEmbedding", "replace_linear", "PER_CHANNEL"]
