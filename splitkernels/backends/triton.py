"""The triton backend (kernels land with their issue)."""
from .._backend import Backend, register_backend

register_backend(Backend(name="triton", devices=(), unavailable_reason="not built yet"))
