"""Calibration text of several kinds for codec v2, so its static steps and tables fit more than one.

A codec calibrated on prose alone carried to Python source on SmolLM2 but not on Gemma 3 270M:
there code spread wider (one-token frames +0.2 bit) and the model was more sensitive to noise on it
(KL 0.0084 against 0.0034 on prose at split 2). Calibration windows therefore cycle through three
kinds of text:

* ``prose``: Botchan (:func:`~splitkernels.eval.load_text`) from a given token on, so that it stays
  disjoint from the evaluation text, which starts at Botchan's first token;
* ``code``: the Python source of a few standard-library modules of the running interpreter;
* ``docs``: the interpreter's own reference documentation (``pydoc_data.topics``), technical prose
  with grammar rules and examples.

Nothing is shipped or downloaded for the last two: every Python installation has them. An
installation stripped of its sources (``.pyc`` only) loses a kind, which :func:`calibration_windows`
reports instead of failing.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from .text import load_text

KINDS = ("prose", "code", "docs")
# Plain, long, stable modules: code with docstrings and comments, not generated tables.
_CODE_MODULES = ("argparse", "dataclasses", "textwrap", "fractions", "shlex", "calendar")


def _code_text() -> str:
    parts = []
    for name in _CODE_MODULES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is not None and origin.suffix == ".py" and origin.is_file():
            parts.append(origin.read_text(encoding="utf-8"))
    return "\n".join(parts)


def _docs_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped installation
        return ""
    return "\n\n".join(topics[key] for key in sorted(topics))


def kind_text(kind: str) -> str:
    """The whole text of one calibration ``kind`` (one of :data:`KINDS`); ``""`` when unavailable."""
    if kind == "prose":
        return load_text("botchan")
    if kind == "code":
        return _code_text()
    if kind == "docs":
        return _docs_text()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def calibration_windows(encode: Callable[[str], torch.Tensor], tokens: int, window: int, *,
                        prose_start: int, kinds: tuple[str, ...] = KINDS) -> tuple[list[torch.Tensor], dict]:
    """``tokens`` calibration token ids cut into windows of ``window``, the windows taking turns
    among ``kinds`` (prose first), and a description ``{kind: [first token, tokens]}`` of what was used.

    ``encode`` maps a text to token ids ``[L]`` (or ``[1, L]``). Prose starts at token
    ``prose_start`` of Botchan (keep it past every scored token). A kind whose text is unavailable or
    too short for its windows is skipped and the others take its turns. Only whole windows are
    used (``tokens // window`` of them), or one window of ``tokens`` when that is shorter.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an int >= 2, got {tokens!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    sizes = [window] * (tokens // window) if tokens >= window else [tokens]
    ids: dict[str, torch.Tensor] = {}
    for kind in kinds:
        text = kind_text(kind)
        if text:
            all_ids = encode(text).reshape(-1)
            ids[kind] = all_ids[prose_start:] if kind == "prose" else all_ids
    used: dict[str, list[int]] = {}
    windows: list[torch.Tensor] = []
    turn = 0
    for size in sizes:
        for _ in range(len(kinds)):
            kind = kinds[turn % len(kinds)]
            turn += 1
            taken = used.get(kind, [0, 0])[1]
            if kind in ids and ids[kind].numel() >= taken + size:
                windows.append(ids[kind][taken: taken + size])
                used[kind] = [prose_start if kind == "prose" else 0, taken + size]
                break
        else:
            raise ValueError(f"the calibration texts ({', '.join(kinds)}) hold fewer than {tokens} tokens in windows of {window}")
    return windows, used
