"""The KV cache of one sequence on the fast path: the eager path's own cache for prefill (and
anything else that needs it), and a static, preallocated fp32 buffer for native decode steps.
One of the two holds the sequence at a time; switching copies it across."""
from __future__ import annotations

from typing import Callable

import torch


class FastCache:
    """Keys and values of layers ``first..last-1`` of one sequence.

    :meth:`dynamic` hands out the eager path's cache (rebuilt from the static buffer if native
    steps ran since); :meth:`static` hands out the buffer ``[layers, 2, kv_heads, capacity,
    head_dim]`` (filled from the eager cache if that ran since). The buffer grows by doubling.
    ``repeats``: the eager cache holds each key/value head that many times over, once for each of
    its query heads (Falcon's newer layout); the buffer holds it once.
    """

    def __init__(self, new_dynamic: Callable[[], object], first: int, last: int, kv_heads: int, head_dim: int,
                 min_capacity: int = 64, repeats: int = 1) -> None:
        self._new_dynamic = new_dynamic
        self.first, self.last = first, last
        self.kv_heads, self.head_dim, self.repeats = kv_heads, head_dim, repeats
        self._min_capacity = min_capacity
        self._dynamic = new_dynamic()
        self._kv: torch.Tensor | None = None
        self._static_len = 0

    @property
    def length(self) -> int:
        """Positions the cache holds."""
        if self._dynamic is None:
            return self._static_len
        held = [self._dynamic.layers[i].get_seq_length() for i in range(self.first, self.last)]
        return int(max(held, default=0))

    def dynamic(self):
        """The eager path's cache holding every position (the static buffer is then stale)."""
        if self._dynamic is None:
            cache = self._new_dynamic()
            n = self._static_len
            if n:
                for j, i in enumerate(range(self.first, self.last)):
                    keys, values = (self._kv[j, t, :, :n].repeat_interleave(self.repeats, dim=0) for t in (0, 1))
                    cache.update(keys.unsqueeze(0), values.unsqueeze(0), i)
            self._dynamic = cache
        return self._dynamic

    def static(self, need: int) -> tuple[torch.Tensor, int]:
        """The static buffer with room for ``need`` positions, and its capacity."""
        if self._dynamic is not None:
            n = self.length
            self._ensure(max(need, n))
            for j, i in enumerate(range(self.first, self.last)):
                layer = self._dynamic.layers[i]
                if n and layer.get_seq_length():
                    # A sliding-window layer holds only its last positions: they go at the end.
                    held = layer.keys.shape[-2]
                    self._kv[j, 0, :, n - held:n] = layer.keys[0, ::self.repeats]
                    self._kv[j, 1, :, n - held:n] = layer.values[0, ::self.repeats]
            self._static_len = n
            self._dynamic = None  # the buffer now holds the sequence; the eager cache is dropped
        self._ensure(need)
        return self._kv, self._kv.shape[3]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (speculative drafts past a rejection are dropped)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if self._dynamic is not None:
            for i in range(self.first, self.last):
                layer = self._dynamic.layers[i]
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)  # transformers' crop takes the count to drop, as a negative
        else:
            self._static_len = length

    def advance(self) -> None:
        """One more position was written into the static buffer."""
        self._static_len += 1

    def _ensure(self, need: int) -> None:
        capacity = 0 if self._kv is None else self._kv.shape[3]
        if need <= capacity:
            return
        new = max(self._min_capacity, capacity)
        while new < need:
            new *= 2
        kv = torch.zeros(self.last - self.first, 2, self.kv_heads, new, self.head_dim, dtype=torch.float32)
        if self._kv is not None and self._static_len:
            kv[:, :, :, :self._static_len] = self._kv[:, :, :, :self._static_len]
        self._kv = kv

    def nbytes(self) -> int:
        """Bytes of the positions held (as the eager cache counts them)."""
        return self.length * (self.last - self.first) * 2 * self.kv_heads * self.repeats * self.head_dim * 4
