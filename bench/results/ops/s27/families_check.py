"""Tiny random Qwen2 / Gemma3 / Llama, 2 layers of width 2048 (MLP 4096: the down projection's rows
are 1.5-4 KiB, the long-row paths of session 27): every linear replaced by QuantLinear (W3 g128,
W4 g128, W8 g64), fp32 activations at M = 1..4 tokens, exact ("highest") and rounded to bf16
("medium", the bf16 dot form); logits against the same model with each weight dequantised into a
plain nn.Linear at "highest", relative Frobenius error.

Run: python bench/results/ops/s27/families_check.py  (output: families_check.txt beside it)
Other token counts: python bench/results/ops/s27/families_check.py 7 16 64  (session 28: the bf16
panel form's 64-row blocks, output ../s28/families_check_prefill.txt)
"""
import copy, importlib.util, pathlib, sys, torch, transformers
from splitkernels.models.tiny import tiny_config
from splitkernels.nn import replace_linear

# The dequantised reference model, from session 25's check (one copy of that loop).
_spec = importlib.util.spec_from_file_location(
    "s25_families_check", pathlib.Path(__file__).resolve().parents[1] / "s25" / "families_check.py")
_s25 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_s25)
tokens = [int(t) for t in sys.argv[1:]] or [1, 2, 3, 4]
torch.manual_seed(0)
for fam in ("qwen2", "gemma3_text", "llama"):
    cfg = tiny_config(fam, num_layers=2, hidden=2048, heads=16)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for bits, group in ((3, 128), (4, 128), (8, 64)):
        q = replace_linear(copy.deepcopy(model), bits=bits, group_size=group)
        ref = _s25.dequantised_copy(q)
        worst = {"highest": 0.0, "medium": 0.0}
        for t in tokens:
            ids = torch.randint(0, 128, (1, t))
            with torch.no_grad():
                b = ref(ids).logits.double()
                for precision in worst:
                    torch.set_float32_matmul_precision(precision)
                    a = q(ids).logits.double()
                    torch.set_float32_matmul_precision("highest")
                    worst[precision] = max(worst[precision], float((a - b).norm() / b.norm()))
        print(f"{fam} W{bits} g{group}: worst rel err over M = {', '.join(map(str, tokens))}: exact fp32 {worst['highest']:.2e}, "
              f"bf16-rounded {worst['medium']:.2e}", flush=True)
