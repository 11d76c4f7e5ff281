"""Per-token decode cost of a model (SmolLM2-135M by default, ``--model``: another packaged
model or a GGUF file): llama.cpp beside our native fast path and the eager path, on the same
GGUF file, the same threads, in one run.

Rows, each at 1 and 2 threads (or ``--threads``), for a model of L decoder layers:

* whole model, one token through every layer and the LM head:
  llama.cpp (``llama-cpp-python``, the GGUF as shipped: ``Llama.eval`` of one token);
  ours fast (embedding, L native layers at 4 bits g32, W8A8 int8 head with the fused argmax);
  ours eager (the model's own forward with a DynamicCache, ``replace_linear(bits=4, g32)``).
* edge: the split's edge segment, embedding + layers 1..L-1 at 4 bits (fast and eager).
* server: layer L (dense fp32) + final norm + LM head + greedy token (fast: the W8A8 int8
  head with the exact fused argmax; eager: the model's own forward and ``argmax``), and the
  fast path sampling (temperature 0.8, top-k 50, top-p 0.95) from the head's fused exact top 50.

Besides the wall-clock median (the figure the checks use), each row reports the median CPU
time of the process per step (all its threads): on a machine shared with other jobs a thread
may wait for a core, which wall time counts and CPU time does not.

Every row prefills the same 32-token prompt and then decodes ``--steps`` tokens, the rows
taking turns round by round (background load on a shared machine hits them alike); the
figure is the median step. The run also checks that greedy generation of the split
(``split_model``, fast path) equals the eager split's token for token.

Our 4-bit weights keep fp32 scales and zeros per group of 32 (0.75 bytes per weight), or with
``--scale-dtype float16`` fp16 ones (0.625 bytes per weight, as SmolLM2's Q4_1); Q4_0 keeps one
fp16 scale (0.5625), Q4_K_M files (Gemma 3, Qwen2.5-Coder) mix 4.5- to 8.5-bit blocks.
``bench/make_gguf.py`` writes a GGUF of a few Llama, Qwen 3, Gemma 2, StableLM 2, GPT-2 or
BLOOM layers at any shape (random weights).

llama.cpp is an optional dependency (``pip install '.[bench]'`` installs llama-cpp-python; it
may compile llama.cpp). Without it the llama.cpp rows are left out and the report says so.

Usage: python bench/edge_decode.py --out DIR [--model smollm2|qwen2.5-coder|FILE.gguf] [--threads 1,2]
       [--steps 48] [--rounds 5] [--greedy-tokens 24] [--scale-dtype float16] [--isa avx2]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (bench/timing.py)

import splitkernels._C as _C  # noqa: E402
from splitkernels.fastpath import NativeDecoder  # noqa: E402
from splitkernels.models import PACKAGED, adapter_for, load_model, packaged_available  # noqa: E402
from splitkernels.models.layout import find_decoder_layers  # noqa: E402
from splitkernels.nn import QuantConfig, replace_linear  # noqa: E402
from splitkernels.nn.config import SCALE_DTYPES  # noqa: E402
from splitkernels.runtime import SplitConfig, split_model  # noqa: E402
from splitkernels.runtime.protocol import SamplingParams  # noqa: E402
from splitkernels.runtime.sampling import make_generator  # noqa: E402
from splitkernels.runtime.segments import Edge, Server  # noqa: E402

PROMPT_TOKENS = 32
GREEDY = SamplingParams(False, 1.0, 0, 1.0, None)
TOP_K = SamplingParams(True, 0.8, 50, 0.95, 0)
SAMPLED = "ours fast, top-50 sampling"  # the native head's fused top k, then the sampler


def gguf_file(model: str) -> Path:
    """The GGUF file of ``model``: a packaged model's (joined from its chunks if it ships so), or
    the path itself."""
    if model not in PACKAGED:
        return Path(model)
    spec = PACKAGED[model]
    return spec.gguf(Path(importlib.util.find_spec(spec.package).submodule_search_locations[0]))


def part_names(layers: int) -> tuple[str, str, str]:
    """The whole model, the edge (layers 1..L-1) and the server (layer L + head) of an L-layer model."""
    return "whole model", f"edge: layers 1-{layers - 1}", f"server: layer {layers} + head"


class Row:
    """One decode path: ``reset()`` prefills the prompt, ``step(token)`` decodes one token."""

    def __init__(self, name: str, reset, step) -> None:
        self.name, self.reset, self.step = name, reset, step


def llama_cpp_row(path: Path, threads: int, prompt: list[int]) -> Row:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def reset():
        llm.reset()
        llm.eval(prompt)

    return Row("llama.cpp", reset, lambda tok: llm.eval([tok]))


def whole_rows(model_q, prompt: torch.Tensor) -> list[Row]:
    fast = NativeDecoder(model_q, 0, model_q.config.num_hidden_layers, head="int8")
    state: dict = {}

    def reset_fast():
        state["fast"] = fast.new_cache(lambda: adapter_for(model_q).new_cache(0, model_q.config.num_hidden_layers))
        with torch.inference_mode():
            model_q(input_ids=prompt, cache=state["fast"].dynamic(), use_cache=True)

    def step_fast(tok: int):
        with torch.inference_mode():
            return fast.step(fast.embed(torch.tensor([tok]), state["fast"].length)[0], state["fast"])[1]

    def reset_eager():
        state["eager"] = adapter_for(model_q).new_cache(0, model_q.config.num_hidden_layers)
        with torch.inference_mode():
            model_q(input_ids=prompt, cache=state["eager"], use_cache=True)

    def step_eager(tok: int):
        with torch.inference_mode():
            logits = model_q(input_ids=torch.tensor([[tok]]), cache=state["eager"], use_cache=True,
                             logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    return [Row("ours fast", reset_fast, step_fast), Row("ours eager", reset_eager, step_eager)]


def segment_rows(kind: str, segments: dict[str, object], prompt_input: torch.Tensor,
                 sampling: dict[str, SamplingParams] | None = None) -> list[Row]:
    """Rows of an Edge (input: token ids) or a Server (input: split-layer hidden states; each
    server row picks its token with ``sampling[name]``, greedy by default)."""
    rows = []
    for name, seg in segments.items():
        state: dict = {}
        params = (sampling or {}).get(name, GREEDY)
        generator = make_generator(params)

        def reset(seg=seg, state=state):
            state["cache"] = seg.new_decode_cache()
            state["pos"] = 0
            with torch.inference_mode():
                if kind == "edge":
                    seg.forward(prompt_input, state["cache"], 0)
                else:
                    seg.next_token(prompt_input, state["cache"], 0, params, generator)
            state["pos"] = prompt_input.shape[-2 if kind == "server" else -1]
            state["h"] = torch.randn(1, prompt_input.shape[-1]) if kind == "server" else None

        def step(tok: int, seg=seg, state=state):
            with torch.inference_mode():
                if kind == "edge":
                    out = seg.forward(torch.tensor([[tok]]), state["cache"], state["pos"])
                else:
                    out = seg.next_token(state["h"], state["cache"], state["pos"], params, generator)
            state["pos"] += 1
            return out

        rows.append(Row(name, reset, step))
    return rows


def measure(rows: list[Row], steps: int, rounds: int, tokens: list[int]) -> dict[str, dict]:
    """Median seconds per decode step of each row, rows taking turns round by round."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    cpu: dict[str, list[float]] = {r.name: [] for r in rows}
    for rnd in range(rounds + 1):  # round 0 is the warm-up
        for r in rows:
            r.reset()
            for s in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                r.step(tokens[s % len(tokens)])
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rnd:
                    times[r.name].append(dt)
                    cpu[r.name].append(dc)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                "cpu_median_ms": 1e3 * statistics.median(cpu[k]), "steps": len(v)} for k, v in times.items()}


def greedy_check(model, tok, tokens: int) -> dict:
    """Greedy split generation (edge layers 1..L-1 at 4 bits) on the fast path against the eager
    split; quantises ``model`` in place."""
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    split = model.config.num_hidden_layers - 1
    config = SplitConfig(split, front=QuantConfig(bits=4, group_size=32))
    fast = split_model(model, config)
    out_fast = fast.generate(ids, tokens)
    fast.close()
    eager = split_model(model, SplitConfig(split), fast=False)  # the model is already quantised in place
    out_eager = eager.generate(ids, tokens)
    eager.close()
    return {"tokens": tokens, "identical": bool(torch.equal(out_fast, out_eager)),
            "fast": out_fast[0, ids.shape[1]:].tolist(), "eager": out_eager[0, ids.shape[1]:].tolist()}


def table(result: dict) -> str:
    layers = result["layers"]
    whole, edge, _ = part_names(layers)
    part_layers = {whole: layers, edge: layers - 1}  # decoder layers per part
    lines = [f"# Edge decode: {result['model']}, llama.cpp vs ours ({result['machine']['time_utc']} UTC)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} logical CPUs "
             f"(shared with other jobs; load average at start {result['machine']['loadavg_start'][0]:.1f}), "
             f"our kernels built for {result['machine'].get('kernel_isa')}. "
             f"Median of {result['rounds']} rounds x {result['steps']} decode steps after a "
             f"{PROMPT_TOKENS}-token prompt; all rows in one run, taking turns. Our 4-bit layers: groups of "
             f"32, scales and zeros in {result['scale_dtype']}.", ""]
    if result["llama_cpp"] is not None:
        lines += [f"llama.cpp: llama-cpp-python {result['llama_cpp']}, file {result['gguf']}", ""]
    else:
        lines += ["**llama.cpp rows missing: llama-cpp-python is not installed** (`pip install '.[bench]'`).", ""]
    lines += ["| threads | part | path | ms/token | tok/s | CPU ms/token | ms/layer |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        per_layer = r["median_ms"] / part_layers[r["part"]] if r["part"] in part_layers else None
        lines.append(f"| {r['threads']} | {r['part']} | {r['path']} | {r['median_ms']:.2f} | "
                     f"{1e3 / r['median_ms']:.1f} | {r['cpu_median_ms']:.2f} | "
                     f"{'-' if per_layer is None else f'{per_layer:.3f}'} |")
    lines += ["", "ms/layer: the part's time over its decoder layers (the whole model's share includes the "
              "embedding and the head; the server rows are one layer plus the head).", ""]
    lines += ["", "## Done-when checks", ""]
    for c in result["checks"]:
        lines.append(f"* {c['what']}: {c['value']} -> **{'met' if c['met'] else 'NOT met'}**")
    g = result["greedy"]
    lines += [f"* greedy split output, fast vs eager ({g['tokens']} tokens): "
              f"**{'identical' if g['identical'] else 'DIFFERENT'}**", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for edge_decode.json / .md")
    ap.add_argument("--model", default="smollm2",
                    help=f"{', '.join(PACKAGED)} (packaged) or the path of a .gguf file (default smollm2)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--greedy-tokens", type=int, default=24)
    ap.add_argument("--scale-dtype", choices=tuple(SCALE_DTYPES), default=None,
                    help="dtype of our 4-bit layers' scales and zeros (default: the model's)")
    ap.add_argument("--isa", choices=_C.lowbit_isas(), default=None,
                    help="run our kernels as built for this instruction set, e.g. avx2 on an AVX-512 machine "
                         "(default: the CPU's best)")
    args = ap.parse_args()
    if args.isa is not None:
        _C.set_lowbit_isa(args.isa)
    if args.model in PACKAGED and not packaged_available(args.model):
        sys.exit(f"{PACKAGED[args.model].name} is not installed: {PACKAGED[args.model].install}")
    if args.model not in PACKAGED and not (Path(args.model).is_file() and args.model.endswith(".gguf")):
        sys.exit(f"--model must be one of {list(PACKAGED)} or an existing .gguf file, got {args.model!r}")
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
        print("llama-cpp-python is not installed (pip install '.[bench]'): the llama.cpp rows are left out",
              file=sys.stderr)
    threads = [int(t) for t in args.threads.split(",")]

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = model.config.num_hidden_layers
    split_at = layers - 1
    whole, edge, server = part_names(layers)
    prompt = tokenizer("Once upon a time, in a small village by the sea, there lived an old fisherman who "
                       "told stories to every child that", return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    tokens = torch.randint(0, model.config.vocab_size, (args.steps,), generator=torch.Generator().manual_seed(0)).tolist()
    model_q = copy.deepcopy(model)
    replace_linear(model_q, bits=4, group_size=32, progress=False, scale_dtype=args.scale_dtype)
    # The split: edge layers 1..L-1 at 4 bits, server layer L dense (as the demo's --front-bits 4).
    split = copy.deepcopy(model)
    front = f"{find_decoder_layers(split)[0]}."  # model.layers. (transformer.h. in GPT-2)
    replace_linear(split, bits=4, group_size=32, filter=lambda name, m: name.startswith(front) and
                   int(name.removeprefix(front).split(".")[0]) < split_at, progress=False,
                   scale_dtype=args.scale_dtype)
    adapter = adapter_for(split)
    edges = {"ours fast": Edge(adapter, split_at), "ours eager": Edge(adapter, split_at, fast=False)}
    servers = {"ours fast": Server(adapter, split_at), "ours eager": Server(adapter, split_at, fast=False)}
    servers[SAMPLED] = servers["ours fast"]
    for segment in (edges["ours fast"], servers["ours fast"]):
        if not segment.fast:
            sys.exit(f"this bench times the native fast path, which does not cover {loaded.name}: "
                     f"{segment.fast_reason}")
    with torch.inference_mode():
        split_hidden = edges["ours eager"].forward(prompt, edges["ours eager"].new_cache(), 0)

    result, _ = timing.new_result("cpp")
    # The GGUF file only for llama.cpp's rows (a chunked package joins it, 0.5 GB, on request).
    gguf = gguf_file(args.model) if llama_version is not None else None
    result.update(model=loaded.name, layers=layers, gguf=None if gguf is None else gguf.name,
                  scale_dtype=args.scale_dtype or str(model.dtype).removeprefix("torch."), steps=args.steps,
                  rounds=args.rounds, llama_cpp=llama_version, rows=[], checks=[])
    for t in threads:
        _C.set_num_threads(t)
        torch.set_num_threads(t)
        timing.progress(f"{t} thread(s)")
        parts = {whole: whole_rows(model_q, prompt),
                 edge: segment_rows("edge", edges, prompt),
                 server: segment_rows("server", servers, split_hidden, {SAMPLED: TOP_K})}
        if llama_version is not None:
            parts[whole].insert(0, llama_cpp_row(gguf, t, prompt[0].tolist()))
        for part, rows in parts.items():
            for path, m in measure(rows, args.steps, args.rounds, tokens).items():
                result["rows"].append({"threads": t, "part": part, "path": path, **m})
        by = {(r["part"], r["path"]): r["median_ms"] for r in result["rows"] if r["threads"] == t}
        edge_ms = by[(edge, "ours fast")]
        server_ms = by[(server, "ours fast")]
        if llama_version is not None:
            ref = by[(whole, "llama.cpp")]
            result["checks"].append({"what": f"{t} thread(s): edge {split_at} layers fast / llama.cpp whole model "
                                             "<= 1.25",
                                     "value": f"{edge_ms:.2f} / {ref:.2f} ms = {edge_ms / ref:.2f}x",
                                     "met": edge_ms / ref <= 1.25})
        sampled_ms = by[(server, SAMPLED)]
        if args.model == "smollm2":  # the target was set for SmolLM2's 49k-row head
            result["checks"].append({"what": f"{t} thread(s): server 1 layer + head fast < 6 ms "
                                             "(greedy / top-k sampling)",
                                     "value": f"{server_ms:.2f} / {sampled_ms:.2f} ms",
                                     "met": max(server_ms, sampled_ms) < 6.0})
    del model_q, split, edges, servers
    timing.progress("greedy check")
    _C.set_num_threads(threads[-1])
    result["greedy"] = greedy_check(model, tokenizer, args.greedy_tokens)
    timing.write(args.out, "edge_decode", result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
