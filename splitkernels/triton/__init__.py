"""Triton kernels for the GPU path, one module per kernel family.

``bitpack`` (bit streams), ``codec`` (fused TS + TAB-Q), ``lowbit_gemm`` (low-bit matmul),
``dispatch`` (the M-crossover table) and ``autotune_cache`` (tuned launch configs per GPU).
Import these only where Triton is installed; :mod:`splitkernels._backends.triton` registers
them as the ``triton`` backend.
"""
