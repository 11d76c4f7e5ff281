"""Tiny random Qwen2 / Gemma3 / Llama: every linear replaced by QuantLinear (W2 g32, W3 g64, W3 g32),
fp32 activations at M = 1..6 tokens (fused path) and 24 (GEMM); logits against the same model with
each weight dequantised into a plain nn.Linear (the reference op), relative Frobenius error.

Run: python bench/results/ops/s25/families_check.py  (output: families_check.txt beside it)
"""
import copy, torch, transformers
from splitkernels.models.tiny import tiny_config
from splitkernels.nn import replace_linear
from splitkernels.nn.linear import QuantLinear


def dequantised_copy(q: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``q`` with every QuantLinear replaced by an nn.Linear holding its dequantised weight
    (fp32): the reference these checks compare against (session 27's script uses it too)."""
    ref = copy.deepcopy(q)
    for name, mod in list(ref.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, QuantLinear):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.data = child.dequantize(torch.float32)
                if child.bias is not None: lin.bias.data = child.bias.data.float()
                setattr(mod, cname, lin)
    return ref


def main() -> None:
    torch.manual_seed(0)
    for fam in ("qwen2", "gemma3_text", "llama"):
        cfg = tiny_config(fam, hidden=192)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        for bits, group in ((2, 32), (3, 64), (3, 32)):
            q = replace_linear(copy.deepcopy(model), bits=bits, group_size=group)
            ref = dequantised_copy(q)
            worst = 0.0
            for t in (1, 2, 4, 6, 24):
                ids = torch.randint(0, 128, (1, t))
                with torch.no_grad():
                    a, b = q(ids).logits.double(), ref(ids).logits.double()
                worst = max(worst, float((a - b).norm() / b.norm()))
            print(f"{fam} W{bits} g{group}: worst rel err over M = 1,2,4,6,24: {worst:.2e}")


if __name__ == "__main__":
    main()
