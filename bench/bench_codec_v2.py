"""Codec v2 speed on one CPU core: encode, decode and total per symbol coder, beside memcpy.

    python bench/bench_codec_v2.py --out DIR [--repeats 31]

Symbols come from a config calibrated on Gaussian activations with a few heavy channels at about 4
bits per element, so the table and the escape rate are realistic (the bits per element of real
activations, where the nibble coder costs more, come from bench/e2e/codec_v2.py). At T = 512,
d = 4096 (fp16, 4 MiB) it times, per instruction set of the v2 passes:

* each coder (static rANS, which writes its 32-lane layout at this size, Rice, bit planes, slots and nibble) through the
  general API: encode = ``encode(x, cfg).to_bytes(coder)``, decode = ``decode(from_bytes(frame, config=cfg))``;
* the bit-plane, slot and nibble coders through the fused path the runtime takes: ``encode_frame(x, cfg,
  coder)`` and ``decode_frame(frame, config=cfg)`` (what the server runs), same bytes and tensors;

and the entropy stage alone (M symbols/s of each coder on the 2 M symbols, one table: rANS on 4
lanes, on 32 lanes, Rice, bit planes, slots, nibble), a one-token frame at
d = 576 and at d = 4096 (through the general API and through ``encode_frame``'s one C++ call, what the
edge sends each decode step) and one at d = 640 with a token prediction, the fused slot and nibble pipelines at
the best instruction sets on the same activations in fp16, bf16 and fp32 (the wire dtypes), and two
single-threaded copies in the same run: of the same 4 MiB tensor (it stays in the last-level cache)
and of a 256 MiB buffer (DRAM). Throughput counts input bytes per second of encode plus decode, each
timed on its own (caches warm for it, as the memcpy baselines are); the round trip (encode then
decode of the same frame in one timed call, the two competing for the caches) is given beside. The one-token frames are also timed cold, each
call after writing a buffer of twice the last-level cache (at least 64 MiB), as a step's frame
meets them after the model's forward pass.
Warm-up, then the median (and the best) of ``--repeats`` in thread CPU time, so a busy shared
machine does not count time spent waiting for a core; it does still slow what runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splitkernels.codec import calibrate, decode, decode_frame, encode, encode_frame, from_bytes, nibble, planes, rans, rice, slots
from splitkernels.codec import v2 as v2mod
from splitkernels.codec.frame_v2 import CODER_NAMES, parse_frame_v2

BIG_COPY_BYTES = 256 << 20
T, D = 512, 4096
PRED_VOCAB, PRED_D = 1 << 16, 640


def times(fn, repeats: int, before=None) -> list[float]:
    """Thread CPU seconds of each of ``repeats`` calls after one warm-up call, each after ``before()``
    (untimed) where given."""
    fn()
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return out


def median_time(fn, repeats: int) -> float:
    return statistics.median(times(fn, repeats))


def activations(t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    x[:, :8] *= 12.0
    return x


def cold_median_time(fn, repeats: int, evict: torch.Tensor) -> float:
    """Median thread CPU seconds of ``fn`` called each time right after ``evict`` is rewritten (caches cold)."""
    return statistics.median(times(fn, repeats, before=lambda: evict.add_(1.0)))


def evict_buffer() -> torch.Tensor:
    """fp32 ones of twice the last-level cache, at least 64 MiB."""
    llc = 0
    try:  # Linux: "32768K"
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        llc = int(size[:-1]) << {"K": 10, "M": 20}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return torch.ones(max(64 << 20, 2 * llc) // 4)


def memcpy_gb_s(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return nbytes / median_time(lambda: np.copyto(dst, src), repeats) / 1e9


def pipelines(x: torch.Tensor, cfg) -> dict:
    """name -> (encode fn, decode fn of its frame, frame bytes)."""
    out = {}
    for coder in ("rans", "rice", "planes", "slots", "nibble"):
        frame = encode(x, cfg).to_bytes(coder)
        out[f"{coder} (encode().to_bytes / decode(from_bytes))"] = (
            lambda c=coder: encode(x, cfg).to_bytes(c), lambda f=frame: decode(from_bytes(f, config=cfg)), frame)
    for coder in ("planes", "slots", "nibble"):
        frame = encode_frame(x, cfg, coder)
        assert frame == out[f"{coder} (encode().to_bytes / decode(from_bytes))"][2]
        out[f"{coder} fused (encode_frame / decode_frame)"] = (
            lambda c=coder: encode_frame(x, cfg, c), lambda f=frame: decode_frame(f, config=cfg), frame)
    return out


def entropy_stage(sym: np.ndarray, cfg, repeats: int) -> dict:
    """M symbols/s of each coder alone on the symbols of one frame."""
    n = sym.size
    flat = np.ascontiguousarray(sym.ravel())
    stream = rans.encode(flat, cfg.freqs)
    no_raw = np.zeros(sym.shape[0], dtype=bool)
    nib = nibble.encode(sym, None, cfg.freqs)
    wide = rans.encode(flat, cfg.freqs, n_lanes=rans.WIDE_LANES)
    centres, ks = rice.channel_params([cfg.freqs], [0])
    nsym = len(cfg.freqs)
    ric = rice.encode(flat, centres, ks, nsym)
    pla = planes.encode(sym, None, centres, ks, nsym)
    starts, widths = slots.channel_params([cfg.freqs], [0])
    slo = slots.encode(sym, None, starts, widths, nsym)
    ms = {
        "rans": (median_time(lambda: rans.encode(flat, cfg.freqs), repeats),
                 median_time(lambda: rans.decode(stream, cfg.freqs, n), repeats)),
        "rans32": (median_time(lambda: rans.encode(flat, cfg.freqs, n_lanes=rans.WIDE_LANES), repeats),
                   median_time(lambda: rans.decode(wide, cfg.freqs, n, n_lanes=rans.WIDE_LANES), repeats)),
        "rice": (median_time(lambda: rice.encode(flat, centres, ks, nsym), repeats),
                 median_time(lambda: rice.decode(ric, n, centres, ks, nsym), repeats)),
        "planes": (median_time(lambda: planes.encode(sym, None, centres, ks, nsym), repeats),
                   median_time(lambda: planes.decode(pla, no_raw, centres, ks, nsym, sym.shape[1]), repeats)),
        "slots": (median_time(lambda: slots.encode(sym, None, starts, widths, nsym), repeats),
                  median_time(lambda: slots.decode(slo, no_raw, starts, widths, nsym, sym.shape[1]), repeats)),
        "nibble": (median_time(lambda: nibble.encode(sym, None, cfg.freqs), repeats),
                   median_time(lambda: nibble.decode(nib, cfg.freqs, no_raw, sym.shape[1]), repeats)),
    }
    return {k: {"symbols": n, "encode_msym_s": n / e / 1e6, "decode_msym_s": n / d / 1e6,
                "bits_per_symbol": 8 * len({"rans": stream, "rans32": wide, "rice": ric, "planes": pla, "slots": slo,
                                                "nibble": nib}[k]) / n}
            for k, (e, d) in ms.items()}


def fused_by_dtype(cfg, repeats: int, copy_dram: float) -> dict:
    """The fused slot and nibble pipelines at the best instruction sets on the same activations in
    each wire dtype: fp16 (what the CLI sends for fp32 models), bf16 (a bf16 edge) and fp32 (what it
    sends for a model whose split activations come near fp16's range, such as Gemma 3)."""
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd = activations(T, D, 1).to(dtype)
        nbytes = xd.numel() * xd.element_size()
        for coder in ("slots", "nibble"):
            frame = encode_frame(xd, cfg, coder)
            e = median_time(lambda: encode_frame(xd, cfg, coder), repeats)
            d = median_time(lambda: decode_frame(frame, config=cfg), repeats)
            out[f"{str(dtype).removeprefix('torch.')} {coder}"] = {
                "input_bytes": nbytes, "encode_ms": e * 1e3, "decode_ms": d * 1e3, "gb_s": nbytes / (e + d) / 1e9,
                "ratio_to_memcpy_256MiB": nbytes / (e + d) / 1e9 / copy_dram, "bits_per_element": 8 * len(frame) / xd.numel()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (codec_v2_speed.json, codec_v2_speed.md)")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--bits", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    native = (rans.has_native() and v2mod.has_fused() and nibble.has_native() and rice.has_native()
              and planes.has_native() and slots.has_native())
    _C = rans._C
    isas = _C.v2_isas() if native else ["reference"]
    cfg = calibrate(activations(1024, D, 0), bits=args.bits)
    x = activations(T, D, 1).half()
    nbytes = x.numel() * x.element_size()
    copy_llc = memcpy_gb_s(nbytes, args.repeats * 4)
    copy_dram = memcpy_gb_s(BIG_COPY_BYTES, max(3, args.repeats // 5))
    result = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "note": "one thread, thread CPU time, median (and best) of repeats; shared machine (other agents "
                      "running), timings noisy",
              "native": native, "T": T, "d": D, "dtype": "float16", "input_bytes": nbytes,
              "memcpy_4MiB_gb_s": copy_llc, "memcpy_256MiB_gb_s": copy_dram, "by_isa": {}}
    before = (_C.v2_isa(), _C.nibble_isa(), _C.rans_isa(), _C.rice_isa(), _C.planes_isa(), _C.slots_isa()) if native else None
    cfg576 = calibrate(activations(1024, 576, 2), bits=args.bits)
    one = x[:1, :576].contiguous()
    # A token prediction (docs/FORMATS.md §5.2.1) at Gemma 3 270M's width, from a random table of
    # 2**16 rows (16-bit ids; Gemma's 2**18 rows cost one id byte more).
    table = torch.randn(PRED_VOCAB, PRED_D, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, PRED_VOCAB, (1024,), generator=torch.Generator().manual_seed(5))
    h = 3.0 * table[ids] + activations(1024, PRED_D, 3)
    cfg_pred = calibrate(h, bits=args.bits, tokens=ids, embedding=table)
    one_pred, one_id = h[1:2].half(), ids[1:2]
    evict = evict_buffer()
    for isa in isas:
        if native:
            _C.set_v2_isa(isa)
            _C.set_nibble_isa("avx512" if isa == "avx512" else "scalar")
            _C.set_rans_isa("avx512" if isa == "avx512" and "avx512" in _C.rans_isas() else "scalar")
            _C.set_rice_isa(isa if isa in _C.rice_isas() else "scalar")
            _C.set_planes_isa(isa if isa in _C.planes_isas() else "scalar")
            _C.set_slots_isa(isa if isa in _C.slots_isas() else "scalar")
        rows = {}
        for name, (enc_fn, dec_fn, frame) in pipelines(x, cfg).items():
            te, td = times(enc_fn, args.repeats), times(dec_fn, args.repeats)
            e, d = statistics.median(te), statistics.median(td)
            trip = median_time(lambda: (enc_fn(), dec_fn()), args.repeats)
            gb_s = nbytes / (e + d) / 1e9
            rows[name] = {"encode_ms": e * 1e3, "decode_ms": d * 1e3, "total_ms": (e + d) * 1e3,
                          "best_total_ms": (min(te) + min(td)) * 1e3, "round_trip_ms": trip * 1e3, "gb_s": gb_s,
                          "ratio_to_memcpy_4MiB": gb_s / copy_llc, "ratio_to_memcpy_256MiB": gb_s / copy_dram,
                          "bits_per_element": 8 * len(frame) / x.numel(), "frame_bytes": len(frame)}
        one_frame = encode(one, cfg576).to_bytes()
        wide_frame = encode_frame(x[:1], cfg)
        pred_frame = encode_frame(one_pred, cfg_pred, tokens=one_id, embedding=table)
        result["by_isa"][isa] = {
            "nibble_isa": _C.nibble_isa() if native else "reference",
            "rans_isa": _C.rans_isa() if native else "reference",
            "rice_isa": _C.rice_isa() if native else "reference",
            "planes_isa": _C.planes_isa() if native else "reference",
            "slots_isa": _C.slots_isa() if native else "reference", "pipelines": rows,
            "one_token_d576": {"encode_us": median_time(lambda: encode(one, cfg576).to_bytes(), args.repeats * 10) * 1e6,
                               "encode_frame_us": median_time(lambda: encode_frame(one, cfg576), args.repeats * 10) * 1e6,
                               "decode_us": median_time(lambda: decode_frame(one_frame, config=cfg576), args.repeats * 10) * 1e6,
                               "encode_frame_cold_us": cold_median_time(lambda: encode_frame(one, cfg576), args.repeats * 3, evict) * 1e6,
                               "decode_cold_us": cold_median_time(lambda: decode_frame(one_frame, config=cfg576), args.repeats * 3, evict) * 1e6,
                               "frame_bytes": len(one_frame), "coder": CODER_NAMES[parse_frame_v2(one_frame, cfg576).coder]},
            "one_token_d4096": {"encode_us": median_time(lambda: encode(x[:1], cfg).to_bytes(), args.repeats * 10) * 1e6,
                                "encode_frame_us": median_time(lambda: encode_frame(x[:1], cfg), args.repeats * 10) * 1e6,
                                "decode_us": median_time(lambda: decode_frame(wide_frame, config=cfg), args.repeats * 10) * 1e6,
                                "encode_frame_cold_us": cold_median_time(lambda: encode_frame(x[:1], cfg), args.repeats * 3, evict) * 1e6,
                                "decode_cold_us": cold_median_time(lambda: decode_frame(wide_frame, config=cfg), args.repeats * 3, evict) * 1e6,
                                "frame_bytes": len(wide_frame), "coder": CODER_NAMES[parse_frame_v2(wide_frame, cfg).coder]},
            "one_token_d640_predicted": {
                "encode_us": median_time(lambda: encode(one_pred, cfg_pred, tokens=one_id, embedding=table).to_bytes(),
                                         args.repeats * 10) * 1e6,
                "encode_frame_us": median_time(lambda: encode_frame(one_pred, cfg_pred, tokens=one_id, embedding=table),
                                               args.repeats * 10) * 1e6,
                "decode_us": median_time(lambda: decode_frame(pred_frame, config=cfg_pred, embedding=table), args.repeats * 10) * 1e6,
                "frame_bytes": len(pred_frame), "coder": "rans", "predicted": cfg_pred.prediction is not None},
            "entropy_stage": entropy_stage(encode(x, cfg).symbols.numpy(), cfg, max(5, args.repeats // 3)),
        }
    if native:
        _C.set_v2_isa(before[0])
        _C.set_nibble_isa(before[1])
        _C.set_rans_isa(before[2])
        _C.set_rice_isa(before[3])
        _C.set_planes_isa(before[4])
        _C.set_slots_isa(before[5])
    result["fused_by_dtype"] = fused_by_dtype(cfg, args.repeats, copy_dram)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_v2_speed.json").write_text(json.dumps(result, indent=1))
    lines = [f"T={T} d={D} fp16 ({nbytes / 2**20:.0f} MiB input), one thread, thread CPU time, median of "
             f"{args.repeats}; memcpy one thread in the same run: {copy_llc:.1f} GB/s (same 4 MiB tensor, "
             f"cache-resident), {copy_dram:.1f} GB/s (256 MiB, DRAM). Machine: {result['machine']}, "
             f"{result['cpu_count']} cores, shared.", "",
             "| v2 passes ISA | nibble / rANS32 / Rice / planes / slots ISA | pipeline | bits/elem | encode ms | decode ms | total ms (best) | "
             "round trip ms | GB/s | vs memcpy 4 MiB | vs memcpy DRAM |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for isa, r in result["by_isa"].items():
        for name, p in r["pipelines"].items():
            lines.append(f"| {isa} | {r['nibble_isa']} / {r['rans_isa']} / {r['rice_isa']} / {r['planes_isa']} / {r['slots_isa']} | {name} | {p['bits_per_element']:.3f} | "
                         f"{p['encode_ms']:.3f} | "
                         f"{p['decode_ms']:.3f} | {p['total_ms']:.3f} ({p['best_total_ms']:.3f}) | "
                         f"{p['round_trip_ms']:.3f} | {p['gb_s']:.2f} | "
                         f"{100 * p['ratio_to_memcpy_4MiB']:.1f}% | {100 * p['ratio_to_memcpy_256MiB']:.1f}% |")
    lines += ["", "| v2 passes ISA | nibble / rANS32 / Rice / planes / slots ISA | coder alone (2 M symbols, one table) | bits/symbol | encode M sym/s | "
              "decode M sym/s |", "|---|---|---|---|---|---|"]
    for isa, r in result["by_isa"].items():
        for name, e in r["entropy_stage"].items():
            lines.append(f"| {isa} | {r['nibble_isa']} / {r['rans_isa']} / {r['rice_isa']} / {r['planes_isa']} / {r['slots_isa']} | {name} | {e['bits_per_symbol']:.3f} | "
                         f"{e['encode_msym_s']:.0f} | {e['decode_msym_s']:.0f} |")
    lines += ["", f"Cold: each call right after writing {evict.numel() * 4 >> 20} MiB (caches evicted, as after a forward pass).",
              "", "| v2 passes ISA | one-token frame | coder | bytes | encode().to_bytes() us | "
              "encode_frame us (one C++ call) | decode_frame us | encode_frame us, cold | decode_frame us, cold |",
              "|---|---|---|---|---|---|---|---|---|"]
    for isa, r in result["by_isa"].items():
        for name, key in (("d=576", "one_token_d576"), ("d=4096, 16 class tables", "one_token_d4096"),
                          ("d=640, token prediction", "one_token_d640_predicted")):
            o = r[key]
            cold = (f"{o['encode_frame_cold_us']:.0f} | {o['decode_cold_us']:.0f}" if "decode_cold_us" in o else "- | -")
            lines.append(f"| {isa} | {name} | {o['coder']} | {o['frame_bytes']} | "
                         f"{o['encode_us']:.0f} | {o['encode_frame_us']:.1f} | {o['decode_us']:.0f} | {cold} |")
    lines += ["", "| fused pipeline, best ISA, by wire dtype | input MiB | bits/elem | encode ms | decode ms | GB/s | "
              "vs memcpy DRAM |", "|---|---|---|---|---|---|---|"]
    for name, p in result["fused_by_dtype"].items():
        lines.append(f"| {name} | {p['input_bytes'] / 2**20:.0f} | {p['bits_per_element']:.3f} | {p['encode_ms']:.3f} | "
                     f"{p['decode_ms']:.3f} | {p['gb_s']:.2f} | {100 * p['ratio_to_memcpy_256MiB']:.1f}% |")
    (out / "codec_v2_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
