"""The two halves of a split model: the edge (embedding + layers 1..l) and the server
(layers l+1..L + final norm + LM head). Each runs its own layers against its own KV cache."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .adapters import Adapter


def cache_nbytes(cache: DynamicCache | None) -> int:
    """Bytes held by the keys and values of ``cache`` (the layers a segment filled)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _positions(start: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).unsqueeze(0)


def _param_bytes(modules) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in list(m.parameters()) + list(m.buffers()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


class _Segment:
    """Decoder layers ``first..last-1`` (0-based) of an adapter's model."""

    def __init__(self, adapter: Adapter, first: int, last: int) -> None:
        self.adapter = adapter
        self.first, self.last = first, last
        self.layers = adapter.layers[first:last]

    def _first_parameter(self) -> torch.Tensor:
        modules = self.layers or self._own_modules()
        return next(p for m in modules for p in m.parameters())

    @property
    def device(self) -> torch.device:
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for one sequence; only this segment's layers fill it."""
        return self.adapter.new_cache()

    def _run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None):
        if not self.layers:
            return hidden
        masks = self.adapter.masks(hidden, position_ids, cache, self.first, self.last)
        pos_emb = self.adapter.position_embeddings(hidden, position_ids)
        for i, layer in enumerate(self.layers, start=self.first):
            hidden = self.adapter.call_layer(layer, hidden, mask=masks[self.adapter.layer_type(i)],
                                             position_ids=position_ids, position_embeddings=pos_emb, cache=cache)
        return hidden

    def _own_modules(self) -> list:
        raise NotImplementedError

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token adds across this segment's layers."""
        c = self.adapter.config
        heads = int(c.num_attention_heads)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or self.adapter.hidden_size // heads)
        return 2 * len(self.layers) * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers this segment uses."""
        return _param_bytes(self._own_modules())


class Edge(_Segment):
    """Embedding and decoder layers ``1..split_layer``."""

    def __init__(self, adapter: Adapter, split_layer: int) -> None:
        super().__init__(adapter, 0, split_layer)

    def _own_modules(self):
        return self.adapter.front_modules() + self.layers

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: DynamicCache | None, start: int) -> torch.Tensor:
        """Run ``input_ids [1, T]`` at positions ``start..start+T-1``; the split-layer output ``[T, d]``.

        With ``cache=None`` nothing is cached (teacher-forced full forward, ``start`` must be 0).
        """
        ids = input_ids.to(self.device)
        pos = _positions(start, ids.shape[1], ids.device)
        hidden = self.adapter.embed(ids, pos)
        return self._run_layers(hidden, pos, cache)[0]


class Server(_Segment):
    """Decoder layers ``split_layer+1..L``, final norm and LM head."""

    def __init__(self, adapter: Adapter, split_layer: int) -> None:
        super().__init__(adapter, split_layer, adapter.num_layers)

    def _own_modules(self):
        return self.layers + self.adapter.back_modules()

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: DynamicCache | None, start: int,
                last_only: bool = True, tail: int | None = None) -> torch.Tensor:
        """Run the split-layer hidden state ``[T, d]`` at positions ``start..``; logits.

        ``last_only``: logits of the last position ``[V]`` (the LM head on one row, as a model's
        ``generate`` does), else ``[1, T, V]``; ``tail``: of the last ``tail`` positions only,
        ``[1, tail, V]`` (speculative verification scores the drafts, not the whole prompt).
        """
        h = hidden.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        pos = _positions(start, h.shape[1], h.device)
        h = self._run_layers(h, pos, cache)
        if tail is not None:
            return self.adapter.head(h[:, -tail:, :])
        if last_only:
            return self.adapter.head(h[:, -1:, :])[0, -1]
        return self.adapter.head(h)
