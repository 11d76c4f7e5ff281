"""Drop-in low-bit replacements for ``nn.Linear`` (and transformers' ``Conv1D``) and ``nn.Embedding``."""
from __future__ import annotations

import torch
from torch import nn

from ..formats import (
    WEIGHT_BITS,
    WEIGHT_FORMAT_VERSION,
    WEIGHT_META_KEYS,
    WEIGHT_TENSOR_KEYS,
    QuantizedWeight,
    dequantize_weight,
    packed_words,
)
from ..ops import lowbit_linear
from ..ops.checks import check_choice
from ..quant import quantize_weight

# 0-d int tensors that travel in every state_dict next to the packed tensors (docs/FORMATS.md §2).
_META = WEIGHT_META_KEYS
_PACKED = WEIGHT_TENSOR_KEYS


def _check_layout(in_features: int, bits: int, group_size: int) -> None:
    check_choice("bits", bits, WEIGHT_BITS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or -1 (per channel), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size must divide in_features = {in_features}, got {group_size}")


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [out, in], bias)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    if is_conv1d(module):
        return module.weight.detach().t(), None if module.bias is None else module.bias.detach()
    raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` projections (a linear layer with the weight transposed)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the layer itself
        return False
    return isinstance(module, Conv1D)


# nn.Linear subclasses whose own forward computes x @ W^T + b as nn.Linear's does (Falcon's
# spells out the product), by module and class name.
_PLAIN_SUBCLASSES = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or ``Conv1D``) that computes only ``x @ W^T + b``: what QuantLinear can
    stand in for. Subclasses with their own ``forward`` (MoE routers that also return indices,
    say) are left alone, but for those known to compute just that."""
    if is_conv1d(module):
        return True
    cls = type(module)
    return isinstance(module, nn.Linear) and (cls.forward is nn.Linear.forward
                                              or f"{cls.__module__}.{cls.__qualname__}" in _PLAIN_SUBCLASSES)


class _PackedWeightModule(nn.Module):
    """Shared storage and (de)serialisation of a packed weight held as buffers.

    The format metadata lives in Python attributes and is written into / checked from the
    state_dict by the hooks below, so a checkpoint is plain tensors (torch.save or safetensors)
    and loading one with another format version fails before any tensor is copied.
    """

    bits: int
    group_size: int
    in_features: int
    # False where the layout travels elsewhere (a transformers quantization_config): the
    # state_dict then holds only tensors that exist as buffers.
    write_layout_to_state_dict: bool = True

    def _init_packed(self, n: int, k: int, bits: int, group_size: int, dtype, device) -> None:
        group_size = k if group_size == -1 else group_size
        _check_layout(k, bits, group_size)
        self.bits, self.group_size, self.in_features = bits, group_size, k
        words = packed_words(k, bits)
        self.register_buffer("qweight", torch.zeros(n, words, dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(n, k // group_size, dtype=dtype, device=device))
        self.register_buffer("zero", torch.zeros(n, k // group_size, dtype=dtype, device=device))

    def _set_packed(self, qw: QuantizedWeight) -> None:
        self.qweight, self.scale, self.zero = qw.qweight, qw.scale, qw.zero
        self.bits, self.group_size, self.in_features = qw.bits, qw.group_size, qw.in_features

    def quantized_weight(self) -> QuantizedWeight:
        """The packed weight as a :class:`~splitkernels.quant.QuantizedWeight` (shares storage)."""
        return QuantizedWeight(self.qweight, self.scale, self.zero, self.bits, self.group_size, self.in_features)

    def _forward_weight(self) -> QuantizedWeight:
        """:meth:`quantized_weight`, one object while the buffers and layout stay the same: ops
        keep their per-weight work (``ops.weight_plan``) on it, which a new object per call loses.
        Loading a checkpoint, ``.to()`` or assigning a buffer makes a new one."""
        qw = self.__dict__.get("_forward_qw")
        buffers = self._buffers
        if (qw is None or qw.qweight is not buffers["qweight"] or qw.scale is not buffers["scale"]
                or qw.zero is not buffers["zero"] or qw.bits != self.bits or qw.group_size != self.group_size
                or qw.in_features != self.in_features):
            qw = self.__dict__["_forward_qw"] = self.quantized_weight()
        return qw

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` this module computes with."""
        return self.quantized_weight().dequantize(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.write_layout_to_state_dict:
            return
        meta = dict(format_version=WEIGHT_FORMAT_VERSION, bits=self.bits, group_size=self.group_size,
                    in_features=self.in_features)
        for name in _META:
            destination[prefix + name] = torch.tensor(meta[name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta = {name: int(state_dict[prefix + name]) for name in _META if prefix + name in state_dict}
        version = meta.get("format_version")
        if version is not None and version != WEIGHT_FORMAT_VERSION:
            raise ValueError(
                f"{prefix}format_version is {version}, but this splitkernels reads packed weight format "
                f"version {WEIGHT_FORMAT_VERSION}; re-quantise the model or use a matching splitkernels release"
            )
        if strict:
            missing_keys.extend(prefix + name for name in _META if name not in meta)
        if len(meta) == len(_META) and meta["in_features"] == self.in_features:
            # A checkpoint may use other bits or groups than this module was built with (e.g. a
            # per-layer override): adopt its layout so the buffers take the stored shapes.
            _check_layout(meta["in_features"], meta["bits"], meta["group_size"])
            self.bits, self.group_size = meta["bits"], meta["group_size"]
            for name in _PACKED:
                stored = state_dict.get(prefix + name)
                current = getattr(self, name)
                if stored is not None and stored.shape[0] == current.shape[0]:
                    setattr(self, name, torch.empty(stored.shape, dtype=current.dtype, device=current.device))
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] not in _META}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class QuantLinear(_PackedWeightModule):
    """``y = x @ W^T + b`` with ``W`` stored group-wise at 2/3/4/8 bits; computes via
    :func:`splitkernels.ops.lowbit_linear` on whichever backend serves the input's device.

    Build one with :meth:`from_linear`; the constructor allocates an empty layer of a given
    layout for loading a checkpoint into. Inference only: nothing here is a trainable parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.out_features = out_features
        self._init_packed(out_features, in_features, bits, group_size, dtype, device)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int = 4, group_size: int = 128, clip_search: bool = False,
                    dtype: torch.dtype | None = None) -> "QuantLinear":
        """Quantise an ``nn.Linear`` (or transformers ``Conv1D``) into a new QuantLinear.

        ``group_size`` must divide ``in_features`` or be ``-1`` (per channel);
        :func:`splitkernels.nn.replace_linear` picks a fitting size for you. ``dtype`` is the
        dtype of scales, zeros and bias (default: the weight's).
        """
        weight, bias = dense_weight(linear)
        k = weight.shape[1]
        qw = quantize_weight(weight, bits, k if group_size == -1 else group_size, clip_search=clip_search,
                             dtype=dtype or weight.dtype)
        return cls.from_quantized(qw, bias)

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap an already packed weight (and optional bias, cast to the scale dtype)."""
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        layer = cls(qweight.in_features, qweight.out_features, bias is not None, qweight.bits, qweight.group_size,
                    qweight.scale.dtype, qweight.scale.device)
        layer._set_packed(qweight)
        if bias is not None:
            layer.bias = bias.detach().to(device=qweight.scale.device, dtype=qweight.scale.dtype).clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_linear(x, self._forward_weight(), self._buffers["bias"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}")


class QuantEmbedding(_PackedWeightModule):
    """An ``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is stored at low bits.

    Each row is its own bit stream, so a lookup gathers only the requested rows and
    dequantises them; the table never exists densely.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_packed(num_embeddings, embedding_dim, bits, group_size, dtype, device)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 4, group_size: int = 128,
                       clip_search: bool = False, dtype: torch.dtype | None = None) -> "QuantEmbedding":
        """Quantise an ``nn.Embedding`` table row-wise (groups along the embedding dimension)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        weight = embedding.weight.detach()
        v, d = weight.shape
        qw = quantize_weight(weight, bits, d if group_size == -1 else group_size, clip_search=clip_search,
                             dtype=dtype or weight.dtype)
        layer = cls(v, d, bits, qw.group_size, qw.scale.dtype, weight.device)
        layer._set_packed(qw)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = dequantize_weight(self.qweight[flat], self.scale[flat].float(), self.zero[flat].float(),
                                           self.bits, self.group_size, self.in_features)
        return rows.to(self.scale.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
