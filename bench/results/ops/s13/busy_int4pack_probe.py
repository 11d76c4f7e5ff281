"""W4 lowbit_linear and torch int4pack taking turns at 2 threads, 4096 x 4096, M = 1/4/16: mean / median / p90 ms,
idle (argument 0) or beside one spinning process (1). Run under this session's build and under commit 55e9349's (the pool)."""
from pathlib import Path
import sys, time, statistics, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/, for timing.py
import timing
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(2)
n = k = 4096
w = torch.randn(n, k); q = quantize_weight(w, 4, 128)
w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
sz = torch.randn(k // 128, n, 2).bfloat16()
for m in (1, 4, 16):
    x = torch.randn(m, k).bfloat16()
    fns = {"ours W4": lambda: ops.lowbit_linear(x, q),
           "int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 128, sz)}
    with timing.BusyCores(int(sys.argv[1])):
        ts = {name: [] for name in fns}
        for i in range(200 if m < 16 else 80):
            for name, f in fns.items():
                t = time.perf_counter(); f(); ts[name].append(time.perf_counter() - t)
    print(f"busy={sys.argv[1]} M={m}: " + "  ".join(
        f"{name} mean {statistics.mean(v)*1e3:.2f} med {statistics.median(v)*1e3:.2f} p90 {sorted(v)[int(.9*len(v))]*1e3:.2f}"
        for name, v in ts.items()), flush=True)
