"""A fixture that runs a test once per instruction set of a C++ component (``_C.<component>_isas()``),
setting it with ``_C.set_<component>_isa`` and restoring the previous one afterwards, and the check
that an unknown instruction set is refused."""
from __future__ import annotations

import pytest

from splitkernels._native import load

_C, _ = load("_C")


def isa_fixture(component: str, name: str, what: str):
    """The fixture ``name`` over the instruction sets of ``component`` (``what`` names it in the
    docstring); skipped, saying why, where the C++ extension is not built."""
    listed = f"{component}_isas"
    params = getattr(_C, listed)() if _C is not None and hasattr(_C, listed) else ["none"]

    @pytest.fixture(params=params, name=name)
    def fixture(request):
        if request.param == "none":
            pytest.skip("C++ extension not built (pip install . builds it)")
        before = getattr(_C, f"{component}_isa")()
        getattr(_C, f"set_{component}_isa")(request.param)
        yield request.param
        getattr(_C, f"set_{component}_isa")(before)

    fixture.__doc__ = f"Each instruction set of {what} in turn (restored afterwards)."
    return fixture


def check_unknown_isa_refused(component: str) -> None:
    """``_C.set_<component>_isa`` refuses an unknown name in one line naming it and changes nothing."""
    before = getattr(_C, f"{component}_isa")()
    with pytest.raises(ValueError, match=f"{component} isa must be one of the supported ones.*'neon'"):
        getattr(_C, f"set_{component}_isa")("neon")
    assert getattr(_C, f"{component}_isa")() == before and before in getattr(_C, f"{component}_isas")()
