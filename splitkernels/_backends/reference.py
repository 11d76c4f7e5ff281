"""The pure-PyTorch reference backend: every op, every device, lowest priority."""
from ..ops import reference as ref
from ..registry import ANY_DEVICE, declare_backend

declare_backend("reference").add_kernels(
    {
        "pack_bits": ref.pack_bits,
        "unpack_bits": ref.unpack_bits,
        "lowbit_linear": ref.lowbit_linear,
        "int8_linear": ref.int8_linear,
        "ts_tabq_encode": ref.ts_tabq_encode,
        "ts_tabq_decode": ref.ts_tabq_decode,
    },
    priority={ANY_DEVICE: 0},
)
