"""An independent, per-token, float64/numpy implementation of the TS + TAB-Q rules of
docs/FORMATS.md, written separately from splitkernels so tests can check the package against it."""
import math

import numpy as np

F16_MAX = 65504.0


def f16_down(v: float) -> float:
    h = np.float16(v)
    if not np.isfinite(h):
        return -math.inf if v < 0 else (math.inf if v > F16_MAX else float(np.float16(F16_MAX)))
    if float(h) > v:
        h = np.nextafter(h, np.float16(-np.inf))
    return float(h)


def f16_up(v: float) -> float:
    h = np.float16(v)
    if not np.isfinite(h):
        return math.inf
    if float(h) < v:
        h = np.nextafter(h, np.float16(np.inf))
    return float(h)


def token_rules(row: np.ndarray, abs_threshold: bool, threshold: float, capacity: int, choices, eps: float, raw: int):
    """Returns (outlier indices ascending, lo, step, bits, codes) for one token (row as float64)."""
    d = row.shape[0]
    mag = np.abs(row)
    tau = threshold if abs_threshold else threshold * math.sqrt(sum(float(v) * float(v) for v in row) / d)
    cands = [i for i in range(d) if mag[i] > tau]
    cands.sort(key=lambda i: (-mag[i], i))
    outliers = sorted(cands[:capacity])
    inl = [i for i in range(d) if i not in set(outliers)]
    if inl:
        lo32, hi = float(np.float32(min(row[i] for i in inl))), float(np.float32(max(row[i] for i in inl)))
    else:
        lo32 = hi = 0.0
    lo = f16_down(lo32)
    sq = sum(float(row[i]) ** 2 for i in inl)
    bits, step = raw, 0.0
    for b in sorted(choices):
        s = f16_up(float(np.float32(np.float32(hi) - np.float32(lo)) / np.float32(2**b - 1))) if math.isfinite(lo) else math.inf
        if math.isfinite(lo) and math.isfinite(s) and len(inl) * s * s / 12.0 <= eps * eps * sq:
            bits, step = b, s
            break
    codes = np.zeros(d, dtype=np.int64)
    if bits != raw and step > 0:
        for i in inl:
            q = np.float32(np.float32(row[i]) - np.float32(lo)) / np.float32(step)
            codes[i] = min(max(int(np.rint(q)), 0), 2**bits - 1)
    if bits == raw:
        lo = 0.0
    return outliers, lo, step, bits, codes
