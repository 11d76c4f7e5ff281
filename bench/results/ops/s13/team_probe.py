"""Our W4/W8 lowbit_linear at 2 threads, with a bf16 F.linear (a parallel torch op) before each call
or not, on an idle machine or beside one spinning process; mean / median / p90 per call (ms).
Usage: python team_probe.py  (runs each SK_TEAM_MODE mode in its own process)

SK_TEAM_MODE was a switch of this session's experiment build: none = always torch's OpenMP team,
own = always the pool, pool = the team with a 200 ms fall-back to the pool after a region whose
worker came late. The committed code has no switch and behaves as `none`; the output file is
what this script printed under the experiment build."""
from pathlib import Path
import os, subprocess, sys, time, statistics, json
if len(sys.argv) == 1:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/, for timing.py
    import timing
    for busy in (0, 1):
        with timing.BusyCores(busy):
            for mode in ("none", "own", "pool", "none", "own", "pool"):
                out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True,
                                     env={**os.environ, "SK_TEAM_MODE": mode}).stdout
                print(f"busy={busy} {mode:6s} {out.strip()}", flush=True)
    sys.exit()
import torch
from splitkernels import ops
from splitkernels.quant import quantize_weight
torch.set_num_threads(2)
torch.manual_seed(0)
w = torch.randn(4096, 4096)
q = {b: quantize_weight(w, b, 128) for b in (4, 8)}
wb = w.bfloat16(); xt = torch.randn(64, 4096).bfloat16()
res = []
for torch_between in (True, False):
    for b in (4, 8):
        for m in (1, 4, 16):
            x = torch.randn(m, 4096).bfloat16()
            ts = []
            for i in range(150 if m < 16 else 60):
                if torch_between:
                    torch.nn.functional.linear(xt, wb)
                t = time.perf_counter(); ops.lowbit_linear(x, q[b]); ts.append(time.perf_counter() - t)
            ts = sorted(ts[5:])
            res.append(f"{'T' if torch_between else '-'}W{b}M{m}: {statistics.mean(ts)*1e3:.2f}/{statistics.median(ts)*1e3:.2f}/{ts[int(0.9*len(ts))]*1e3:.2f}")
print("  ".join(res))
