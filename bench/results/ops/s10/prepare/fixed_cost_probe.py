import time, torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(1)
def t(fn, reps=30):
    for _ in range(3): fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[reps // 2] * 1e3
for k in (1536, 4096):
    x = torch.randn(512, k).bfloat16()
    out = []
    for bits in (3, 4, 8):
        for n in (16, 32):
            qw = quantize_weight(torch.randn(n, k), bits, 128)
            out.append(f"W{bits} N={n}: {t(lambda: ops.lowbit_linear(x, qw)):.3f}")
    print(f"K={k} M=512", " ".join(out), f"| x.clone {t(lambda: x.clone()):.3f} x.float().sum {t(lambda: x.float().sum(1)):.3f}")
