"""SmolLM2 forward with QuantLinear W4 (bf16) vs the dense bf16 model, at the process's thread settings."""
import os, time, torch
from splitkernels.models import load_packaged
from splitkernels.nn import replace_linear
torch.manual_seed(0)
model, tok = load_packaged("smollm2"); model = model.bfloat16().eval()
dense = {n: p.clone() for n, p in model.state_dict().items()}
ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
def bench(m, x, reps):
    with torch.inference_mode():
        for _ in range(2): m(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); m(x); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[len(ts) // 2] * 1e3
d_pre, d_one = bench(model, ids, 9), bench(model, ids[:, :1], 31)
replace_linear(model, bits=4, group_size=64, progress=False)
q_pre, q_one = bench(model, ids, 9), bench(model, ids[:, :1], 31)
print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}: "
      f"64-token forward dense bf16 {d_pre:.1f} ms, W4 {q_pre:.1f} ms; 1-token forward dense {d_one:.2f} ms, W4 {q_one:.2f} ms")
