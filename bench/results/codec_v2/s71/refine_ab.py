"""Session 71: refine / apply_residuals before (torch, 28e705c) and after (numpy), same inputs, taking turns."""
import subprocess, statistics, timeit, types, dataclasses, torch, numpy as np
torch.set_num_threads(1)
from splitkernels.codec import calibrate, v2 as new, encode
src = subprocess.run(["git", "show", "28e705c:splitkernels/codec/v2.py"], capture_output=True, text=True, check=True).stdout
old = types.ModuleType("v2_old"); old.__package__ = "splitkernels.codec"; exec(compile(src, "v2_old", "exec"), old.__dict__)
torch.manual_seed(0)
for d in (576, 896):
    cfg = dataclasses.replace(calibrate(torch.randn(2048, d), bits=4.0), position_shift=(3,) * 8)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(1, d) * 2).to(dtype); x[0, 3] = 1e4
        enc = encode(x, cfg, start=5)
        y0 = new.dequantise(enc.symbols, cfg, dtype, fused=False)
        def r_new(): sym = enc.symbols.clone(); return new.refine(x, sym, enc.raw, cfg, 5)
        def r_old(): sym = enc.symbols.clone(); return old.refine(x, sym, enc.raw, cfg, 5)
        a_new = lambda: new.apply_residuals(y0.clone(), enc); a_old = lambda: old.apply_residuals(y0.clone(), enc)
        assert torch.equal(r_new(), r_old()) and torch.equal(a_new().view(torch.uint8), a_old().view(torch.uint8))
        res = {}
        for _ in range(7):
            for k, f in (("refine old", r_old), ("refine new", r_new), ("apply_residuals old", a_old), ("apply_residuals new", a_new)):
                res.setdefault(k, []).append(min(timeit.repeat(f, number=500, repeat=3)) / 500 * 1e6)
        print(f"d={d} {str(dtype)[6:]}: " + ", ".join(f"{k} {statistics.median(v):.1f} us" for k, v in res.items()))
