"""Session 71: the host side of the codec v2 device pass, before (3503f7a) and after, kernels stubbed,
on CPU tensors, the two versions taking turns in one process. Run from the repository root."""
import subprocess, sys, tempfile, torch, timeit, statistics
from pathlib import Path
src = subprocess.run(["git", "show", "3503f7a:splitkernels/codec/v2_device.py"], capture_output=True, text=True,
                     check=True).stdout
src = src.replace("from ..registry", "from splitkernels.registry")
src = src.replace("from .config_v2", "from splitkernels.codec.config_v2")
tmp = Path(tempfile.mkdtemp()); (tmp / "v2_device_old.py").write_text(src); sys.path.insert(0, str(tmp))
import v2_device_old as old
from splitkernels.codec import v2_device as new, calibrate
from splitkernels.codec.v2 import encode_v2
torch.manual_seed(0)
x=torch.randn(2048,4096); x[:,7]*=12
cfg=calibrate(x,bits=4.0)
def run(x, c, inv, kmax, rl, packed, so, vo): packed[:32].zero_()
def drun(*a): pass
cpu=torch.device('cpu')
res={}
for dt in (torch.float16, torch.bfloat16):
  x1=(torch.randn(1,4096)*3).to(dt)
  enc=encode_v2(x1,cfg)
  fns={
   f'encode old {dt}':lambda: old.encode(x1,cfg,run),
   f'encode new {dt}':lambda: new.encode(x1,cfg,run),
   f'decode old {dt}':lambda: old.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, cpu, drun),
   f'decode new {dt}':lambda: new.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, cpu, drun),
  }
  for r in range(5):
    for k,f in fns.items():
      res.setdefault(k,[]).append(min(timeit.repeat(f,number=1000,repeat=3))/1000*1e6)
for k,v in res.items(): print(f'{k:32s} median {statistics.median(v):6.1f} us  range {min(v):.1f}-{max(v):.1f}')
print('escapes in frame', enc.escapes.numel())
res={}
x5=(torch.randn(512,4096)*3).half()
enc=encode_v2(x5,cfg)
fns={'decode old T=512':lambda: old.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, cpu, drun),
     'decode new T=512':lambda: new.decode(enc.symbols, enc.raw, enc.escapes, enc.raw_values, cfg, cpu, drun)}
for r in range(5):
    for k,f in fns.items():
      res.setdefault(k,[]).append(min(timeit.repeat(f,number=20,repeat=3))/20*1e6)
for k,v in res.items(): print(f'{k:32s} median {statistics.median(v):6.1f} us  range {min(v):.1f}-{max(v):.1f}')
