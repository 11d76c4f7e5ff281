"""Calibrated weight quantisation with Hessian-based error feedback (GPTQ-style).

For a linear layer that sees inputs ``X [n, K]``, changing its weight by ``dW`` changes the output
by ``||X dW^T||^2 = sum over rows of dW_r H dW_r^T`` with ``H = X^T X / n``. The columns of ``W``
are quantised one after another; each column's rounding error is spread over the columns not yet
quantised through the inverse Hessian (the optimal-brain-surgeon update), so later columns absorb
what earlier ones lost. Columns with large ``diag(H)`` (inputs that carry the most energy) can be
quantised first (activation order).

The result is the packed format of docs/FORMATS.md §2 (:class:`~splitkernels.quant.QuantizedWeight`),
the same as round-to-nearest's: each group of ``group_size`` consecutive input columns has one
scale and zero, so every kernel runs a calibrated weight unchanged. A group's scale and zero are
not its min/max: each end of the range is searched over a small grid for the least rounding
error weighted by ``diag(H)`` (:func:`~splitkernels.quant.search_group_ranges`; at 3 bits the
plain min/max wastes levels on rare extremes), and can be re-solved by least squares in the
output metric once the codes are chosen (:func:`refit_group_params`). With activation order the
column visiting order no longer follows the groups, so the groups' scales and zeros are fixed
before the first column is visited (from the weight as given); without it each group's are fitted
to the error-updated weight when its first column is reached.
"""
from __future__ import annotations

import torch

from .ops import reference
from .ops.checks import FLOAT_DTYPES, check_tensor
from .quant import QuantizedWeight, quantize_weight, search_group_ranges

# Relative damping added to diag(H) (times its mean), and how often it may grow tenfold when the
# damped Hessian is still not positive definite (e.g. far fewer calibration rows than inputs).
DEFAULT_DAMP = 0.01
_DAMP_RETRIES = 4
# Columns per lazy update: errors inside a block update the block at once, the rest of the
# matrix once per block (one matmul instead of one rank-1 update per column).
_BLOCK = 128
# Rows solved at once by refit_group_params (bounds its [rows, groups, K] temporary).
_REFIT_ROWS = 64


class HessianAccumulator:
    """Running ``H = X^T X / n`` over every input row a linear layer sees (``[..., K]`` batches).

    Rows may come with the input the dense model gives the same layer at the same position
    (``reference``); then ``cross = X^T (X_ref - X) / n`` is kept too, for
    :func:`dense_output_target`. Either every ``add`` has a reference or none does.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.cross_sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add the rows of ``x [..., K]`` (and of ``reference``, the same shape)."""
        if (reference is None) != (self.cross_sum is None) and self.rows:
            raise ValueError("reference must be given with every batch or with none")
        x = x.detach().reshape(-1, self.sum.shape[0]).float()
        self.sum.addmm_(x.t(), x)
        if reference is not None:
            if tuple(reference.shape[-1:]) != (self.sum.shape[0],) or reference.numel() != x.numel():
                raise ValueError(f"reference must have the shape of x {tuple(x.shape)}, got {tuple(reference.shape)}")
            if self.cross_sum is None:
                self.cross_sum = torch.zeros_like(self.sum)
            self.cross_sum.addmm_(x.t(), reference.detach().reshape(x.shape).float() - x)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """The mean ``X^T X / n`` (all zero before any rows were added)."""
        return self.sum / max(self.rows, 1)

    @property
    def cross(self) -> torch.Tensor | None:
        """The mean ``X^T (X_ref - X) / n``, or None when no reference inputs were added."""
        return None if self.cross_sum is None else self.cross_sum / max(self.rows, 1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64), raising the damping
    tenfold while the damped matrix is not positive definite."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(_DAMP_RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        damp *= 10.0
    raise ValueError(f"hessian is not positive definite even with damping {damp / 10:g}; "
                     "pass more (or more varied) calibration data")


def dense_output_target(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                        damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The weight whose outputs on the inputs ``X`` a layer really sees (with earlier layers
    quantised) best match the dense model's outputs ``X_ref W^T`` (least squares, damped).

    ``hessian = X^T X / n`` and ``cross = X^T (X_ref - X) / n`` (:class:`HessianAccumulator`
    with references). For any ``Q``, ``||X Q^T - X_ref W^T||^2`` is ``||X (Q - W')^T||^2`` plus a
    constant, ``W' = W + W cross^T H^-1``, so quantising ``W'`` with :func:`gptq_quantize` on ``H``
    also undoes part of the error the quantised layers before this one left in ``X``, instead of
    reproducing ``W`` on inputs that are already off. ``W' = W`` when ``X = X_ref``.
    """
    k = w.shape[1]
    _check_hessian(hessian, k)
    _check_hessian(cross, k, "cross")
    h = hessian.to(device=w.device, dtype=torch.float64)
    h = h + damp * float(h.diagonal().mean()) * torch.eye(k, dtype=h.dtype, device=h.device)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return w  # no usable inverse: fall back to reproducing the dense weight
    wt = w.to(torch.float64).t()
    shift = torch.cholesky_solve(cross.to(device=w.device, dtype=torch.float64) @ wt, factor)
    return (wt + shift).t().to(w.dtype)


def refit_group_params(w: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[N, K / group_size]`` (float32) that, with the ``codes [N, K]`` kept, make
    ``codes * scale + zero`` closest to ``w [N, K]`` in the output metric ``(w - w^) H (w - w^)^T``
    of each row (``hessian [K, K]``, positive definite): one least-squares solve per row over its
    groups' scales and zeros, which the error feedback couples. A row keeps ``scale`` and ``zero``
    where the solve does not lower its error or gives a scale that is not positive.
    """
    n, k = w.shape
    groups = k // group_size
    h = hessian.to(device=w.device, dtype=torch.float64)
    hg = h.reshape(groups, group_size, groups, group_size)
    m_zz = hg.sum((1, 3))
    new_scale, new_zero = scale.float().clone(), zero.float().clone()
    for r0 in range(0, n, _REFIT_ROWS):
        rows = slice(r0, min(r0 + _REFIT_ROWS, n))
        q = codes[rows].to(torch.float64).reshape(-1, groups, group_size)
        hw = (w[rows].to(torch.float64) @ h).reshape(q.shape)
        t = torch.einsum("nai,aibj->nabj", q, hg)  # sum over group a's columns of q_i H_ij
        m_ss = torch.einsum("nabj,nbj->nab", t, q)
        m_sz = t.sum(-1)
        m = torch.cat([torch.cat([m_ss, m_sz], 2),
                       torch.cat([m_sz.transpose(1, 2), m_zz.expand(q.shape[0], -1, -1)], 2)], 1)
        rhs = torch.cat([(q * hw).sum(-1), hw.sum(-1)], 1)
        old = torch.cat([scale[rows], zero[rows]], 1).to(torch.float64)
        # A group whose codes are all equal leaves its scale undetermined: a tiny ridge keeps the
        # system solvable (and the row-wise check below rejects anything it spoils).
        ridge = 1e-9 * m.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        eye = torch.eye(2 * groups, dtype=torch.float64, device=w.device)
        theta = torch.linalg.solve(m + ridge[:, None, None] * eye, rhs)

        def loss(v):  # the row's error up to a constant: v^T M v - 2 v^T rhs
            return torch.einsum("na,nab,nb->n", v, m, v) - 2 * (v * rhs).sum(1)

        keep = (loss(theta) < loss(old)) & (theta[:, :groups] > 0).all(1) & torch.isfinite(theta).all(1)
        new_scale[rows] = torch.where(keep[:, None], theta[:, :groups].float(), new_scale[rows])
        new_zero[rows] = torch.where(keep[:, None], theta[:, groups:].float(), new_zero[rows])
    return new_scale, new_zero


def _check_hessian(hessian: torch.Tensor, k: int, name: str = "hessian") -> None:
    check_tensor(name, hessian, FLOAT_DTYPES + (torch.float64,), ndim=2)
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name} must be [K, K] = [{k}, {k}] for w [N, {k}], got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError(f"{name} must be finite (found NaN or Inf)")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    range_search: bool = True,
    refit: bool = False,
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Quantise ``w [N, K]`` (out, in) to ``bits`` in groups of ``group_size`` along K, minimising
    the output error on inputs whose second moment is ``hessian [K, K]`` (:class:`HessianAccumulator`).

    ``damp`` is added to the Hessian's diagonal relative to its mean (raised automatically if the
    Hessian is singular). ``act_order`` visits columns by decreasing ``diag(H)``. ``range_search``
    chooses each group's scale and zero by :func:`~splitkernels.quant.search_group_ranges`, each
    column's rounding error weighted by ``diag(H)`` (the energy of its input), instead of the
    group's min/max. ``refit`` then re-solves the scales and zeros for the codes found
    (:func:`refit_group_params` on the damped Hessian; off by default: on SmolLM2 it lowered the
    KL to the dense model by ~3% but raised perplexity, bench/results/quality_calibrated_v3).
    ``dtype`` is the dtype of scale and zero (default: w's). With ``H = I`` and no refit the codes
    are those of round-to-nearest on the same scales and zeros.
    """
    # Validates w, bits and group_size.
    rtn = quantize_weight(w, bits, group_size, dtype=dtype)
    n, k = w.shape
    _check_hessian(hessian, k)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    qmax = 2**bits - 1
    dtype = rtn.scale.dtype

    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    # Inputs that were always zero carry no information: give them a unit diagonal so the factor
    # exists. Their columns then neither pass on nor receive error, i.e. they are rounded as RTN.
    dead = (h.diagonal() == 0).nonzero().squeeze(1)
    h[dead, dead] = 1.0
    energy = h.diagonal().float()

    def fit(part: torch.Tensor, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if range_search:
            return search_group_ranges(part, bits, group_size, importance=energy[columns], dtype=dtype)
        fitted = quantize_weight(part, bits, group_size, dtype=dtype)
        return fitted.scale, fitted.zero

    order = (torch.argsort(energy, descending=True, stable=True) if act_order
             else torch.arange(k, device=h.device))
    u = _inverse_cholesky(h[order][:, order], float(damp)).to(torch.float32)

    work = w.float()[:, order].clone()
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    # With act_order the visiting order does not follow the groups, so every group's scale and
    # zero are fixed before the first column is visited, from the weight as given (static groups);
    # without it each group is fitted to the error-updated weight when its first column is reached.
    scale, zero = fit(w.float(), slice(None)) if act_order else (rtn.scale, rtn.zero)
    scale, zero = scale.float().clone(), zero.float().clone()
    # Without act_order blocks hold whole groups, so a group's columns are all up to date when
    # its parameters are fitted.
    block = _BLOCK if act_order else max(group_size, _BLOCK - _BLOCK % group_size)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        part = work[:, b0:b1]
        errors = torch.empty_like(part)
        for i in range(b1 - b0):
            col = b0 + i
            group = int(order[col]) // group_size
            if not act_order and col % group_size == 0:
                s, z = fit(part[:, i:i + group_size], slice(col, col + group_size))
                scale[:, group], zero[:, group] = s[:, 0].float(), z[:, 0].float()
            s, z = scale[:, group], zero[:, group]
            q = torch.clamp(torch.round((part[:, i] - z) / s), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (part[:, i] - (q * s + z)) / u[col, col]
            part[:, i:] -= err.unsqueeze(1) * u[col, col:b1].unsqueeze(0)
            errors[:, i] = err
        work[:, b1:] -= errors @ u[b0:b1, b1:]
    codes = codes[:, torch.argsort(order)]
    if refit:
        damped = h + float(damp) * float(h.diagonal().mean()) * torch.eye(k, dtype=h.dtype, device=h.device)
        scale, zero = refit_group_params(w.float(), codes, damped, scale, zero, group_size)
    qweight = reference.pack_weight_codes(codes, bits)
    return QuantizedWeight(qweight, scale.to(dtype), zero.to(dtype), bits, group_size, k)


__all__ = ["gptq_quantize", "refit_group_params", "dense_output_target", "HessianAccumulator", "DEFAULT_DAMP"]
