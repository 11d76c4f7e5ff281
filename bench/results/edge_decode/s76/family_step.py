"""One decode step of a few decoder layers at a real model's shape (random weights, the layers'
linears 4-bit group 128 as OPSC stores them): the model's own forward against the native step,
medians of 18 steps each (three blocks of 8 steps per path in turn, the first two of a block
warm-up), at 1 and 2 threads (python_tests/test_fastpath.py checks that the two agree).
Usage: python family_step.py pythia|persimmon|opt [LAYERS (2)]"""
import statistics
import sys
import time
import warnings

warnings.simplefilter("ignore")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GPTNeoXConfig, OPTConfig, PersimmonConfig  # noqa: E402

import splitkernels._C as _C  # noqa: E402
from splitkernels.fastpath import NativeDecoder  # noqa: E402
from splitkernels.nn import replace_linear  # noqa: E402

SHAPES = {  # Pythia-1.4B's, Persimmon-8B's and OPT-1.3B's layers
    "pythia": lambda n: GPTNeoXConfig(vocab_size=1024, hidden_size=2048, intermediate_size=8192, num_hidden_layers=n,
                                      num_attention_heads=16, rotary_pct=0.25, use_parallel_residual=True),
    "persimmon": lambda n: PersimmonConfig(vocab_size=1024, hidden_size=4096, intermediate_size=16384,
                                           num_hidden_layers=n, num_attention_heads=64, qk_layernorm=True),
    "opt": lambda n: OPTConfig(vocab_size=1024, hidden_size=2048, ffn_dim=8192, num_hidden_layers=n,
                               num_attention_heads=32, word_embed_proj_dim=2048),
}
name, layers = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
cfg = SHAPES[name](layers)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
replace_linear(model, bits=4, group_size=128, progress=False)  # the LM head stays dense
embed = model.get_input_embeddings()
ids = torch.randint(0, 1024, (1, 32))
for threads in (1, 2):
    torch.set_num_threads(threads)
    _C.set_num_threads(threads)
    dec = NativeDecoder(model, 0, layers)
    times = {"native": [], "eager": []}
    with torch.inference_mode():
        ref = model.get_decoder()(input_ids=ids, use_cache=True).past_key_values
        fast = dec.new_cache(lambda: type(ref)(config=cfg))
        model.get_decoder()(input_ids=ids, cache=fast.dynamic(), use_cache=True)
        # Blocks of steps, each path in turn: the first steps of a block are warm-up (torch's
        # OpenMP workers spin for a while after the eager forward and would take a core from the
        # native step's threads right after it).
        for _ in range(3):
            for path in ("eager", "native"):
                for step in range(8):
                    tok = torch.randint(0, 1024, (1, 1))
                    t0 = time.perf_counter()
                    if path == "eager":
                        model.get_decoder()(input_ids=tok, cache=ref, use_cache=True)
                    else:
                        dec.step(embed(tok)[0, 0], fast)
                    if step >= 2:
                        times[path].append(time.perf_counter() - t0)
    print(f"{name} {threads} thread(s): eager {statistics.median(times['eager']) * 1e3:.2f} ms, native "
          f"{statistics.median(times['native']) * 1e3:.2f} ms a token ({layers} layers)")
