"""Drop-in low-bit layers: :class:`QuantLinear`, :class:`QuantEmbedding` and :func:`replace_linear`."""
from .config import PER_CHANNEL, QuantConfig
from .linear import QuantEmbedding, QuantLinear
from .replace import replace_linear

__all__ = ["QuantConfig", "QuantLinear", "QuantEmbedding", "replace_linear", "PER_CHANNEL"]
