"""The pure-PyTorch reference backend: every op, every device."""
from .._backend import Backend, register_backend
from ..ops import reference as ref

register_backend(
    Backend(
        name="reference",
        devices=("*",),
        kernels={
            "pack_bits": ref.pack_bits,
            "unpack_bits": ref.unpack_bits,
            "lowbit_linear": ref.lowbit_linear,
            "int8_linear": ref.int8_linear,
            "ts_tabq_encode": ref.ts_tabq_encode,
            "ts_tabq_decode": ref.ts_tabq_decode,
        },
    )
)
