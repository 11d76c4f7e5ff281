import os, sys, time, torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.manual_seed(0)
w = torch.randn(4096, 4096)
res = {}
for bits in (4, 8):
    qw = quantize_weight(w, bits, 128)
    for m in (1, 4, 16, 64):
        x = torch.randn(m, 4096).bfloat16()
        for _ in range(5): ops.lowbit_linear(x, qw)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(10): ops.lowbit_linear(x, qw)
            ts.append((time.perf_counter() - t0) / 10)
        ts.sort()
        res[(bits, m)] = ts[3] * 1e3
print(os.environ.get("SPLITKERNELS_NUM_THREADS"), " ".join(f"W{b} M={m}: {v:.2f}" for (b, m), v in res.items()))
