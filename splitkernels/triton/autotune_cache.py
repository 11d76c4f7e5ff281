"""Launch configurations: a small candidate list per kernel, tuned once per GPU and shape key.

Lookup order for a (GPU, kernel, key): the user's cache ``~/.cache/splitkernels/triton_autotune.json``
(``SPLITKERNELS_CACHE`` moves it), then the configs shipped with the package for that GPU name
(``splitkernels/triton/tuned/*.json``, written by ``bench/bench_triton.py --out DIR`` as
``DIR/tuned.json``), then tuning, then the first candidate (the hand-picked default). Tuning happens
lazily on the first call with a new key (never at import), times each candidate with
``triton.testing.do_bench`` for a few milliseconds, and stores the winner in the user's cache, so
later processes start tuned. ``SPLITKERNELS_AUTOTUNE=0`` disables tuning. The interpreter and CUDA
graph capture never tune.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from ..cache import cache_root
from .dispatch import device_name

_lock = threading.Lock()
_cache: dict | None = None


def cache_file() -> Path:
    """The JSON file holding tuned configs for every GPU seen on this machine."""
    return cache_root() / "triton_autotune.json"


def tuning_enabled(device: torch.device) -> bool:
    """True when a new key may be tuned now (CUDA device, switch on, not interpreting or capturing)."""
    if os.environ.get("SPLITKERNELS_AUTOTUNE", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


SHIPPED_VERSION = 1


def shipped_dir() -> Path:
    """The package folder of tuned configs, one JSON file per GPU name."""
    return Path(__file__).with_name("tuned")


@functools.lru_cache(maxsize=1)
def shipped() -> dict[str, dict[str, dict]]:
    """Configs shipped with the package: ``{gpu name: {"kernel/key": config}}``."""
    tables: dict[str, dict[str, dict]] = {}
    for path in sorted(shipped_dir().glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("version") != SHIPPED_VERSION:
            raise ValueError(f"{path}: tuned-config version {data.get('version')!r}, expected {SHIPPED_VERSION}")
        tables.setdefault(data["gpu"], {}).update(data["configs"])
    return tables


def export(gpu: str) -> dict:
    """The user's tuned configs for ``gpu`` in the shipped format (for ``tuned/<name>.json``)."""
    with _lock:
        configs = dict(_load().get(gpu, {}))
    return {"version": SHIPPED_VERSION, "gpu": gpu, "configs": configs}


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_file().read_text())
        except (OSError, ValueError):
            _cache = {}
    return _cache


def _save(data: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        # A read-only home only costs re-tuning in the next process.
        pass


def pick(
    kernel: str, key: str, candidates: list[dict], run: Callable[[dict], None], device: torch.device
) -> dict:
    """The config for ``kernel`` at ``key``: cached, else shipped, else tuned over ``candidates``, else the first.

    ``run(config)`` launches the kernel once with that config (outputs may be scratch).
    """
    gpu = device_name(device)
    with _lock:
        cached = _load().get(gpu, {}).get(f"{kernel}/{key}")
    if cached is None:
        cached = shipped().get(gpu, {}).get(f"{kernel}/{key}")
    if cached is not None:
        return cached
    if not tuning_enabled(device) or len(candidates) == 1:
        return candidates[0]
    import triton.testing
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=10)
        except (OutOfResources, CompilationError):
            continue  # this config does not fit this GPU
        if ms < best_ms:
            best, best_ms = cfg, ms
    with _lock:
        data = _load()
        data.setdefault(gpu, {})[f"{kernel}/{key}"] = best
        _save(data)
    return best
