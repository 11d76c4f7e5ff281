"""Calibrated (GPTQ-style) weight quantisation: splitkernels.gptq and splitkernels.calibration."""
import pytest
import torch
from torch import nn

from splitkernels.calibration import calibration_rows, find_layer_stack, quantize_layers
from splitkernels.gptq import (DEFAULT_DAMP, HessianAccumulator, dense_output_target, gptq_quantize,
                               refit_group_params)
from splitkernels.models import tiny_model
from splitkernels.nn import QuantConfig, QuantLinear, replace_linear
from splitkernels.ops import reference
from splitkernels.quant import QuantizedWeight, quantize_weight, search_group_ranges


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows with strongly correlated features and a few high-energy channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)
    x = x @ mix
    x[:, torch.randperm(k, generator=g)[:3]] *= 8
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian


def output_error(x: torch.Tensor, w: torch.Tensor, qw: QuantizedWeight) -> float:
    ref = x @ w.t()
    return float((ref - x @ qw.dequantize(torch.float32).t()).norm() / ref.norm())


def assert_on_grid(qw: QuantizedWeight) -> None:
    """Every dequantised weight is code * scale + zero of its own contiguous group (FORMATS §2)."""
    codes = reference.unpack_weight_codes(qw.qweight, qw.bits, qw.in_features).float()
    assert int(codes.max()) <= 2**qw.bits - 1
    scale = qw.scale.float().repeat_interleave(qw.group_size, 1)
    zero = qw.zero.float().repeat_interleave(qw.group_size, 1)
    torch.testing.assert_close(qw.dequantize(torch.float32), codes * scale + zero, rtol=0, atol=0)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, True), (4, 32, False), (3, 64, True), (3, 64, False),
                                                  (2, 128, True), (8, 16, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, act_order):
    k, n = 256, 48
    x = correlated_inputs(2048, k, seed=bits * 1000 + group)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(group))
    rtn = output_error(x, w, quantize_weight(w, bits, group))
    gptq = output_error(x, w, gptq_quantize(w, hessian_of(x), bits, group, act_order=act_order))
    assert gptq < 0.9 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_gives_rtn(act_order):
    w = torch.randn(17, 96, generator=torch.Generator().manual_seed(3))
    got = gptq_quantize(w, torch.eye(96), 4, 32, act_order=act_order, range_search=False)
    want = quantize_weight(w, 4, 32)
    assert torch.equal(got.qweight, want.qweight)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_with_range_search_rounds_on_searched_ranges(act_order):
    """With H = I (no error feedback, equal weights) the codes are round-to-nearest on the scales
    and zeros of the unweighted range search."""
    w = torch.randn(13, 96, generator=torch.Generator().manual_seed(4))
    got = gptq_quantize(w, 2.5 * torch.eye(96), 3, 32, act_order=act_order)
    scale, zero = search_group_ranges(w, 3, 32)
    assert torch.equal(got.scale, scale) and torch.equal(got.zero, zero)
    codes = torch.clamp(torch.round((w - zero.repeat_interleave(32, 1)) / scale.repeat_interleave(32, 1)), 0, 7)
    assert torch.equal(got.qweight, reference.pack_weight_codes(codes.to(torch.uint8), 3))


def test_range_search_picks_the_grid_optimum():
    """Each group's (lower, upper) factors are the weighted-error minimum over the grid, found
    here by trying every pair for every group in plain Python."""
    g = torch.Generator().manual_seed(8)
    n, k, group, bits = 3, 12, 4, 2
    w = torch.randn(n, k, generator=g)
    w[0, :4] += 3.0  # an all-positive group: shrinking its lower end widens the range
    importance = torch.rand(k, generator=g) * 10
    grid = (1.0, 0.9, 0.75, 0.6)
    scale, zero = search_group_ranges(w, bits, group, importance=importance, grid=grid)
    for r in range(n):
        for gi in range(k // group):
            cols = slice(gi * group, (gi + 1) * group)
            v, imp = w[r, cols].tolist(), importance[cols].tolist()
            best = None
            for a in grid:
                for b in grid:
                    lo, hi = min(v) * a, max(v) * b
                    s = (hi - lo) / (2**bits - 1)
                    deq = [min(max(round((x - lo) / s), 0), 2**bits - 1) * s + lo for x in v]
                    err = sum(i * (x - d) ** 2 for i, x, d in zip(imp, v, deq))
                    if best is None or err < best[0] - 1e-9:
                        best = (err, s, lo)
            assert abs(float(scale[r, gi]) - best[1]) < 1e-5 and abs(float(zero[r, gi]) - best[2]) < 1e-5, (r, gi)
    # The search never does worse than min/max (1.0 is on the grid), and keeps an exact group exact.
    plain = quantize_weight(w, bits, group)
    deq = (torch.round((w - zero.repeat_interleave(group, 1)) / scale.repeat_interleave(group, 1))
           .clamp(0, 2**bits - 1) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1))
    weighted = lambda d: ((d - w) ** 2 * importance).reshape(n, -1, group).sum(-1)  # noqa: E731
    assert bool((weighted(deq) <= weighted(plain.dequantize(torch.float32)) + 1e-6).all())
    exact = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 2]) * 0.5 - 0.7
    s, z = search_group_ranges(exact, 2, 4)
    assert torch.equal(s, torch.full((1, 2), 0.5)) and torch.allclose(z, torch.full((1, 2), -0.7))


def test_refit_is_the_per_row_least_squares_fit():
    """With the codes kept, each row's scales and zeros solve min (w - w^) H (w - w^)^T: checked
    against a dense least-squares solve of the same problem (Cholesky-whitened) row by row."""
    g = torch.Generator().manual_seed(21)
    n, k, group, bits = 5, 48, 16, 3
    x = correlated_inputs(512, k, seed=21)
    h = hessian_of(x).double() + 1e-3 * torch.eye(k, dtype=torch.float64)
    w = torch.randn(n, k, generator=g)
    qw = gptq_quantize(w, h.float(), bits, group)
    codes = reference.unpack_weight_codes(qw.qweight, bits, k)
    scale, zero = refit_group_params(w, codes, h, qw.scale, qw.zero, group)
    chol = torch.linalg.cholesky(h)  # (w - A t) H (w - A t)^T = ||L^T (w - A t)||^2
    ones = torch.zeros(k, k // group, dtype=torch.float64)
    ones[torch.arange(k), torch.arange(k) // group] = 1
    for r in range(n):
        a = torch.cat([codes[r].double()[:, None] * ones, ones], 1)
        want = torch.linalg.lstsq(chol.t() @ a, chol.t() @ w[r].double()).solution
        torch.testing.assert_close(scale[r].double(), want[: k // group], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(zero[r].double(), want[k // group:], rtol=1e-4, atol=1e-6)

    def output_error(s, z):
        d = (codes.float() * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1) - w).double()
        return float(((d @ h) * d).sum())

    assert output_error(scale, zero) < output_error(qw.scale, qw.zero)
    # gptq_quantize refits on the Hessian it used: damped by DEFAULT_DAMP times its mean diagonal.
    refitted = gptq_quantize(w, h.float(), bits, group, refit=True)
    assert torch.equal(refitted.qweight, qw.qweight)
    damped = h + DEFAULT_DAMP * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    want_scale, want_zero = refit_group_params(w, codes, damped, qw.scale, qw.zero, group)
    torch.testing.assert_close(refitted.scale, want_scale, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(refitted.zero, want_zero, rtol=1e-4, atol=1e-6)
    # Codes all equal in a group leave its scale free: the row keeps a positive, finite fit.
    flat = codes.clone()
    flat[:, :group] = 2
    s, z = refit_group_params(w, flat, h, qw.scale, qw.zero, group)
    assert bool((s > 0).all()) and torch.isfinite(z).all()


def test_range_search_half_precision_and_tiny_ranges():
    """Scales are stored in the requested dtype and stay positive where a group's range is below
    that dtype's resolution (codes stay finite)."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    w[1, :32] *= 1e-9
    scale, zero = search_group_ranges(w, 3, 32, dtype=torch.float16)
    assert scale.dtype == zero.dtype == torch.float16 and bool((scale > 0).all())
    qw = gptq_quantize(w, hessian_of(correlated_inputs(256, 64, seed=9)), 3, 32, dtype=torch.float16)
    assert torch.isfinite(qw.dequantize(torch.float32)).all()
    assert_on_grid(qw)


def test_range_search_bad_arguments():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="importance must be"):
        search_group_ranges(w, 4, 16, importance=torch.ones(31))
    with pytest.raises(ValueError, match="importance must be"):
        search_group_ranges(w, 4, 16, importance=-torch.ones(32))
    with pytest.raises(ValueError, match="grid must be"):
        search_group_ranges(w, 4, 16, grid=(1.0, 0.0))
    with pytest.raises(ValueError, match="group_size"):
        search_group_ranges(w, 4, 12)


@pytest.mark.parametrize("n,k,group,bits", [(1, 8, 8, 4), (5, 24, 8, 3), (7, 200, 40, 4), (3, 136, 136, 2),
                                            (9, 300, 20, 8)])
@pytest.mark.parametrize("act_order", [True, False])
def test_packed_format_and_odd_shapes(n, k, group, bits, act_order):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g)
    qw = gptq_quantize(w, hessian_of(correlated_inputs(64, k, seed=k)), bits, group, act_order=act_order)
    assert qw.qweight.shape == (n, reference.packed_words(k, bits)) and qw.qweight.dtype == torch.int32
    assert qw.scale.shape == qw.zero.shape == (n, k // group)
    assert_on_grid(qw)
    again = QuantizedWeight.from_state_dict(qw.state_dict())
    assert torch.equal(again.dequantize(), qw.dequantize())
    # The layer computes with exactly this weight.
    layer = QuantLinear.from_quantized(qw)
    x = torch.randn(3, k, generator=g)
    ref = x.double() @ qw.dequantize().double().t()
    # The kernels' stated fp32 tolerance: relative Frobenius error against float64.
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_half_precision_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    qw = gptq_quantize(w, hessian_of(correlated_inputs(256, 64, seed=1)), 4, 32, dtype=torch.float16)
    assert qw.scale.dtype == qw.zero.dtype == torch.float16
    assert_on_grid(qw)


def test_singular_hessian_is_damped():
    k = 64
    x = correlated_inputs(16, k, seed=5)  # rank <= 16 < K
    x[:, :4] = 0  # dead inputs: a zero row and column in H
    h = hessian_of(x)
    assert torch.linalg.matrix_rank(h.double()) < k
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(5))
    qw = gptq_quantize(w, h, 4, 16)
    assert torch.isfinite(qw.dequantize()).all()
    assert_on_grid(qw)
    assert output_error(x, w, qw) < output_error(x, w, quantize_weight(w, 4, 16))
    # An all-zero Hessian (no data reached the layer) is plain rounding.
    assert torch.equal(gptq_quantize(w, torch.zeros(k, k), 4, 16, range_search=False).qweight,
                       quantize_weight(w, 4, 16).qweight)


def test_bad_arguments():
    w, h = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, torch.eye(16), 4, 16)
    with pytest.raises(ValueError, match="hessian must be finite"):
        gptq_quantize(w, torch.full((32, 32), float("nan")), 4, 16)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, 4, 16, damp=0.0)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, 4, 12)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, h, 5, 16)
    with pytest.raises(ValueError, match="hessian is not positive definite"):
        gptq_quantize(w, -torch.eye(32), 4, 16)


def test_config_method():
    assert QuantConfig().method == "rtn"
    config = QuantConfig(3, 64, method="gptq")
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({"bits": 4, "group_size": 64, "clip_search": False}).method == "rtn"
    assert str(config) == "3-bit g64 gptq"
    with pytest.raises(ValueError, match="method must be one of"):
        QuantConfig(method="awq")


def test_calibration_rows():
    assert calibration_rows(torch.arange(1030), seq_len=512).shape == (2, 512)
    assert calibration_rows(torch.arange(100), seq_len=512).shape == (1, 100)
    assert calibration_rows(torch.zeros(3, 7, dtype=torch.int32)).dtype == torch.int64
    with pytest.raises(TypeError, match="calibration must be"):
        calibration_rows(torch.zeros(10))
    with pytest.raises(ValueError, match="calibration must be"):
        calibration_rows(torch.zeros(1, 1, 1, dtype=torch.long))


def layer_inputs(model: nn.Module, ids: torch.Tensor, kind: type = QuantLinear) -> dict[str, torch.Tensor]:
    """Input of every ``kind`` linear of the model's layers on ``ids`` (as the model runs now)."""
    seen, handles = {}, []

    def hook(name):
        def record(_module, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
        return record

    for name, module in model.named_modules():
        if isinstance(module, kind) and ".layers." in f".{name}":
            handles.append(module.register_forward_pre_hook(hook(name)))
    model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def sliding_qwen2() -> nn.Module:
    """Qwen2 whose second layer attends through a sliding window: its mask differs from the first's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: tiny_model("llama", num_layers=2), sliding_qwen2], ids=["llama", "qwen2-sliding"])
def test_sequential_calibration_matches_per_layer_gptq(make):
    """Each linear is GPTQ, on the inputs it sees with every earlier linear quantised, of the weight
    whose outputs there best match the dense model's (with each layer's own mask: the second Qwen2
    layer uses a sliding window)."""
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 256, (2, 40))
    calibrated = replace_linear(make(), 4, 16, method="gptq", calibration=ids, progress=False)
    inputs = layer_inputs(calibrated, ids)  # inputs to each quantised linear in the calibrated model
    with torch.no_grad():
        dense_inputs = layer_inputs(model, ids, nn.Linear)
    assert dense_inputs.keys() == inputs.keys()
    for name, module in calibrated.named_modules():
        if isinstance(module, QuantLinear):
            w = model.get_submodule(name).weight.detach()
            acc = HessianAccumulator(w.shape[1])
            acc.add(inputs[name], dense_inputs[name])
            if name.startswith("model.layers.0.self_attn.") and not name.endswith("o_proj"):
                assert float(acc.cross.abs().max()) == 0  # nothing before them is quantised
            else:
                assert float(acc.cross.abs().max()) > 0
            want = gptq_quantize(dense_output_target(w, acc.hessian, acc.cross), acc.hessian, 4, 16)
            # The sums are formed in another order in the calibration run; the result is the same up
            # to their float rounding (which moves W' and so each group's range by a little).
            for got, expected in ((module.scale, want.scale), (module.zero, want.zero)):
                assert float(((got - expected).abs() / want.scale).max()) < 0.05, name  # of one step
            codes = [reference.unpack_weight_codes(q, 4, w.shape[1]) for q in (module.qweight, want.qweight)]
            assert (codes[0] != codes[1]).float().mean() < 0.05, name  # error feedback spreads the flips


def test_dense_output_target():
    """W' minimises ||X W'^T - X_ref W^T|| (least squares): the residual is orthogonal to X, W' = W
    when X = X_ref, and GPTQ of W' beats GPTQ of W on the dense outputs."""
    g = torch.Generator().manual_seed(11)
    k, n = 64, 24
    x_ref = correlated_inputs(4096, k, seed=4)
    x = x_ref + 0.2 * torch.randn(x_ref.shape, generator=g) * x_ref.std(0)  # what quantised earlier layers give
    w = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k)
    for rows in (slice(0, 1000), slice(1000, 4096)):  # summed over batches
        acc.add(x[rows], x_ref[rows])
    target = dense_output_target(w, acc.hessian, acc.cross, damp=1e-6)

    def misfit(v):  # the least-squares objective
        return float((x.double() @ v.double().t() - x_ref.double() @ w.double().t()).norm())

    best = torch.linalg.lstsq(x.double(), x_ref.double() @ w.double().t()).solution.t()
    assert misfit(target) < 1.001 * misfit(best) < 0.6 * misfit(w)
    same = HessianAccumulator(k)
    same.add(x_ref, x_ref)
    torch.testing.assert_close(dense_output_target(w, same.hessian, same.cross), w, rtol=0, atol=0)

    ref = x_ref @ w.t()

    def error(qw):
        return float((x @ qw.dequantize(torch.float32).t() - ref).norm() / ref.norm())

    plain = error(gptq_quantize(w, acc.hessian, 4, 16))
    matched = error(gptq_quantize(target, acc.hessian, 4, 16))
    assert matched < 0.8 * plain, (matched, plain)
    with pytest.raises(ValueError, match="reference must be given with every batch"):
        acc.add(x[:4])
    with pytest.raises(ValueError, match="cross must be"):
        dense_output_target(w, acc.hessian, acc.cross[:3])


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@torch.no_grad()
def test_calibrated_model_beats_rtn(family):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (16, 64))
    held_out = torch.randint(0, 256, (4, 64))
    dense = tiny_model(family)
    rtn = replace_linear(tiny_model(family), 4, 16, progress=False)
    gptq = replace_linear(tiny_model(family), 4, 16, method="gptq", calibration=ids, progress=False)
    ref = dense(held_out).logits
    err = {name: float((m(held_out).logits - ref).norm()) for name, m in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.9 * err["rtn"], err
    heads = [n for n, m in gptq.named_modules() if isinstance(m, QuantLinear)]
    assert heads and all(not n.endswith(("lm_head",)) for n in heads)


def test_replace_linear_calibration_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration token ids are required"):
        replace_linear(model, 4, 16, method="gptq", progress=False)
    with pytest.raises(ValueError, match="outside the decoder layers"):
        replace_linear(model, 4, 16, overrides={"lm_head": QuantConfig(4, 16, method="gptq")},
                       calibration=torch.randint(0, 256, (1, 16)), progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        replace_linear(model, 4, 16, method="hqq", progress=False)


def test_quantize_layers_plan_checks_and_find_layer_stack():
    model = tiny_model("llama")
    name, layers = find_layer_stack(model)
    assert name == "model.layers" and len(layers) == 4
    ids = torch.randint(0, 256, (1, 16))
    with pytest.raises(ValueError, match="layer index 9"):
        quantize_layers(model, layers, {9: {"mlp.down_proj": QuantConfig()}}, ids, progress=False)
    with pytest.raises(TypeError, match="not a linear layer"):
        quantize_layers(model, layers, {0: {"mlp": QuantConfig()}}, ids, progress=False)
    with pytest.raises(ValueError, match="stack of layers"):
        find_layer_stack(nn.Sequential(nn.Linear(4, 4)))


def test_split_model_calibrates_the_front():
    """split_model(..., calibration=ids) quantises a gptq front exactly as apply_opsc does."""
    from splitkernels.opsc import apply_opsc
    from splitkernels.runtime import SplitConfig, split_model

    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(5))
    front = QuantConfig(4, 16, method="gptq")
    want = tiny_model("llama")
    apply_opsc(want, 2, front, None, calibration=ids, progress=False)
    sm = split_model(tiny_model("llama"), SplitConfig(2, front=front), calibration=ids)
    got = {n: m.dequantize() for n, m in sm.model.named_modules() if isinstance(m, QuantLinear)}
    expected = {n: m.dequantize() for n, m in want.named_modules() if isinstance(m, QuantLinear)}
    assert got.keys() == expected.keys() and len(got) == 14  # 7 linears in each of the 2 front layers
    assert all(torch.equal(got[n], expected[n]) for n in got)
    with pytest.raises(ValueError, match="calibration token ids are required"):
        split_model(tiny_model("llama"), SplitConfig(2, front=front))


def test_cli_gptq_front(tmp_path):
    import contextlib
    import io
    import json

    from splitkernels.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text("Some calibration text, a few hundred bytes of it. " * 12, encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--model", "tiny", "--max-new-tokens", "2", "--eval-tokens", "24", "--front-bits", "4",
                     "--front-method", "gptq", "--calibration", str(text), "--calibration-tokens", "300",
                     "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["opsc"]["front"] == {"bits": 4, "group_size": 64, "clip_search": False, "method": "gptq"}
    for argv, message in ((["--front-method", "gptq"], "--front-method gptq needs --front-bits"),
                          (["--front-bits", "4", "--front-method", "gptq", "--eval-tokens", "20000"],
                           "would score the default calibration text"),
                          (["--front-bits", "4", "--front-method", "gptq", "--calibration", str(tmp_path / "none")],
                           "cannot read the calibration text")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["demo", "--model", "tiny", "--max-new-tokens", "1", *argv]) != 0
        assert message in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
