"""Pieces of the one-token encode path (d = 576, fp32 token sent as fp16), each timed right after
streaming 400 MB (as a forward pass does), then warm: `python bench/results/codec_v2/s72/cold_pieces.py`."""
import time, statistics as st, torch, numpy as np
from splitkernels.codec import calibrate
from splitkernels.codec.rate import session_encoder
from splitkernels.codec.wire_v2 import encode_frame_v2
from splitkernels.codec import token_frame as tf
from splitkernels.ops.checks import check_tensor, FLOAT_DTYPES
from splitkernels.codec.frame import DTYPE_CODES
torch.manual_seed(0)
d = 576
cfg = calibrate(torch.randn(2048, d) * torch.rand(d) * 3)
big = torch.empty(100 << 20); sink = torch.empty(100 << 20)
enc = session_encoder(cfg, True, torch.float16)
x = torch.randn(1, d) * 2
args = tf._cached(tf._ENC_ARGS, cfg, tf._encoder_args)
ptr = x.data_ptr()
cases = {
    "session encode (rated, fp16 wire)": lambda: enc(x, None, 100, None, None),
    "encode_frame_v2": lambda: encode_frame_v2(x, cfg, None, 100, None, None, torch.float16),
    "encode_token_frame": lambda: tf.encode_token_frame(x, cfg, 100, None, None, torch.float16),
    "C++ call alone": lambda: tf._C.v2_encode_token_frame(ptr, *args[:9], 1, args[9], b"", 0),  # fp32 to fp16
    "check_tensor": lambda: check_tensor("x", x, FLOAT_DTYPES, ndim=2),
    "x.shape ints": lambda: (int(x.shape[0]), int(x.shape[1])),
    "is_cpu+is_contiguous": lambda: x.is_cpu and x.is_contiguous(),
    "DTYPE_CODES[x.dtype]": lambda: DTYPE_CODES[x.dtype],
    "x.data_ptr()": lambda: x.data_ptr(),
    "row_shifts": lambda: cfg.row_shifts(100, 1),
    "scaled(0)": lambda: cfg.scaled(0),
    "nothing": lambda: None,
}
res = {k: [] for k in cases}
for r in range(25):
    for k, f in cases.items():
        sink.copy_(big)
        t0 = time.perf_counter(); f(); res[k].append(time.perf_counter() - t0)
for k, f in cases.items():
    f(); t0 = time.perf_counter(); f(); w = time.perf_counter() - t0
    print(f"{k:36s} cold {st.median(res[k])*1e6:7.1f} us  warm {w*1e6:6.1f}")
