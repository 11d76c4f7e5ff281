"""Which ``lowbit_linear`` kernel runs for a token count M: the crossover table, as data.

Three paths: ``gemv`` (split-K GEMV, one program row per token) for M up to
``gemv_max_m``; ``tiled`` (dequantise tiles in registers + ``tl.dot``, optional split-K) up to
``tiled_max_m``; above that ``dequant`` (dequantise the whole weight once, cached per weight,
then ``torch.matmul`` on tensor cores). ``bench/bench_triton.py --out DIR`` measures every path
on the GPU it runs on and writes a table in the format of :data:`DEFAULT_TABLE` to
``DIR/dispatch_table.json``; copy it to :func:`override_path` (or point
``SPLITKERNELS_DISPATCH_TABLE`` at it) to use it, or paste its numbers here.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from ..cache import cache_root

PATHS = ("gemv", "tiled", "dequant")

# Per GPU name (``torch.cuda.get_device_name()``), then "default"; per weight bit width.
DEFAULT_TABLE: dict = {
    "version": 1,
    "gpus": {
        "default": {
            "2": {"gemv_max_m": 1, "tiled_max_m": 64},
            "3": {"gemv_max_m": 1, "tiled_max_m": 64},
            "4": {"gemv_max_m": 1, "tiled_max_m": 64},
            "8": {"gemv_max_m": 1, "tiled_max_m": 32},
        },
    },
}


def override_path() -> Path:
    """Where a measured table is picked up from (``SPLITKERNELS_DISPATCH_TABLE`` wins)."""
    env = os.environ.get("SPLITKERNELS_DISPATCH_TABLE")
    if env:
        return Path(env)
    return cache_root() / "dispatch_table.json"


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The active table: :data:`DEFAULT_TABLE` with the GPUs of the override file merged in."""
    merged = {"version": DEFAULT_TABLE["version"], "gpus": dict(DEFAULT_TABLE["gpus"])}
    path = override_path()
    if path.is_file():
        loaded = json.loads(path.read_text())
        if loaded.get("version") != DEFAULT_TABLE["version"]:
            raise ValueError(f"{path}: dispatch table version {loaded.get('version')!r}, expected {DEFAULT_TABLE['version']}")
        merged["gpus"].update(loaded["gpus"])
    return merged


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The GPU name keying tables and tuned configs ("cpu" off CUDA); cached, it is asked every call."""
    if device.type != "cuda":
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def choose_path(m: int, bits: int, dtype: torch.dtype, device: torch.device) -> str:
    """The path (one of :data:`PATHS`) for ``m`` tokens of ``dtype`` against a ``bits``-bit weight."""
    gpus = table()["gpus"]
    entry = gpus.get(device_name(device), gpus["default"])[str(bits)]
    if m <= entry["gemv_max_m"]:
        return "gemv"
    # A bf16 dense weight would round every dequantised value to 8 bits of mantissa, far
    # outside the op's 1e-3 tolerance; the tiled kernel keeps the weight in fp32 (tf32 dot).
    if m <= entry["tiled_max_m"] or dtype == torch.bfloat16:
        return "tiled"
    return "dequant"
