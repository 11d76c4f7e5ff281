"""One module per backend. Each is imported by :mod:`splitkernels.registry` on first use (every
module in this folder, none listed by name), declares its backend and registers its kernels.

A module never raises on import: where its library or device is missing it declares the
backend with an ``unavailable_reason`` instead.
"""
