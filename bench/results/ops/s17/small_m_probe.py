"""fp32 activations at M = 8-32, W4: ours (the panel GEMM) beside torch's fp32 F.linear, one thread.

Run: SPLITKERNELS_NUM_THREADS=1 python bench/results/ops/s17/small_m_probe.py (thread CPU time,
median of 9 alternating calls).
"""
import time

import torch

from splitkernels._backends import cpp
from splitkernels.formats import DTYPE_CODE
from splitkernels.quant import quantize_weight

torch.set_num_threads(1)
for n, k in [(4096, 4096), (576, 1536), (1536, 576)]:
    w = torch.randn(n, k)
    q = quantize_weight(w, 4, 128 if k % 128 == 0 else 64)
    for m in (8, 16, 32):
        x, y = torch.randn(m, k), torch.empty(m, n)
        ours = lambda: cpp._C.lowbit_linear(x.data_ptr(), DTYPE_CODE[torch.float32], m, k, q.qweight.data_ptr(), n,  # noqa: E731
                                            q.qweight.shape[1], q.scale.data_ptr(), q.zero.data_ptr(),
                                            DTYPE_CODE[q.scale.dtype], 4, q.group_size, 0, y.data_ptr())
        dense = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
        times = {"ours": [], "F.linear": []}
        ours(), dense()
        for _ in range(9):
            for name, f in (("ours", ours), ("F.linear", dense)):
                start = time.thread_time()
                f()
                times[name].append(time.thread_time() - start)
        med = {name: sorted(v)[4] * 1e3 for name, v in times.items()}
        print(f"{n}x{k} M={m}: ours {med['ours']:.2f} ms, fp32 F.linear {med['F.linear']:.2f} ms, "
              f"ratio {med['ours'] / med['F.linear']:.2f}", flush=True)
