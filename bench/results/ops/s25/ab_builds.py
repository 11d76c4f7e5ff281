"""Time one build of the extension standalone, so that two builds can be compared in
alternating processes (two copies in one process would share symbols).

Run: OMP_NUM_THREADS=1 SPLITKERNELS_NUM_THREADS=1 \
     python bench/results/ops/s25/ab_builds.py PATH/_C.so NxKxMxBITSxGROUP ...
Prints, per case, the minimum / median thread CPU time of one fp32-activation lowbit_linear call
(torch's default fp32 precision: the fp32 kernels) in ms, over about a second of calls.
"""
import importlib.util
import os
import shutil
import statistics
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
    n, k, m, bits, g = map(int, case.split("x"))
    q = quantize_weight(torch.randn(n, k), bits, g)
    x, y = torch.randn(m, k), torch.empty(m, n)

    def call() -> None:
        ext.lowbit_linear(x.data_ptr(), 0, m, k, q.qweight.data_ptr(), n, q.qweight.shape[1], q.scale.data_ptr(),
                          q.zero.data_ptr(), 0, bits, g, 0, y.data_ptr(), False)

    for _ in range(3):
        call()
    times = []
    deadline = time.thread_time() + 1.0
    while time.thread_time() < deadline:
        t0 = time.thread_time()
        call()
        times.append(time.thread_time() - t0)
    out.append(f"{case} {min(times) * 1e3:.3f} {statistics.median(times) * 1e3:.3f}")
print("\n".join(out))
