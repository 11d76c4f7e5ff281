"""The ``dequant`` path of the low-bit matmul: a kernel dequantises the whole weight once, the dense
copy is cached per weight (bounded by ``SPLITKERNELS_DEQUANT_CACHE_MB``) and ``torch.matmul`` takes
over where compute dominates (large M, tensor cores).
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
import triton
import triton.language as tl

from .lowbit_tiles import _dequant, geometry

_DEQUANT_BLOCK = (32, 128)


@triton.jit
def _dequant_kernel(qw_ptr, scale_ptr, zero_ptr, w_ptr, N, K, W, NG, GROUP,
                    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    w = _dequant(qw_ptr, scale_ptr, zero_ptr, n, k, N, K, W, NG, GROUP, BITS)
    tl.store(w_ptr + n.to(tl.int64) * K + k, w.to(w_ptr.dtype.element_ty), mask=(n < N) & (k < K))


def dequantize(qweight, scale, zero, bits, group_size, k, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype``, computed in fp32 by a kernel."""
    n, k, words, ng, g = geometry(qweight, scale, k, group_size)
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)
    bn, bk = _DEQUANT_BLOCK
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scale, zero, w, n, k, words, ng, g, BITS=bits, BLOCK_N=bn, BLOCK_K=bk,
        enable_fp_fusion=False,  # the same two roundings as QuantizedWeight.dequantize
    )
    return w


class DequantCache:
    """Dense weights of the ``dequant`` path, one per packed weight, admitted while they fit a budget.

    No eviction: once the budget is full, further weights are dequantised on every call. For a
    model larger than the budget this keeps some layers hot, where least-recently-used order
    would cycle every layer through the cache, holding the memory and never hitting. An entry
    is valid while the packed tensors are the same objects at the same versions (an in-place
    update bumps ``_version``); it is dropped as soon as its ``qweight`` is freed.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: dict[int, tuple] = {}
        # Re-entrant: a weakref callback may fire (and drop an entry) while the lock is held.
        self._lock = threading.RLock()

    def get(self, qweight, scale, zero, bits, group_size, k, dtype) -> torch.Tensor:
        """The dense weight for these packed tensors, from the cache or freshly dequantised."""
        key = id(qweight)
        stamp = (qweight._version, scale._version, zero._version, bits, group_size, k, dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] == stamp and all(r() is t for r, t in zip(entry[0], (qweight, scale, zero))):
                return entry[2]
        w = dequantize(qweight, scale, zero, bits, group_size, k, dtype)
        size = w.numel() * w.element_size()
        refs = (weakref.ref(qweight, lambda _, key=key: self._drop(key)), weakref.ref(scale), weakref.ref(zero))
        with self._lock:
            self._drop(key)  # a stale entry of this weight
            if self.nbytes + size <= self.budget_bytes:
                self._entries[key] = (refs, stamp, w)
                self.nbytes += size
        return w

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry[2].numel() * entry[2].element_size()

    def clear(self) -> None:
        """Forget every cached weight."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)


dequant_cache = DequantCache(int(os.environ.get("SPLITKERNELS_DEQUANT_CACHE_MB", "1024")) * 2**20)
