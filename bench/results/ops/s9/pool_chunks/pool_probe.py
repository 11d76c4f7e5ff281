"""Wall time per lowbit_linear call at the default thread settings (our pool at all CPUs)."""
import time, sys, json, torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(1)
res = {}
for (n, k) in ((64, 64), (256, 256), (576, 576), (1536, 576), (576, 1536), (4096, 4096)):
    for m in (1, 4):
        w = torch.randn(n, k)
        qw = quantize_weight(w, 4, 64, dtype=torch.bfloat16)
        x = torch.randn(m, k).bfloat16()
        f = lambda: ops.lowbit_linear(x, qw)
        reps = max(20, min(3000, int(2e7 / (n * k * m))))
        for _ in range(reps // 4 + 5): f()
        meds = []
        for r in range(7):
            t = time.perf_counter()
            for _ in range(reps): f()
            meds.append((time.perf_counter() - t) / reps * 1e6)
        meds.sort()
        res[f"{n}x{k} M={m}"] = meds[3]
        print(f"{n}x{k} M={m}: {meds[3]:.1f} us (min {meds[0]:.1f})", flush=True)
json.dump(res, open(sys.argv[1], "w"))
