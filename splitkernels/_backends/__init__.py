"""One module per backend; each registers its kernels with :mod:`splitkernels._backend`."""
