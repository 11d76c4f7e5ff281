"""The LM head of a batched decode step: greedy rows get the fp32 head's argmax from a bf16 pass
and an exact fp32 fix-up; rows that sample get the fp32 logits.

A bf16 head reads half the bytes of the fp32 one and runs on the CPU's bf16 dot products, but its
logits are not the fp32 ones. For row ``x`` and vocabulary row ``w`` the error is bounded: rounding
``x`` and ``w`` to bf16 (unit roundoff ``u = 2^-8``) moves each product by at most
``(2u + u^2) |x_k w_k|``, rounding the bf16 result moves it by ``u (1 + u)^2 sum |x_k w_k|``, and
fp32 accumulation of either sum adds at most ``K 2^-24 sum |x_k w_k|`` each (``4 K 2^-24`` covers
both sums and the bf16 kernel's own accumulation order). With ``sum |x_k w_k| <= |x|_2 |w|_2``
each logit gets an interval; every vocabulary row whose upper end reaches the lower end of the
bf16 argmax is recomputed in fp32, and the first maximum of those is the fp32 head's argmax (what
the unbatched server's fused head returns, and what ``torch.argmax`` of the fp32 logits gives, up
to the last-bit rounding of a different summation order). A row with non-finite values takes the
plain fp32 head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)


class BatchHead:
    """An fp32 ``nn.Linear`` LM head over ``[n, K]`` rows: :meth:`argmax` and :meth:`logits`."""

    def __init__(self, linear: nn.Linear) -> None:
        if not isinstance(linear, nn.Linear) or linear.weight.dtype != torch.float32:
            raise TypeError("BatchHead needs an fp32 nn.Linear")
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.w16 = self.weight.to(torch.bfloat16)
        self.norm2 = self.weight.norm(dim=1).unsqueeze(0)  # [1, V]
        self.norm_max = float(self.norm2.max())
        k = self.weight.shape[1]
        self.rel = (3 * _U + 6 * _U * _U + 4 * k * 2.0 ** -24) * 1.01

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[n, V]`` (the model's own head)."""
        return F.linear(x, self.weight, self.bias)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 head's argmax of each row of ``x [n, K]`` (fp32), ``[n]`` int64."""
        approx = F.linear(x.to(torch.bfloat16), self.w16)  # bf16 [n, V]; its rounding is in the bound
        if self.bias is not None:
            approx = approx.float() + self.bias
        scale = x.norm(dim=1).mul_(self.rel)  # [n]: logit v is within scale * |w_v|_2 of the fp32 one
        peak, best = approx.max(dim=1)
        floor = peak.float() - scale * self.norm2[0, best]  # the best lower end
        # Whole-row pass against the loosest bound (the largest |w_v|_2), in the approximation's own
        # dtype with the threshold rounded down, so it keeps a superset of the candidates ...
        loose = floor - scale * self.norm_max
        loose = (loose - loose.abs() * 2.0 ** -7 - 1e-30).to(approx.dtype)
        rows, cols = (approx >= loose.unsqueeze(1)).nonzero(as_tuple=True)  # row-major, columns ascending
        # ... which the per-row bound then narrows.
        keep = approx[rows, cols].float() + scale[rows] * self.norm2[0, cols] >= floor[rows]
        rows, cols = rows[keep], cols[keep]
        dots = (x[rows] * self.weight[cols]).sum(dim=1)
        if self.bias is not None:
            dots += self.bias[cols]
        n, vocab = approx.shape
        top = torch.full((n,), float("-inf")).scatter_reduce(0, rows, dots, "amax")
        first = dots == top[rows]  # the first maximum of each row, as torch.argmax takes it
        tokens = torch.full((n,), vocab, dtype=torch.long).scatter_reduce(0, rows[first], cols[first], "amin")
        bad = tokens == vocab  # no candidate (NaN or infinite logits): no interval to trust
        if bool(bad.any()):
            tokens[bad] = self.logits(x[bad]).argmax(dim=1)
        return tokens
