"""Time one build of the extension standalone, so two builds can be compared in alternating
processes (loading both into one process bound the second's kernels to the first's symbols).

Run: OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 SPLITKERNELS_NUM_THREADS=1 \
     python bench/results/ops/s18/ab_builds.py PATH/_C.so NxKxMxBITS ...
Prints, per case, the minimum / median thread CPU time of one fp32-activation lowbit_linear call
in ms (about a second of calls; the minimum is the steadier figure on a shared VM).
"""
import importlib.util
import os
import shutil
import sys
import tempfile
import time

import torch

from splitkernels.quant import quantize_weight

sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND)
folder = tempfile.mkdtemp()
target = os.path.join(folder, "_C.cpython-311-x86_64-linux-gnu.so")
shutil.copy(sys.argv[1], target)
spec = importlib.util.spec_from_file_location("_C", target)
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
torch.set_num_threads(1)
torch.manual_seed(0)
out = []
for case in sys.argv[2:]:
    n, k, m, bits = map(int, case.split("x"))
    g = 128 if k % 128 == 0 else 64
    q = quantize_weight(torch.randn(n, k), bits, g)
    x, y = torch.randn(m, k), torch.empty(m, n)
    scale_code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[q.scale.dtype]

    def call() -> None:
        ext.lowbit_linear(x.data_ptr(), 0, m, k, q.qweight.data_ptr(), n, q.qweight.shape[1], q.scale.data_ptr(),
                          q.zero.data_ptr(), scale_code, bits, g, 0, y.data_ptr())

    call()
    start = time.thread_time()
    call()
    reps = max(5, min(200, int(1.0 / max(1e-5, time.thread_time() - start))))
    times = []
    for _ in range(reps):
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    out.append(f"{case}:{min(times) * 1e3:.3f}/{sorted(times)[reps // 2] * 1e3:.3f}")
print(os.path.basename(sys.argv[1]), " ".join(out), flush=True)
