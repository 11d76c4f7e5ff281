"""The cuda backend (kernels land with their issue)."""
from .._backend import Backend, register_backend

register_backend(Backend(name="cuda", devices=(), unavailable_reason="not built yet"))
