"""The cpp backend (kernels land with their issue)."""
from .._backend import Backend, register_backend

register_backend(Backend(name="cpp", devices=(), unavailable_reason="not built yet"))
