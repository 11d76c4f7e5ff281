import os, time, torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(2)
torch.manual_seed(0)
w = torch.randn(4096, 4096); wb = w.bfloat16()
qw = quantize_weight(w, 4, 128)
x = torch.randn(16, 4096).bfloat16()
def med(fn, before=None):
    ts = []
    for _ in range(30):
        if before: before()
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[15] * 1e3
ours = lambda: ops.lowbit_linear(x, qw)
dense = lambda: torch.nn.functional.linear(x, wb)
for _ in range(3): ours(); dense()
print("ours alone", med(ours), "ours right after torch bf16 linear", med(ours, dense),
      "after torch + 5 ms sleep", med(ours, lambda: (dense(), time.sleep(0.005))), "torch alone", med(dense))
time.sleep(1.0)
print("ours alone after 1 s idle", med(ours))
dense(); time.sleep(0.05); print("after torch + 50 ms", med(ours))
dense(); time.sleep(0.3); print("after torch + 300 ms", med(ours))
