"""The native decode step over a range of decoder layers (and optionally the final norm and LM
head), built from a :class:`~.spec.DecoderDescription`: each token is one C++ call
(``splitkernels._C.DecodeStack.step``) for all the layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._native import load
from ..formats.dtypes import DTYPE_CODE
from ..nn.linear import QuantLinear, dense_weight, is_plain_linear
from .cache import FastCache
from .spec import NO_ROPE, DecoderDescription, Experts, FastPathUnsupported, HeadNorm, RowSlice, describe, rotary_table

_C, _C_ERROR = load("_C")

HEAD_FORMATS = ("int8", "fp32")
_LOWBIT, _DENSE, _INT8 = 0, 1, 2


def _dense(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight [out, in] as its forward multiplies by it (a QuantLinear's
    dequantised, a Conv1D's transposed)."""
    return linear.dequantize(torch.float32) if isinstance(linear, QuantLinear) else dense_weight(linear)[0]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``weight [N, K]``: (codes int8 [N, K], scales fp32 [N]) with
    ``weight ~= codes * scales[:, None]`` (scale = absmax / 127; an all-zero row gets scale 1)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


class _NativeWeights:
    """The tensors a native stack points at, held (contiguous, fp32 where it computes) as long
    as the stack lives, and the weight dictionaries the binding reads."""

    def __init__(self) -> None:
        self._keep: list[torch.Tensor] = []  # everything the C++ side points at

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        self._keep.append(t)
        return t

    def _vector(self, t: torch.Tensor) -> int:
        return _ptr(self._hold(t.float()))

    def _linear(self, module: nn.Module | RowSlice | None) -> dict:
        """A linear layer's weights (of a RowSlice: its rows' views, every tensor being row-major
        per output row) as the binding reads them ({}: none)."""
        if module is None:
            return {}
        rows = slice(None)
        if isinstance(module, RowSlice):
            module, rows = module.linear, slice(module.start, module.stop)
        if isinstance(module, QuantLinear):
            bias, (n, k) = module.bias, (module.out_features, module.in_features)
        else:
            weight, bias = dense_weight(module)  # [out, in]: a Conv1D's transposed (held as a copy)
            n, k = weight.shape
        out = {"N": len(range(n)[rows]), "K": int(k),
               "bias": 0 if bias is None else _ptr(self._hold(bias[rows].float()))}
        if isinstance(module, QuantLinear):
            qw = module.quantized_weight()
            out.update(kind=_LOWBIT, qweight=_ptr(self._hold(qw.qweight[rows])), words=int(qw.qweight.shape[1]),
                       scale=_ptr(self._hold(qw.scale[rows])), zero=_ptr(self._hold(qw.zero[rows])),
                       scale_dtype=DTYPE_CODE[qw.scale.dtype], bits=int(qw.bits), group_size=int(qw.group_size))
        else:
            out.update(kind=_DENSE, weight=_ptr(self._hold(weight[rows].float())))
        return out

    def _head(self, module: nn.Module, fmt: str) -> dict:
        if isinstance(module, QuantLinear) or fmt == "fp32":
            return self._linear(module)
        codes, scales = quantize_rows_int8(module.weight)
        bias = getattr(module, "bias", None)
        # The fp32 weight (the model's own, not a copy) lets the fused argmax be the fp32 head's.
        return {"kind": _INT8, "N": int(module.out_features), "K": int(module.in_features),
                "w8": _ptr(self._hold(codes)), "w8_scale": _ptr(self._hold(scales)),
                "weight": _ptr(self._hold(module.weight.float())),
                "bias": 0 if bias is None else _ptr(self._hold(bias.float()))}


@dataclass(frozen=True)
class LogitMap:
    """What a model's forward does to its LM head's output, applied after the native top k:
    division (Granite's logits_scaling), multiplication (Cohere's logit_scale, HyperCLOVA X's
    logits_scaling), then a soft cap ``cap * tanh(x / cap)`` (Gemma 2), with the torch operations
    the forwards use. Every factor is positive, so the map is increasing and keeps the top k's
    order (where two values round equal after it, the larger logit still ranks first)."""

    divisor: float = 1.0
    multiplier: float = 1.0
    softcap: float = 0.0  # 0: none

    def apply(self, *logits: torch.Tensor | None) -> None:
        """Map each of ``logits`` (None: skipped) in place."""
        for t in logits:
            if t is None:
                continue
            if self.divisor != 1.0:
                t.div_(self.divisor)
            if self.multiplier != 1.0:
                t.mul_(self.multiplier)
            if self.softcap:
                t.div_(self.softcap).tanh_().mul_(self.softcap)


def _check_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}], got {k!r}")


class NativeHead(_NativeWeights):
    """A model's LM head alone, natively, for a model whose own forward runs everything before
    it (families the native decode step does not cover): the exact top k of one normed hidden
    state, as :meth:`NativeDecoder.step_top` takes them, from the head's int8 rows (``"int8"``,
    with the fp32 weight for the rows near the k-th) or its fp32 weight (``"fp32"``); a low-bit
    head runs as stored. The head must be an ``nn.Linear`` of fp32 weights or a QuantLinear.
    ``logit_map``: what the model's forward does to the head's output (the top k's values then
    are the model's logits)."""

    def __init__(self, head: nn.Module, fmt: str = "int8", logit_map: LogitMap = LogitMap()) -> None:
        super().__init__()
        if _C is None:
            raise FastPathUnsupported(f"the native decode step is not built: {_C_ERROR}")
        if fmt not in HEAD_FORMATS:
            raise ValueError(f"fmt must be one of {HEAD_FORMATS}, got {fmt!r}")
        if not (isinstance(head, QuantLinear) or (is_plain_linear(head) and isinstance(head, nn.Linear))):
            raise FastPathUnsupported(f"the LM head is a {type(head).__name__}, not an nn.Linear or QuantLinear")
        if not isinstance(head, QuantLinear) and head.weight.dtype != torch.float32:
            raise FastPathUnsupported(f"the native head computes in float32; the LM head is {head.weight.dtype}")
        devices = {t.device for t in (*head.parameters(), *head.buffers())}
        if any(device.type != "cpu" for device in devices):
            raise FastPathUnsupported(f"the native head runs on the CPU; the LM head is on {sorted(map(str, devices))}")
        self.hidden, self.vocab = int(head.in_features), int(head.out_features)
        self.logit_map = logit_map
        # No layers: the shape's attention sizes are placeholders that nothing reads.
        self.stack = _C.DecodeStack(self.hidden, 1, 1, 2, 1, 1.0)
        self.stack.set_head(0, 0.0, self._head(head, fmt))

    def top(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` rows of largest logit for ``hidden [d]`` (the head's input, normed): ids
        ``[k]`` int64 and their fp32 logits ``[k]``, largest first, ties by lower id."""
        ids, vals = self.top_rows(hidden.reshape(1, -1), k)
        return ids[0], vals[0]

    def top_rows(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`top` of each row of ``hidden [M, d]`` in one pass over the head: ``[M, k]`` each
        (every row as :meth:`top` gives it alone, bit for bit)."""
        _check_k(k, self.vocab)
        if hidden.dim() != 2 or hidden.shape[0] < 1 or hidden.shape[1] != self.hidden:
            raise ValueError(f"hidden must be [rows >= 1, {self.hidden}], got {list(hidden.shape)}")
        rows = hidden.shape[0]
        h = hidden.detach().to(torch.float32, copy=True).contiguous()
        ids = torch.empty(rows, k, dtype=torch.int64)
        vals = torch.empty(rows, k, dtype=torch.float32)
        # No layers: each row's position, cache and rotary rows are placeholders nothing reads.
        zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows, dtype=torch.int64)
        self.stack.step_batch(_ptr(h), rows, _ptr(zeros), _ptr(zeros), _ptr(ones), _ptr(zeros), _ptr(zeros), 0, k,
                              _ptr(ids), _ptr(vals))
        self.logit_map.apply(vals)
        return ids, vals


class NativeDecoder(_NativeWeights):
    """Layers ``first..last-1`` of a model (and its head when ``head`` is a format) as one native
    call per token. Holds the tensors the C++ side points at; the model must outlive it.

    ``head``: None (the range ends at a split), ``"int8"`` (the LM head as per-row int8 weights
    run W8A8 on the CPU's int8 dot instructions; the fused argmax and top k still equal the fp32
    head's, see csrc/cpu/decode/decode.h)
    or ``"fp32"`` (the dense head as it is). A low-bit LM head (OPSC) runs as stored.
    """

    def __init__(self, model: nn.Module, first: int, last: int, head: str | None = None) -> None:
        if _C is None:
            raise FastPathUnsupported(f"the native decode step is not built: {_C_ERROR}")
        super().__init__()
        if head is not None and head not in HEAD_FORMATS:
            raise ValueError(f"head must be None or one of {HEAD_FORMATS}, got {head!r}")
        d: DecoderDescription = describe(model, first, last)
        self.description = d
        self._model = model
        self.first, self.last = first, last
        self.head = head
        self.stack = _C.DecodeStack(d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate, d.attn_scale, d.act,
                                    d.attn_softcap, d.rope_interleaved, d.residual_scale, d.q_pos_beta,
                                    d.q_pos_period, d.rotary_dim, layer_norm=d.layer_norm, parallel=d.parallel,
                                    gated=d.gated, clip_qkv=d.clip_qkv)
        alibi = 0 if d.alibi is None else self._vector(d.alibi)
        for i in range(first, last):
            m = d.layers[i]
            self.stack.add_layer(self._norm(m.input_norm), self._norm(m.post_norm), m.eps,
                                 *(self._linear(x) for x in (m.q, m.k, m.v, m.o, m.gate, m.up, m.down)),
                                 qkv=self._linear(m.qkv),
                                 qkv_rows=0 if m.qkv_rows is None else _ptr(self._hold(m.qkv_rows)),
                                 **self._head_norms(m.q_norm, m.k_norm),
                                 attn_out_norm=self._norm(m.attn_out_norm), mlp_out_norm=self._norm(m.mlp_out_norm),
                                 window=m.window, rope=m.rope, head_norm_whole=m.head_norm_whole,
                                 input_norm_bias=self._norm_bias(m.input_norm),
                                 post_norm_bias=self._norm_bias(m.post_norm),
                                 moe=self._experts(m.experts), sinks=0 if m.sinks is None else self._vector(m.sinks),
                                 alibi=alibi)
        if head is not None:
            self.stack.set_head(self._norm(d.final_norm), d.final_eps, self._head(d.lm_head, head),
                                self._norm_bias(d.final_norm))
            self.vocab = int(d.lm_head.out_features)
        self.logit_map = LogitMap(d.logit_divisor, d.logit_multiplier, d.logit_softcap)
        # (cos, sin) as one attribute: sessions on other threads read both tables of one size.
        self._rope: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    def _norm(self, module: nn.Module | None) -> int:
        """A norm's weights as the native step multiplies by them (the family's offset added:
        Gemma's norms scale by 1 + w, computed in fp32 as its forward does; ones for a LayerNorm
        without weights); 0 for no norm."""
        if module is None:
            return 0
        weight = getattr(module, "weight", None)
        return self._norm_weight(torch.ones(self.description.hidden) if weight is None else weight)

    def _norm_weight(self, weight: torch.Tensor) -> int:
        offset = self.description.norm_offset
        return self._vector(weight.float() + offset if offset else weight)

    def _head_norms(self, q: HeadNorm | None, k: HeadNorm | None) -> dict:
        """The query and key head norms as the binding reads them ({}: none)."""
        if q is None:
            return {}
        return {"q_norm": self._norm_weight(q.weight), "k_norm": self._norm_weight(k.weight),
                "q_norm_bias": 0 if q.bias is None else self._vector(q.bias),
                "k_norm_bias": 0 if k.bias is None else self._vector(k.bias), "head_norm_each": q.each}

    def _experts(self, experts: Experts | None) -> dict:
        """A mixture of experts as the binding reads it ({}: none); the 3-D weights are the
        model's own fp32 tensors, not copies."""
        if experts is None:
            return {}
        width = experts.down.shape[1 if experts.input_major else 2]
        out = {"experts": experts.router.shape[0], "top_k": experts.top_k, "expert_dim": width,
               "renormalize": experts.renormalize, "sigmoid": experts.sigmoid,
               "choose_by_logit": experts.choose_by_logit, "groups": experts.groups,
               "top_groups": experts.top_groups, "routed_scale": experts.routed_scale,
               "choice_bias": 0 if experts.choice_bias is None else self._vector(experts.choice_bias),
               "router": self._vector(experts.router), "gate_up": self._vector(experts.gate_up),
               "down": self._vector(experts.down), "input_major": experts.input_major, "alternate": experts.alternate,
               "swiglu_alpha": experts.swiglu_alpha, "swiglu_limit": experts.swiglu_limit}
        for name in ("gate_up_bias", "down_bias", "router_bias"):
            bias = getattr(experts, name)
            if bias is not None:
                out[name] = self._vector(bias)
        if experts.shared is not None:
            gate, up, down, scale = experts.shared
            out.update(shared_gate=self._linear(gate), shared_up=self._linear(up), shared_down=self._linear(down),
                       shared_scale=0 if scale is None else self._vector(_dense(scale).reshape(-1)))
        return out

    def _norm_bias(self, module: nn.Module | None) -> int:
        """A LayerNorm's bias (0: none)."""
        bias = getattr(module, "bias", None)
        return 0 if bias is None else self._vector(bias)

    def embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """The token embeddings of ``ids [..., T]`` at positions ``start..start+T-1`` as the
        model's forward feeds them to its first layer (Granite's forward multiplies them by its
        embedding multiplier, GPT-2's adds its position embeddings, Bloom's norms them)."""
        d = self.description
        embedded = self._model.get_input_embeddings()(ids)
        if d.embed_scale != 1.0:
            embedded = embedded * d.embed_scale
        if d.positions is not None:
            rows = d.positions.shape[0] - d.position_offset
            if start + ids.shape[-1] > rows:
                raise ValueError(f"position {start + ids.shape[-1] - 1} is past the model's {rows} positions")
            first = start + d.position_offset
            embedded = embedded + d.positions[first:first + ids.shape[-1]]
        if d.embed_norm is not None:
            embedded = d.embed_norm(embedded)
        return embedded

    # -- rotary table ------------------------------------------------------------------------------
    def _rope_rows(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[>= capacity, tables, head_dim]`` of positions ``0..`` from the model's own
        rotary module, one table per rotary type (``DecoderDescription.rope_types``; returned, so
        a step keeps its tables alive while another session grows them)."""
        cos, sin = self._rope
        if cos.shape[0] >= capacity:
            return cos, sin
        d = self.description
        # Row p as a decode step at p has it: longrope's rows switch at d.rope_switch (two calls).
        cuts = [0, *([d.rope_switch] if 0 < d.rope_switch < capacity else []), capacity]
        # Every table head_dim wide: a partial one's tail (cos 1, sin 0) is never read.
        cos = torch.ones(capacity, len(d.rope_types), d.head_dim)
        sin = torch.zeros(capacity, len(d.rope_types), d.head_dim)
        for i, kind in enumerate(d.rope_types):
            if kind == NO_ROPE:
                continue
            spans = (torch.arange(a, b).unsqueeze(0) for a, b in zip(cuts, cuts[1:]))
            c, s = (torch.cat(t, dim=1) for t in zip(*(rotary_table(d.rotary, kind, p, d.head_dim) for p in spans)))
            if c.shape[-1] != d.rotary_dim:
                raise FastPathUnsupported(f"a rotary table is {c.shape[-1]} wide, not rotary_dim = {d.rotary_dim}")
            if d.rope_table_repeated:  # the angles twice over, as the native step reads them
                c, s = (torch.cat([t[..., 0::2], t[..., 0::2]], dim=-1) for t in (c, s))
            cos[:, i, :d.rotary_dim], sin[:, i, :d.rotary_dim] = c[0], s[0]
        self._rope = (cos, sin)
        return self._rope

    # -- decoding ----------------------------------------------------------------------------------
    def new_cache(self, new_dynamic, min_capacity: int = 64) -> FastCache:
        """An empty cache for one sequence; ``new_dynamic()`` makes the eager path's cache (prefill)."""
        d = self.description
        return FastCache(new_dynamic, self.first, self.last, d.kv_heads, d.head_dim, min_capacity, d.cache_repeats)

    def step(self, hidden: torch.Tensor, cache: FastCache, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """One token: ``hidden [d]`` (the layer range's input) at position ``cache.length``.
        Returns (the range's output ``[d]`` fp32, the argmax token or -1 without a head);
        fills ``logits [vocab]`` fp32 when given (a head is needed; an int8 head then computes
        them from the fp32 weight, so they are the model's own)."""
        h, token = self._run(hidden, cache, logits, 1, None, None)
        return h, token

    def step_top(self, hidden: torch.Tensor, cache: FastCache, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token as :meth:`step`, returning (output ``[d]``, the ``k`` token ids of largest
        logit ``[k]`` int64, their logits ``[k]`` fp32), largest first, ties by lower id. The
        logits are the fp32 head's (an int8 head recomputes its top rows in fp32), so a top-k
        sampler over them draws from the same distribution as over the full fp32 logits."""
        if not getattr(self, "vocab", 0):
            raise ValueError("step_top needs a decoder with a head")
        _check_k(k, self.vocab)
        ids = torch.empty(k, dtype=torch.int64)
        vals = torch.empty(k, dtype=torch.float32)
        h, _ = self._run(hidden, cache, None, k, ids, vals)
        return h, ids, vals

    def step_batch(self, hidden: torch.Tensor, caches: list[FastCache], k: int, logits: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One token of each of M sequences as one native call (continuous batching): row ``m``
        of ``hidden [M, d]`` at position ``caches[m].length``; every weight is read once for all
        rows. Returns (outputs ``[M, d]`` fp32, the top ``k`` ids ``[M, k]`` int64 and their fp32
        logits ``[M, k]`` as :meth:`step_top`, all fp32 logits ``[M, vocab]`` when ``logits`` else
        None). Each row equals :meth:`step_top` (and :meth:`step` with logits) on that row alone,
        bit for bit: the native sums run in the same order."""
        vocab = getattr(self, "vocab", 0)
        if not vocab:
            raise ValueError("step_batch needs a decoder with a head")
        _check_k(k, vocab)
        rows = len(caches)
        if rows < 1 or hidden.dim() != 2 or tuple(hidden.shape) != (rows, self.description.hidden):
            raise ValueError(f"hidden must be [{rows}, {self.description.hidden}] for {rows} caches (at least one), "
                             f"got {list(hidden.shape)}")
        if len({id(c) for c in caches}) != rows:
            raise ValueError("caches must be distinct (one row per sequence)")
        pos = [c.length for c in caches]
        statics = [c.static(p + 1) for c, p in zip(caches, pos)]
        cos, sin = self._rope_rows(max(cap for _, cap in statics))
        row_bytes = cos.stride(0) * cos.element_size()
        h = hidden.detach().to(torch.float32, copy=True).contiguous()
        pointers = torch.tensor([pos, [cap for _, cap in statics], [kv.data_ptr() for kv, _ in statics],
                                 [cos.data_ptr() + p * row_bytes for p in pos],
                                 [sin.data_ptr() + p * row_bytes for p in pos]], dtype=torch.int64)
        ids = torch.empty(rows, k, dtype=torch.int64)
        vals = torch.empty(rows, k, dtype=torch.float32)
        full = torch.empty(rows, vocab, dtype=torch.float32) if logits else None
        self.stack.step_batch(_ptr(h), rows, _ptr(pointers[0]), _ptr(pointers[2]), _ptr(pointers[1]),
                              _ptr(pointers[3]), _ptr(pointers[4]), _ptr(full), k, _ptr(ids), _ptr(vals))
        for c in caches:
            c.advance()
        self.logit_map.apply(vals, full)
        return h, ids, vals, full

    def _run(self, hidden: torch.Tensor, cache: FastCache, logits: torch.Tensor | None, k: int,
             ids: torch.Tensor | None, vals: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        pos = cache.length
        kv, capacity = cache.static(pos + 1)
        cos, sin = self._rope_rows(capacity)
        h = hidden.detach().reshape(-1).to(torch.float32, copy=True)
        if logits is not None and (logits.dtype != torch.float32 or not logits.is_contiguous()
                                   or logits.numel() != getattr(self, "vocab", -1)):
            raise ValueError(f"logits must be a contiguous float32 tensor of the head's {getattr(self, 'vocab', 0)} "
                             "rows (and the decoder must have a head)")
        if h.numel() != self.description.hidden:
            raise ValueError(f"hidden must hold {self.description.hidden} values, got {h.numel()}")
        token = self.stack.step(_ptr(h), pos, _ptr(kv), capacity, _ptr(cos[pos]), _ptr(sin[pos]), _ptr(logits),
                                k, _ptr(ids), _ptr(vals))
        cache.advance()
        self.logit_map.apply(logits, vals)
        return h, token
