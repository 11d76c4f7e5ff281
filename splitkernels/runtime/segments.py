"""The two halves of a split model: the edge (embedding + layers 1..l) and the server
(layers l+1..L + final norm + LM head). Each runs the model's own forward on its own layers
against its own KV cache (see :mod:`splitkernels.models.split`).

With ``fast=True`` (the default) a segment whose layers the native decode step covers
(:mod:`splitkernels.fastpath`) runs one-token steps natively on a cache from
:meth:`_Segment.new_decode_cache`; prompts, multi-token steps and plain caches from
:meth:`_Segment.new_cache` take the eager path. ``fast_reason`` says why a segment is eager.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..fastpath import FastCache, FastPathUnsupported, LogitMap, NativeDecoder, NativeHead
from ..models.layout import cache_nbytes as _layout_cache_nbytes, text_config
from ..models.split import Adapter
from .protocol import SamplingParams
from .sampling import FUSED_TOP_K, sample, sample_top

__all__ = ["Edge", "Server", "cache_nbytes", "pick_token"]

# Config fields of transformers models that change the logits after the LM head (soft-capping,
# scaling); a model with any of them set keeps its own head (the probe would also catch most).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "lm_head_multiplier")


def _logit_maps(config) -> list[tuple[str, LogitMap]]:
    """The maps the model's forward may apply to its LM head's output, as the config fields that
    name one read (logits_scaling divides Granite's logits and multiplies HyperCLOVA X's), and
    none last; the server's probe keeps the one that gives the model's logits."""
    maps = []
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is None or value is False or value == 1:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise FastPathUnsupported(f"the model transforms its LM head's output ({name} = {value!r})")
        v = float(value)
        if name == "final_logit_softcapping":
            maps.append((f"{name} = {value!r}", LogitMap(softcap=v)))
        else:
            if name == "logits_scaling":
                maps.append((f"1 / {name} = {value!r}", LogitMap(divisor=v)))
            maps.append((f"{name} = {value!r}", LogitMap(multiplier=v)))
    return [*maps, ("", LogitMap())]


def cache_nbytes(cache) -> int:
    """Bytes a segment's cache holds (an eager transformers cache or a fast-path cache)."""
    return cache.nbytes() if isinstance(cache, FastCache) else _layout_cache_nbytes(cache)


class _Segment:
    """Decoder layers ``first..last-1`` (0-based) of an adapter's model."""

    def __init__(self, adapter: Adapter, first: int, last: int, fast: bool = True, head: str | None = None) -> None:
        self.adapter = adapter
        self.first, self.last = first, last
        self.layers = adapter.layers[first:last]
        self._kv_per_token: int | None = None
        self.native: NativeDecoder | None = None
        self.fast_reason = "the eager path was requested (fast=False)"
        if fast:
            try:
                self.native = NativeDecoder(adapter.model, first, last, head=head)
                self.fast_reason = None
            except FastPathUnsupported as exc:
                self.fast_reason = str(exc)

    @property
    def fast(self) -> bool:
        """Whether one-token steps on a :meth:`new_decode_cache` run natively."""
        return self.native is not None

    def _first_parameter(self) -> torch.Tensor:
        # Low-bit layers with weightless norms hold only buffers: their float scales tell the dtype.
        for tensors in (lambda m: m.parameters(), lambda m: (b for b in m.buffers() if b.is_floating_point())):
            found = next((t for m in self.layers for t in tensors(m)), None)
            if found is not None:
                return found
        return self.adapter.parameter()

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def new_cache(self):
        """An empty KV cache for one sequence; only this segment's layers fill it."""
        return self.adapter.new_cache(self.first, self.last)

    def new_decode_cache(self):
        """A cache for token-by-token generation: the fast path's when this segment has one
        (a :class:`~splitkernels.fastpath.FastCache`), else the eager :meth:`new_cache`."""
        return self.native.new_cache(self.new_cache) if self.native is not None else self.new_cache()

    def _probe(self, cache) -> None:
        raise NotImplementedError

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one more token adds across this segment's layers, measured on the
        model's own cache (state of fixed size, such as a recurrent layer's, is not per token)."""
        if self._kv_per_token is None:
            cache = self.new_cache()
            self._probe(cache)
            one = cache_nbytes(cache)
            self._probe(cache)
            self._kv_per_token = cache_nbytes(cache) - one
        return self._kv_per_token

    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers this segment uses."""
        return self.adapter.weight_bytes(self.first, self.last)


class Edge(_Segment):
    """Embedding and decoder layers ``1..split_layer``."""

    def __init__(self, adapter: Adapter, split_layer: int, fast: bool = True) -> None:
        super().__init__(adapter, 0, split_layer, fast)
        self.view = adapter.front_view(split_layer)

    def _probe(self, cache) -> None:
        self.forward(torch.zeros(1, 1, dtype=torch.long), cache, _cached(cache, self.first, self.last) or 0)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Run ``input_ids [1, T]`` at positions ``start..start+T-1``; the split-layer output ``[T, d]``.

        ``start`` must equal the number of positions ``cache`` holds; with ``cache=None`` nothing
        is cached (teacher-forced full forward, ``start`` must be 0).
        """
        _check_start(cache, start, self.first, self.last)
        if isinstance(cache, FastCache):
            if input_ids.shape[-1] == 1:
                embedded = self.native.embed(input_ids.reshape(1, 1).to(self.device), start)
                hidden, _ = self.native.step(embedded.reshape(-1), cache)
                return hidden.view(1, -1).to(self.dtype)
            cache = cache.dynamic()
        return self.adapter.run_front(self.view, input_ids.to(self.device), cache)[0]


class Server(_Segment):
    """Decoder layers ``split_layer+1..L``, final norm and LM head.

    Where the native step does not cover the layers (``fast_reason``), each step (the prompt's
    too) takes its token from the native LM head (:class:`~splitkernels.fastpath.NativeHead`, the
    ``head`` format) after the model's own forward up to the head, when the head is an fp32
    ``nn.Linear`` (or QuantLinear) whose output is the model's logits; ``head_reason`` says why not.
    """

    def __init__(self, adapter: Adapter, split_layer: int, fast: bool = True, head: str = "int8") -> None:
        super().__init__(adapter, split_layer, adapter.num_layers, fast, head)
        self.view = adapter.back_view(split_layer)
        self.native_head: NativeHead | None = None
        self.head_view: torch.nn.Module | None = None  # the view that stops at the head, for native_head
        self.head_reason = self.fast_reason
        if fast and self.native is None:
            try:
                self.native_head, self.head_view = self._eager_native_head(split_layer, head)
                self.head_reason = None
            except FastPathUnsupported as exc:
                self.head_reason = str(exc)

    def _eager_native_head(self, split_layer: int, fmt: str) -> tuple[NativeHead, torch.nn.Module]:
        """The native head and the view that stops at it, after checking on a probe hidden state
        that the model's logits are its head's output as they are, or as one map its config names
        makes them (:func:`_logit_maps`; the native head then applies it to its top k)."""
        adapter = self.adapter
        maps = _logit_maps(text_config(adapter.config))
        view = adapter.head_input_view(split_layer)
        if view is None:
            raise FastPathUnsupported("the LM head is not a module of the model's root")
        head = adapter.model.get_output_embeddings()
        probe = torch.randn(1, 1, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            logits = adapter.run_back(self.view, probe, None, last_only=True)
            x = adapter.run_back_to_head(view, probe, None)
            direct = head(x.view(1, 1, -1))[0, -1].float()
        for _, logit_map in maps:
            mapped = direct.clone()
            logit_map.apply(mapped)
            if torch.allclose(mapped, logits.float(), rtol=1e-5, atol=1e-5 * float(logits.abs().max())):
                return NativeHead(head, fmt, logit_map), view
        named = ", ".join(name for name, _ in maps if name)
        raise FastPathUnsupported("the model's logits are not its LM head's output as it is"
                                  + (f" nor as {named} maps it" if named else ""))

    @property
    def _vocab(self) -> int:
        return (self.native or self.native_head).vocab

    def _head_inputs(self, hidden: torch.Tensor, cache, start: int, tail: int) -> torch.Tensor:
        """The model's own forward on ``hidden [T, d]`` at ``start..`` up to its LM head: the head's
        inputs for the last ``tail`` positions ``[tail, d]`` (for :attr:`native_head`)."""
        _check_start(cache, start, self.first, self.last)
        h = hidden.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        return self.adapter.run_back_to_head(self.head_view, h, cache, tail=tail)[0]

    def _probe(self, cache) -> None:
        start = _cached(cache, self.first, self.last) or 0
        self.forward(torch.zeros(1, self.adapter.hidden_size, dtype=self.dtype), cache, start)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache, start: int, last_only: bool = True,
                tail: int | None = None) -> torch.Tensor:
        """Run the split-layer hidden state ``[T, d]`` at positions ``start..``; logits.

        ``last_only``: logits of the last position ``[V]`` (the LM head on one row, as a model's
        ``generate`` does), else ``[1, T, V]``; ``tail``: of the last ``tail`` positions only,
        ``[1, tail, V]`` (speculative verification scores the drafts, not the whole prompt).
        """
        _check_start(cache, start, self.first, self.last)
        if isinstance(cache, FastCache):
            if hidden.shape[0] == 1 and last_only and tail is None:
                logits = torch.empty(self.native.vocab, dtype=torch.float32)
                self.native.step(hidden[0], cache, logits)
                return logits.to(self.dtype)
            cache = cache.dynamic()
        h = hidden.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        return self.adapter.run_back(self.view, h, cache, last_only, tail)

    def fused_k(self, sampling: SamplingParams) -> int:
        """Rows of the native head's exact top k a one-token step with ``sampling`` needs: 1
        (greedy: the argmax), ``top_k`` (top-k sampling with ``top_k`` up to ``FUSED_TOP_K``), or
        0 (any other sampling needs all logits). Needs the fast path or the native head."""
        if not sampling.do_sample:
            return 1
        return sampling.top_k if 0 < sampling.top_k <= min(FUSED_TOP_K, self._vocab - 1) else 0

    @torch.inference_mode()
    def argmax_tail(self, hidden: torch.Tensor, cache, start: int, tail: int) -> list[int]:
        """The argmax token after each of the last ``tail`` positions of ``hidden [T, d]`` at
        positions ``start..`` (appending to ``cache``): greedy verification of ``tail - 1`` drafts.
        The native head's exact argmax where the server has one, else the model's own logits."""
        if self.native_head is None:
            return torch.argmax(self.forward(hidden, cache, start, tail=tail)[0], dim=-1).tolist()
        return self.native_head.top_rows(self._head_inputs(hidden, cache, start, tail), 1)[0][:, 0].tolist()

    @torch.inference_mode()
    def next_token(self, hidden: torch.Tensor, cache, start: int, sampling: SamplingParams,
                   generator: torch.Generator | None = None) -> int:
        """The token after ``hidden [T, d]`` at positions ``start..``: :meth:`forward`, then
        :func:`~splitkernels.runtime.sampling.sample`. A one-token step on the fast path takes
        the argmax (greedy) or the top ``top_k`` rows (sampling with ``top_k`` up to
        ``FUSED_TOP_K``) from the native head, which selects them itself, instead of all logits
        (:meth:`fused_k`, :func:`pick_token`); so does any step of a server with a
        :attr:`native_head` (the prompt's too), after the model's own forward up to its head."""
        native_step = isinstance(cache, FastCache) and hidden.shape[0] == 1
        k = self.fused_k(sampling) if native_step or self.native_head is not None else 0
        if k:
            if self.native_head is None:
                _check_start(cache, start, self.first, self.last)
                _, ids, values = self.native.step_top(hidden[0], cache, k)
            else:
                ids, values = self.native_head.top(self._head_inputs(hidden, cache, start, 1)[0], k)
            return pick_token(sampling, generator, k, ids, values, None)
        return sample(self.forward(hidden, cache, start), sampling, generator)


def pick_token(sampling: SamplingParams, generator: torch.Generator | None, k: int, ids: torch.Tensor,
               values: torch.Tensor, logits: torch.Tensor | None) -> int:
    """A native step's token, ``k`` from :meth:`Server.fused_k`: greedy takes the head's exact
    argmax ``ids[0]``, top-k sampling draws from its exact top ``ids[:k]``/``values[:k]`` (largest
    first), other sampling (``k`` 0) from all ``logits``; draws as :func:`sample` makes them over
    full logits with ``generator``."""
    if not sampling.do_sample:
        return int(ids[0])
    if k:
        return sample_top(ids[:k], values[:k], sampling, generator)
    return sample(logits, sampling, generator)


def _cached(cache, first: int = 0, last: int | None = None) -> int | None:
    """Positions the attention layers ``first..last-1`` of ``cache`` hold (None where they keep
    no per-position state, e.g. only recurrent layers)."""
    if cache is None:
        return 0
    if isinstance(cache, FastCache):
        return cache.length
    layers = cache.layers[first:last]
    held = [layer.get_seq_length() for layer in layers if isinstance(layer, CacheLayerMixin)]
    return int(max(held)) if held else None


def _check_start(cache, start: int, first: int, last: int) -> None:
    # The model's forward takes positions from the cache; a caller's different idea is a bug.
    held = _cached(cache, first, last)
    if held is not None and start != held:
        raise ValueError(f"start must equal the positions already cached ({held}), got {start}")
