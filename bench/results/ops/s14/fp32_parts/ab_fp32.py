import sys, torch, time, statistics, json
torch.set_num_threads(1)
import splitkernels._C as _C
_C.set_num_threads(1)
from splitkernels import ops
from splitkernels.quant import quantize_weight
def bench(fn, n=200):
    for _ in range(20): fn()
    ts=[]
    for _ in range(n):
        t=time.process_time(); fn(); ts.append(time.process_time()-t)
    return statistics.median(ts)*1e3
out = {}
for (N,K) in [(4864,896),(896,4864),(896,896),(4096,4096),(1536,576),(576,1536)]:
    w = torch.randn(N,K)
    for bits in (2,3,4):
        q = quantize_weight(w, bits, 32 if bits != 3 else 32, dtype=torch.float32)
        for dt, M in ((torch.float32,1),(torch.bfloat16,1),(torch.bfloat16,16),(torch.bfloat16,64)):
            if bits != 4 and dt == torch.bfloat16: continue
            x = torch.randn(M,K).to(dt)
            out[f"{N}x{K} W{bits} {str(dt)[6:]} M={M}"] = bench(lambda: ops.lowbit_linear(x, q))
json.dump(out, open(sys.argv[1], 'w'))
