"""Published-baseline activation transfers and weight formats, simulated for quality measurement.

Each transform maps the split-layer hidden state ``[T, d]`` to what the server reconstructs and
the bytes the edge would send (a minimal frame: no header, no CRC, so the baselines are charged
less than our self-describing frame).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from splitkernels.ops import reference
from splitkernels.opsc import decoder_layers
from splitkernels.planner.quality import TransferResult

ATOM_GROUP = 32
ATOM_OUTLIERS = 16  # 128 of 4096 channels in the published setting, scaled to d = 576


def int8_transfer(x: torch.Tensor) -> TransferResult:
    """SmoothQuant-style: symmetric per-token int8 with one fp16 scale per token."""
    q, s = reference.quantize_rows_int8(x)
    s = s.half().float()
    return TransferResult((q.float() * s[:, None]).to(x.dtype), x.numel() + 2 * x.shape[0], 8.0 * x.shape[0], 0)


def atom_transfer(x: torch.Tensor) -> TransferResult:
    """Atom-style: the ``ATOM_OUTLIERS`` channels of largest mean |x| in this frame at 8 bits
    (per-token symmetric, fp16 scale), the rest in asymmetric 4-bit groups of ``ATOM_GROUP``
    (fp16 scale and zero per group). The outlier channel list (u16 each) is sent per frame."""
    t, d = x.shape
    xf = x.float()
    k = min(ATOM_OUTLIERS, d)
    out_ch = xf.abs().mean(0).topk(k).indices
    mask = torch.zeros(d, dtype=torch.bool)
    mask[out_ch] = True
    y = torch.empty_like(xf)
    q8, s8 = reference.quantize_rows_int8(xf[:, mask])
    y[:, mask] = q8.float() * s8.half().float()[:, None]
    inl = xf[:, ~mask]
    n_in = inl.shape[1]
    groups = []
    for g0 in range(0, n_in, ATOM_GROUP):
        g = inl[:, g0 : g0 + ATOM_GROUP]
        lo = g.amin(-1, keepdim=True).half().float()
        scale = ((g.amax(-1, keepdim=True) - lo) / 15).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round((g - lo) / scale), 0, 15)
        groups.append(q * scale + lo)
    y[:, ~mask] = torch.cat(groups, -1)
    n_groups = -(-n_in // ATOM_GROUP)
    nbytes = t * ((n_in * 4 + 7) // 8 + 4 * n_groups + k + 2) + 2 * k
    return TransferResult(y.to(x.dtype), nbytes, 8.0 * nbytes / d, 0)


@contextmanager
def w8a8(model: nn.Module) -> Iterator[None]:
    """Within the block every decoder-layer linear runs SmoothQuant-style W8A8 (fake-quantised):
    smoothing factors s_j = sqrt(max|X_j| / max|W_j|) migrate activation outliers into the
    weights, then per-channel int8 weights and per-token int8 activations. Activation maxima
    come from the first forward inside the block (the calibration pass)."""
    linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    saved = {lin: lin.weight.data for lin in linears}
    act_max: dict[nn.Linear, torch.Tensor] = {}
    ready: dict[nn.Linear, torch.Tensor] = {}

    def pre_hook(lin, args):
        (x,) = args
        if lin not in ready:
            act_max[lin] = x.detach().abs().flatten(0, -2).amax(0).clamp_min(1e-5)
            w = saved[lin]
            s = (act_max[lin] / w.abs().amax(0).clamp_min(1e-5)).sqrt()
            wq, ws = reference.quantize_rows_int8(w * s)
            lin.weight.data = (wq.float() * ws[:, None]).to(w.dtype)
            ready[lin] = s
        s = ready[lin]
        xq, xs = reference.quantize_rows_int8((x / s).flatten(0, -2))
        return ((xq.float() * xs[:, None]).to(x.dtype).reshape(x.shape),)

    handles = [lin.register_forward_pre_hook(pre_hook) for lin in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for lin, w in saved.items():
            lin.weight.data = w


class Int8Linear(nn.Module):
    """SmoothQuant-style W8A8 linear on the project's fastest int8 kernel
    (:func:`splitkernels.ops.int8_linear`: per-token int8 activations, per-channel int8 weights,
    int32 accumulation). The smoothing factors divide the activations here; a deployment folds
    them into the preceding norm, so timing them is a slight charge against the baseline."""

    def __init__(self, lin: nn.Linear, smooth: torch.Tensor) -> None:
        super().__init__()
        from splitkernels.quant import quantize_weight_int8

        w_int8, w_scale = quantize_weight_int8(lin.weight.detach().float() * smooth)
        self.register_buffer("w_int8", w_int8)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("inv_smooth", (1.0 / smooth).to(lin.weight.dtype))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from splitkernels import ops

        return ops.int8_linear(x * self.inv_smooth, self.w_int8, self.w_scale, self.bias)


def w8a8_int8_model(model: nn.Module, calibration_ids: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose decoder-layer linears are :class:`Int8Linear`, smoothed with
    s_j = sqrt(max|X_j| / max|W_j|) from one forward over ``calibration_ids`` (for timing: the
    quality of this recipe is measured by :func:`w8a8`)."""
    import copy

    out = copy.deepcopy(model)
    linears = {name: m for name, m in out.named_modules() if isinstance(m, nn.Linear)
               and any(m is x for layer in decoder_layers(out) for x in layer.modules())}
    act_max: dict[str, torch.Tensor] = {}

    def hook(name):
        def run(_m, args):
            act_max[name] = args[0].detach().abs().flatten(0, -2).amax(0).clamp_min(1e-5)
        return run

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        out(calibration_ids.reshape(1, -1))
    for h in handles:
        h.remove()
    for name, lin in linears.items():
        smooth = (act_max[name].float() / lin.weight.detach().abs().amax(0).float().clamp_min(1e-5)).sqrt()
        parent = out.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], Int8Linear(lin, smooth))
    return out
