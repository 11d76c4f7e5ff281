"""A/B of two builds of the fused slot-coded v2 passes, one build per process (run alternately).

    python bench/results/codec_v2/s21/ab_fused.py PACKAGE_ROOT [--isa avx512|avx2] [--calls 200]

PACKAGE_ROOT holds a copy of ``splitkernels/`` with its built ``_C`` module (for instance a copy of
the tree at another commit); the editable install's import hook is removed so that copy is the one
imported. T = 512, d = 4096 fp16 activations of bench/bench_codec_v2.py, its calibrated config at 4
bits; one thread, thread CPU time, the minimum of ``--calls`` calls (after one warm-up) of the C++
decode pass (``v2_decode_slots``) and of the Python entry points, framing included (``encode_frame``
/ ``decode_frame``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("root", help="folder holding the splitkernels package to import")
ap.add_argument("--isa", default="avx512", choices=["avx512", "avx2"])
ap.add_argument("--calls", type=int, default=200)
args = ap.parse_args()
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, args.root)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_codec_v2 import D, T, activations  # noqa: E402

from splitkernels.codec import calibrate, decode_frame, encode_frame, slots  # noqa: E402
from splitkernels.codec.frame_v2 import parse_frame_v2  # noqa: E402
from splitkernels.codec.wire_v2 import DTYPE_CODES, _C  # noqa: E402

assert Path(sys.modules["splitkernels"].__file__).is_relative_to(Path(args.root).resolve())
torch.set_num_threads(1)
_C.set_v2_isa(args.isa)
_C.set_slots_isa(args.isa)
cfg = calibrate(activations(1024, D, 0), bits=4.0)
x = activations(T, D, 1).half()


def best_ms(fn) -> float:
    fn()
    out = []
    for _ in range(args.calls):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return 1e3 * min(out)


first, second = slots.channel_arrays(*cfg.slot_params, cfg.d, len(cfg.freqs))
frame = encode_frame(x, cfg, "slots")
p = parse_frame_v2(frame, cfg, None)
y = torch.empty(T, D, dtype=x.dtype)
stream, flags, esc = np.frombuffer(p.stream, np.uint8), np.ascontiguousarray(p.raw, np.uint8), p.escapes.contiguous()
dequantiser = (cfg.step_array().ctypes.data, cfg.center_array().ctypes.data, cfg.kmax, DTYPE_CODES[x.dtype],
               y.data_ptr(), esc.data_ptr(), esc.numel())
dec_c = best_ms(lambda: _C.v2_decode_slots(stream.ctypes.data, stream.shape[0], T, D, flags.ctypes.data,
                                           first.ctypes.data, second.ctypes.data, *dequantiser))
enc_py = best_ms(lambda: encode_frame(x, cfg, "slots"))
dec_py = best_ms(lambda: decode_frame(frame, config=cfg))
print(f"{args.isa}: C decode {dec_c:.3f} ms | encode_frame {enc_py:.3f} decode_frame {dec_py:.3f} "
      f"total {enc_py + dec_py:.3f} ms")
