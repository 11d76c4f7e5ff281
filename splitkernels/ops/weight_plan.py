"""What ``lowbit_linear`` needs of a weight, worked out once per weight and reused.

Besides checks of ``x`` and the bias, a call of :func:`splitkernels.ops.lowbit_linear` needs
the weight's layout checked (:meth:`QuantizedWeight.check`), its device, the kernel
:func:`splitkernels.registry.resolve_entry` picks and what that kernel's ``prepare`` does with
the weight alone (pointers, sizes, dtype codes): several microseconds of Python, more than the
kernel at decode sizes. :func:`linear_plan` keeps them in a :class:`LinearPlan` per
:class:`QuantizedWeight` and reuses it while it is current:

* the QuantizedWeight holds the same three tensor objects and the same bits, group_size and
  in_features (assigning a field makes a new plan);
* each tensor keeps its storage address and its version counter: every in-place op bumps the
  counter, including those that change the layout (``resize_``, ``set_``, ``as_strided_``,
  ``t_``), and a ``.data`` assignment or ``torch.utils.swap_tensors`` to other storage moves the
  address. Inference tensors have no version counter; for them the plan compares address,
  shape, strides and dtype instead. (Not seen: a ``.data`` assignment or swap to a view of the
  same storage that starts at the same address; the kernels then read the old layout from the
  same memory.) A plan holds no values, so updating the weight in place is safe;
* prepared kernels are kept per :func:`splitkernels.registry.dispatch_state` (kernel table and
  forced backend), so a ``use_backend`` block or a newly declared backend resolves again.

Nothing here depends on the thread count or the instruction set picked: the kernels read those
on every call.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

from torch import Tensor

from ..formats import QuantizedWeight
from ..registry import dispatch_state, resolve_entry

# (x, bias) -> y; x contiguous with x.shape[-1] == in_features, bias (or None) in x's dtype.
PreparedLinear = Callable[[Tensor, Optional[Tensor]], Tensor]


def _stamp(q: Tensor, s: Tensor, z: Tensor) -> tuple:
    return q.data_ptr(), q._version, s.data_ptr(), s._version, z.data_ptr(), z._version


def _untracked_stamp(q: Tensor, s: Tensor, z: Tensor) -> tuple:
    """For inference tensors (no version counter): everything the kernels read besides values."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (q, s, z))


class LinearPlan:
    """One weight's checked layout, device and prepared kernels (see the module docstring).

    ``eager`` is False where calls must go through the custom op: weight tensors that are
    tensor subclasses (fake tensors) or on the meta device.
    """

    __slots__ = ("qweight", "scale", "zero", "layout", "in_features", "device", "mixed_devices", "eager",
                 "_stamp_fn", "_stamp", "_calls")

    def __init__(self, qw: QuantizedWeight) -> None:
        qw.check()
        q, s, z = qw.qweight, qw.scale, qw.zero
        self.qweight, self.scale, self.zero = q, s, z
        self.layout = (qw.bits, qw.group_size, qw.in_features)
        self.in_features = qw.in_features
        self.device = q.device
        self.mixed_devices = s.device != q.device or z.device != q.device
        self.eager = all(type(t) is Tensor for t in (q, s, z)) and q.device.type != "meta"
        tracked = self.eager and not any(t.is_inference() for t in (q, s, z))
        self._stamp_fn = _stamp if tracked else _untracked_stamp
        self._stamp = self._stamp_fn(q, s, z) if self.eager else None
        self._calls: dict[tuple, PreparedLinear] = {}

    def current(self, qw: QuantizedWeight) -> bool:
        """Whether this plan still describes ``qw`` (same tensors, layout, storage, versions)."""
        q, s, z = self.qweight, self.scale, self.zero
        bits, group_size, in_features = self.layout
        if not (qw.qweight is q and qw.scale is s and qw.zero is z and qw.bits == bits
                and qw.group_size == group_size and qw.in_features == in_features):
            return False
        if not self.eager:
            return True
        try:
            return self._stamp_fn(q, s, z) == self._stamp
        except RuntimeError:  # became an inference tensor (no version counter) through .data
            return False

    def prepared(self) -> PreparedLinear:
        """The kernel for this weight that the registry picks now, prepared (cached per dispatch state)."""
        state = dispatch_state()
        call = self._calls.get(state)
        if call is None:
            for old in [k for k in list(self._calls) if k[0] != state[0]]:  # an older kernel table
                self._calls.pop(old, None)  # (list() and pop: another thread may be here too)
            call = self._calls[state] = self._prepare()
        return call

    def _prepare(self) -> PreparedLinear:
        entry = resolve_entry("lowbit_linear", self.device)
        q, s, z = self.qweight, self.scale, self.zero
        bits, group_size, _ = self.layout
        if entry.prepare is not None:
            return entry.prepare(q, s, z, bits, group_size)
        fn = entry.fn
        return lambda x, bias: fn(x, q, s, z, bits, group_size, bias)


# id(QuantizedWeight) -> (weak reference to it, its plan). QuantizedWeight is an unhashable
# dataclass and its __dict__ is its fields (callers rebuild one with QuantizedWeight(**q.__dict__)),
# so the plans live here; an entry goes when its weight is collected.
_plans: dict[int, tuple[weakref.ref, LinearPlan]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _plans.get(key)
    if entry is not None and entry[0] is ref:
        _plans.pop(key, None)


def linear_plan(qw: QuantizedWeight) -> LinearPlan:
    """The current :class:`LinearPlan` of ``qw``, made (and its layout checked) when there is
    none or the cached one is stale. Raises TypeError/ValueError, naming the field, for an
    invalid weight."""
    key = id(qw)
    entry = _plans.get(key)
    if entry is not None and entry[0]() is qw and entry[1].current(qw):
        return entry[1]
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight, got {type(qw).__name__}")
    plan = LinearPlan(qw)
    _plans[key] = (weakref.ref(qw, lambda ref, key=key: _forget(key, ref)), plan)
    return plan


__all__ = ["LinearPlan", "PreparedLinear", "linear_plan"]
