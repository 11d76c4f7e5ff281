"""Session 12 probe: one 4096 x 4096 lowbit_linear (bf16, group 128) beside bf16 F.linear.
Usage: SPLITKERNELS_NUM_THREADS=1 python profile_target.py M SECONDS [BITS]
SECONDS > 0: call ours in a loop that long (the target of `perf record -e cpu-clock --delay 5000`);
SECONDS = 0: print medians of 15 calls (thread clock), three times."""
import sys, time, torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(1)
m = int(sys.argv[1]); secs = float(sys.argv[2])
w = torch.randn(4096, 4096)
q = quantize_weight(w, int(sys.argv[3]) if len(sys.argv) > 3 else 4, 128, dtype=torch.bfloat16)
x = torch.randn(m, 4096).bfloat16()
wb = w.bfloat16()
for _ in range(3): ops.lowbit_linear(x, q); torch.nn.functional.linear(x, wb)
def med(f, n):
    ts = []
    for _ in range(n):
        t = time.thread_time(); f(); ts.append(time.thread_time() - t)
    ts.sort(); return ts[len(ts) // 2]
if secs > 0:
    t0 = time.time()
    while time.time() - t0 < secs: ops.lowbit_linear(x, q)
else:
    for _ in range(3):
        a = med(lambda: ops.lowbit_linear(x, q), 15); b = med(lambda: torch.nn.functional.linear(x, wb), 15)
        print(f"M={m}: W{sys.argv[3] if len(sys.argv) > 3 else 4} {a*1e3:.2f} ms ({2*m*4096*4096/a/1e9:.0f} GFLOPS), bf16 {b*1e3:.2f} ms ({2*m*4096*4096/b/1e9:.0f} GFLOPS), ratio {a/b:.3f}")
