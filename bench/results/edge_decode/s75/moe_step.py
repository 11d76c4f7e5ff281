"""One decode step at OLMoE-1B-7B's layer shape (hidden 2048, 16 heads, 64 experts of width 1024,
top 8; random fp32 weights): the model's own forward against the native step, median of 10 steps
after 4, at 1 and 2 threads. Usage: python moe_step.py [LAYERS (2)]"""
import statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from transformers import DynamicCache, OlmoeConfig, OlmoeForCausalLM
import splitkernels._C as _C
from splitkernels.fastpath import NativeDecoder
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
cfg = OlmoeConfig(vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)
torch.manual_seed(0)
model = OlmoeForCausalLM(cfg).eval()
ids = torch.randint(0, 1024, (1, 32))
for threads in (1, 2):
    torch.set_num_threads(threads); _C.set_num_threads(threads)
    dec = NativeDecoder(model, 0, layers)
    times = {"native": [], "eager": []}
    with torch.inference_mode():
        ref = DynamicCache(config=cfg); model(input_ids=ids, cache=ref, use_cache=True)
        fast = dec.new_cache(lambda: DynamicCache(config=cfg)); model(input_ids=ids, cache=fast.dynamic(), use_cache=True)
        for step in range(14):
            tok = torch.randint(0, 1024, (1, 1))
            t0 = time.perf_counter(); out = model.model(input_ids=tok, cache=ref, use_cache=True); t1 = time.perf_counter()
            h, _ = dec.step(model.model.embed_tokens(tok)[0, 0], fast); t2 = time.perf_counter()
            if step >= 4:
                times["eager"].append(t1 - t0); times["native"].append(t2 - t1)
    print(f"{threads} thread(s): eager {statistics.median(times['eager'])*1e3:.2f} ms, native {statistics.median(times['native'])*1e3:.2f} ms a token ({layers} layers)")
