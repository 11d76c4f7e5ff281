import torch, time, copy, statistics
torch.set_num_threads(1)
import splitkernels._C as C; C.set_num_threads(1)
from splitkernels.models.loading import load_packaged
from splitkernels.nn.replace import replace_linear
m, tok = load_packaged("smollm2", dtype=torch.float32)
ids = tok("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt").input_ids[:, :32]
def per_token(model, steps=24):
    with torch.no_grad():
        out = model(ids, use_cache=True); past = out.past_key_values; nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=past, use_cache=True); past = out.past_key_values; nxt = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / steps * 1e3
mb = copy.deepcopy(m).to(torch.bfloat16)
q = replace_linear(copy.deepcopy(m), bits=4, group_size=32)
qb = replace_linear(copy.deepcopy(mb), bits=4, group_size=32)
res = {}
for r in range(3):
    for name, model in (("dense fp32", m), ("dense bf16", mb), ("W4 g32 fp32 (QuantLinear)", q), ("W4 g32 bf16 (QuantLinear)", qb)):
        res.setdefault(name, []).append(per_token(model))
for k, v in res.items(): print(f"{k:28s} {statistics.median(v):6.2f} ms/token  ({min(v):.2f}-{max(v):.2f})")
