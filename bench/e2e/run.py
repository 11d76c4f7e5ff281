"""End-to-end evaluation of the split system against the published baselines on SmolLM2-135M.

    python bench/e2e/run.py --out bench/results/e2e

Writes ``report.md``, PNG plots and the JSON it was made from. What is measured here (on this
machine) and what is modelled is labelled in the report:

* measured: perplexity / KL of every method (teacher-forced, Botchan, windows of 512) with a
  bootstrap confidence interval over windows of scored tokens (``stats.py``), frame bytes, the
  codec's and the layers' CPU times (``profile.json``; the SmoothQuant-style layers timed on the
  project's ``int8_linear``), and one real split generation per method through the runtime
  (in-process transport);
* modelled: latency on the edge boards and the server GPU (roofline over the shipped device
  data), the link (bandwidth + RTT), and memory.

Long steps cache their results in ``--out``, so a rerun only redoes what is missing.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import ATOM_GROUP, ATOM_OUTLIERS, atom_transfer, int8_transfer, w8a8, w8a8_int8_model
from common import CONTEXT, SPLIT_LAYERS, botchan_ids
from report import write_report
from stats import not_worse, ppl_change_ci

from splitkernels.codec import CodecConfig
from splitkernels.codec.spec import config_for_model, is_v2_spec
from splitkernels.models import load_smollm2
from splitkernels.nn import PER_CHANNEL, QuantConfig
from splitkernels.planner.costs import (
    MESSAGE_OVERHEAD_BYTES,
    REPLY_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    Link,
    ModelShape,
    Roofline,
    frame_bytes,
    layer_weight_bytes,
    local_latency,
    memory,
    split_latency,
    working_bytes,
)
from splitkernels.planner.devices import get_device
from splitkernels.planner.optimizer import Infeasible, Limits, Plan, Scenario, plan
from splitkernels.planner.profile import CLOCKS, Profile, measure_forward, measure_profile
from splitkernels.planner.quality import SplitEvaluator, calibrate, point_key
from splitkernels.planner.speculation import DraftOption, draft_model_option

GROUP = 64
FRONT, BACK = QuantConfig(4, GROUP), QuantConfig(8, GROUP)
SQ_WEIGHTS = QuantConfig(8, PER_CHANNEL)
# Our codec operating points for the planner (bench/e2e/codec_grid.py, see e2e.md): about 4.5 bits
# per element (mostly 4-bit tokens) and about 5.5 bits (mostly 5-bit tokens).
OUR_CODECS = (
    CodecConfig(alpha=3.0, capacity=16, mode="error", eps=0.26),
    CodecConfig(alpha=3.0, capacity=16, mode="error", eps=0.12),
)
# Codec v2 at a 4-bit target (Fisher scales; the CLI's default instead sets the rate by the KL
# estimate, see e2e.md section 1), calibrated on Botchan tokens from
# CALIB_OFFSET on (disjoint from the scored text; the CLI calibrates on mixed text, whose numbers
# are in e2e.md section 1). The scenarios plan with these points beside v1's (V2Calibrator).
V2_CODEC = {"kind": "v2", "bits": 4.0, "sensitivity": "fisher"}
CALIB_OFFSET, CALIB_TOKENS = 8192, 1024
EDGES = ("jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "raspberry-pi-5-8gb")
SERVER = "nvidia-a100-80gb"
LINKS = tuple(Link(m, r) for m in (1.0, 10.0, 100.0) for r in (5.0, 20.0, 50.0))
PROMPT = 128


def _json_cache(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1))
    return value


def calibration_ids(tokenizer) -> torch.Tensor:
    """The tokens that calibrate codec v2 points: Botchan from CALIB_OFFSET, disjoint from the scored text."""
    return botchan_ids(tokenizer, CALIB_OFFSET + CALIB_TOKENS)[CALIB_OFFSET:]


def calibration(model, tokenizer, ids, out: Path, log):
    """Our configurations: front 8-bit g64 and back 8-bit at every split layer with the two codec
    v1 operating points, codec v2 and lossless (fp16) frames; front 4-bit g64 only at splits 4 and 10 --
    4-bit round-to-nearest front weights alone cost +4% to +11% perplexity on this model, so
    the CPU budget went to the 8-bit points."""
    kw = dict(context=CONTEXT, group_size=GROUP, model_name="SmolLM2-135M-Instruct", text_name="botchan",
              cache=out / "quality.json", progress=log, calibration=calibration_ids(tokenizer))
    calibrate(model, ids, SPLIT_LAYERS[:1], [4], [8], [*OUR_CODECS, V2_CODEC, CodecConfig.passthrough()], **kw)
    calibrate(model, ids, SPLIT_LAYERS[1:2], [4], [8], [*OUR_CODECS[:1], V2_CODEC], **kw)
    return calibrate(model, ids, SPLIT_LAYERS, [8], [8], [*OUR_CODECS, V2_CODEC, CodecConfig.passthrough()], **kw)


class V2Calibrator:
    """``plan``'s codec calibrator: fits a table point's v2 spec for the model at a split on the
    calibration ids, once per (split, spec) across every scenario, and remembers which spec each
    config came from (the key of the point's measured quality and likelihoods). The quality point
    was calibrated with its quantised front in place, this config with the model's own weights:
    the plan stores it, the report's quality is the point's."""

    def __init__(self, model, ids: torch.Tensor) -> None:
        self.model, self.ids = model, ids
        self.configs: dict[tuple[int, str], object] = {}
        self.specs: dict[str, dict] = {}

    def __call__(self, split_layer: int, spec: dict):
        key = (split_layer, json.dumps(spec, sort_keys=True))
        if key not in self.configs:
            with torch.enable_grad():
                config = config_for_model(spec, self.model, split_layer, self.ids, window=CONTEXT,
                                          wire_dtype=torch.float16)
            self.configs[key], self.specs[config.fingerprint] = config, spec
        return self.configs[key]

    def spec(self, codec):
        """The table spec of a calibrated v2 ``codec``; a v1 config as it is."""
        return self.specs[codec.fingerprint] if hasattr(codec, "fingerprint") else codec


def baseline_quality(model, ids, out: Path, log) -> dict:
    """SmoothQuant-style W8A8 + int8 transfer, and Atom-style transfer with 8-bit g64 weights on both
    sides (so it differs from our 8/8-bit configurations only in the transfer codec). Cached per
    split layer in ``baselines.json``."""
    path = out / "baselines.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    todo = [layer for layer in SPLIT_LAYERS if f"sq/{layer}" not in rows or f"atom/{layer}" not in rows]
    if not todo:
        return rows
    ev = SplitEvaluator(model, ids, CONTEXT, GROUP)

    def keep(key: str, p) -> None:
        rows[key] = {"ppl_change": p.ppl_change, "kl": p.kl, "bits": p.bits_per_element, "ppl": p.ppl}
        rows["ppl_reference"], rows["tokens"] = ev.ppl_reference, ev.tokens
        path.write_text(json.dumps(rows, indent=1))
        log(p)

    for layer in todo:
        with w8a8(model):
            keep(f"sq/{layer}", ev.measure(layer, None, None, None, int8_transfer))
        keep(f"atom/{layer}", ev.measure(layer, BACK.bits, BACK.bits, None, atom_transfer))
    return rows


def token_nll(model, ids, table, out: Path, log, calib: torch.Tensor) -> dict:
    """Per scored token negative log-likelihoods of the unsplit model (``"reference"``), of every
    calibration point (by its table key) and of the baselines (``"sq/<l>"``, ``"atom/<l>"``), for
    the confidence intervals. Cached in ``nll.json``."""
    path = out / "nll.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    points = [p for p in table.points.values() if p.key() not in rows]
    layers = [layer for layer in SPLIT_LAYERS if f"sq/{layer}" not in rows or f"atom/{layer}" not in rows]
    if not points and not layers and "reference" in rows:
        return rows
    ev = SplitEvaluator(model, ids, CONTEXT, GROUP, calib)
    rows["reference"] = ev.reference_nll.tolist()

    def keep(key: str, p) -> None:
        rows[key] = ev.last_nll.tolist()
        path.write_text(json.dumps(rows))
        log(p)

    for p in points:
        codec = None if p.codec is None else p.codec if is_v2_spec(p.codec) else CodecConfig.from_dict(p.codec)
        keep(p.key(), ev.measure(p.split_layer, p.front_bits, p.back_bits, codec, front_method=p.front_method))
    for layer in layers:
        with w8a8(model):
            keep(f"sq/{layer}", ev.measure(layer, None, None, None, int8_transfer))
        keep(f"atom/{layer}", ev.measure(layer, BACK.bits, BACK.bits, None, atom_transfer))
    return rows


class W8A8Profile(Profile):
    """This machine's profile, with the SmoothQuant-style layers timed as W8A8 on ``int8_linear``
    (the ``"w8a8 int8_linear"`` entry) instead of as 8-bit weight-only layers."""

    def _format(self, quant):
        if quant == SQ_WEIGHTS:
            return self.data["formats"]["w8a8 int8_linear"]
        return super()._format(quant)


def runtime_runs(model, tok, out: Path) -> dict:
    """One real generation per split method through the runtime on this CPU (in-process)."""

    def compute():
        prompt = botchan_ids(tok, PROMPT).unsqueeze(0)
        runs = {}
        for name, p in (
            ("split fp16", Plan(15, None, None, CodecConfig.passthrough(), 512, dtype="float32")),
            ("ours (split 15, 8/8-bit, 4.5-bit codec)", Plan(15, BACK, BACK, OUR_CODECS[0], 512, dtype="float32")),
        ):
            split = p.apply(copy.deepcopy(model))
            split.generate(prompt, 17)
            runs[name] = split.last_metrics.summary()
            split.close()
        return runs

    return _json_cache(out / "runtime.json", compute)


def atom_token_bytes(d: int) -> int:
    n_in = d - ATOM_OUTLIERS
    return (n_in * 4 + 7) // 8 + 4 * -(-n_in // ATOM_GROUP) + ATOM_OUTLIERS + 2 + 2 * ATOM_OUTLIERS


def draft_acceptance(paths: list[Path]) -> list[tuple[str, float, int | None]]:
    """(drafter, acceptance, draft bits) measured by bench/speculative.py: per file and drafter
    (prompt lookup, or a draft model of the file's bits), the median acceptance over its rows.
    Chains of drafters are left out (their cost per draft mixes their members')."""
    found: dict[tuple[str, int | None], list[float]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            name = row["method"].split(" k=")[0]
            if name in ("lookup", "draft-model") and row["acceptance_rate"] is not None:
                bits = data.get("draft_bits", 4) if name == "draft-model" else None
                found.setdefault((name, bits), []).append(row["acceptance_rate"])
    return [(name, statistics.median(v), bits) for (name, bits), v in sorted(found.items(), key=str)]


def draft_options(shape: ModelShape, edge_compute, context: int,
                  drafts: list[tuple[str, float, int | None]]) -> list[DraftOption]:
    """The planner's drafting options for one edge from the measured acceptances (a draft
    model's cost on this edge; a measured profile lacking its weight format leaves it out)."""
    options = []
    for name, alpha, bits in drafts:
        if name == "lookup":
            options.append(DraftOption("prompt lookup", alpha))
            continue
        try:
            options.append(draft_model_option(shape, edge_compute, bits, alpha, context, GROUP))
        except ValueError:
            continue
    return options


def scenario_rows(shape: ModelShape, table, base: dict, nll: dict, edge_compute, edge_mem: int, server,
                  link: Link, calibrator: V2Calibrator, drafts: list[tuple[str, float, int | None]] = ()) -> dict:
    """Latency / bytes / quality of every method in one (edge, link) scenario (with ``drafts``,
    the measured drafters' acceptances, also ours with speculative decoding); ours plans with the
    table's v1 and v2 codec points."""
    d, rows = shape.hidden, {}
    srv_mem = get_device(SERVER).usable_bytes
    ids_bytes = 4 * PROMPT + MESSAGE_OVERHEAD_BYTES
    # Cloud-only: the prompt goes up once, tokens stream back (no round trip per token).
    tok, ttft = local_latency(shape, server, None, PROMPT, PROMPT + 64)
    rows["cloud-only"] = dict(token_s=tok + link.transfer_s(REPLY_BYTES), ttft_s=ttft + link.rtt_ms / 1e3 +
                              link.transfer_s(ids_bytes + REPLY_BYTES), token_bytes=REPLY_BYTES, ppl_change=0.0,
                              kl=0.0, split=None, fits=True)
    tok, ttft = local_latency(shape, edge_compute, None, PROMPT, PROMPT + 64)
    whole = (shape.vocab * d + shape.num_layers * layer_weight_bytes(shape, None) + d) * 1 + \
        shape.num_layers * shape.kv_bytes_per_token_layer * 2048 + RUNTIME_OVERHEAD_BYTES + \
        max(working_bytes(shape, PROMPT, PROMPT), working_bytes(shape, 1, 2048))
    rows["edge-only (fp16)"] = dict(token_s=tok, ttft_s=ttft, token_bytes=0, ppl_change=0.0, kl=0.0, split=None,
                                    fits=whole <= edge_mem)

    def split_method(name, front, back, token_bytes, prompt_bytes, quality_of, layers=SPLIT_LAYERS):
        best = None
        for layer in layers:
            mem = memory(shape, layer, front, back, 2048, PROMPT)
            if mem.edge_total > edge_mem or mem.server_total() > srv_mem:
                continue
            lat = split_latency(shape, edge_compute, server, link, layer, front, back, token_bytes, prompt_bytes,
                                PROMPT, PROMPT + 64)
            q = quality_of(layer)
            row = dict(token_s=lat.token_s, ttft_s=lat.ttft_s, token_bytes=lat.token_bytes, split=layer, fits=True,
                       breakdown=lat.breakdown(), **q)
            if best is None or row["token_s"] < best["token_s"]:
                best = row
        rows[name] = best or dict(fits=False)

    def measured(key: str, layer: int) -> dict:
        return dict(ppl_change=base[key]["ppl_change"], kl=base[key]["kl"], nll=nll[key],
                    ppl_ci=ppl_change_ci(nll["reference"], nll[key]))

    split_method("split fp16", None, None, 2 * d, 2 * d * PROMPT,
                 lambda l: dict(ppl_change=0.0, kl=0.0, nll=nll["reference"], ppl_ci=(0.0, 0.0, 0.0)))
    split_method("SmoothQuant W8A8 + int8", SQ_WEIGHTS, SQ_WEIGHTS, d + 2, (d + 2) * PROMPT,
                 lambda l: measured(f"sq/{l}", l))
    split_method("Atom-style 4-bit + int8 outliers", BACK, BACK, atom_token_bytes(d), atom_token_bytes(d) * PROMPT,
                 lambda l: measured(f"atom/{l}", l))
    baselines = [r for k, r in rows.items() if k not in ("cloud-only", "edge-only (fp16)") and r.get("fits")]
    best_base = min(baselines, key=lambda r: r["token_s"]) if baselines else None
    # Ours: the planner's fastest plan whose perplexity is not worse than the fastest split
    # baseline's beyond the noise (the paired bootstrap interval of the difference reaches 0).
    limits = Limits(edge_memory_bytes=edge_mem, server_memory_bytes=srv_mem, min_seq_len=2048,
                    max_kl=None, max_ppl_change=None)
    try:
        res = plan(Scenario(shape, edge_compute, server, link, PROMPT), table, limits, objective="latency",
                   seq_lens=(2048,), alternatives=10**6, drafters=draft_options(shape, edge_compute, 2048, drafts),
                   calibrate_codec=calibrator)
    except Infeasible as exc:
        rows["ours (planner)"] = dict(fits=False, why=exc.explanation)
        return rows
    chosen, why = None, "no plan is within the noise of the fastest baseline's perplexity"
    for cand in [res.plan, *res.alternatives]:
        key = point_key(cand.split_layer, cand.front and cand.front.bits, cand.back and cand.back.bits,
                        calibrator.spec(cand.codec), cand.front.method if cand.front else "rtn")
        ok, diff = (True, None) if best_base is None else not_worse(nll["reference"], nll[key], best_base["nll"])
        if ok:
            chosen = (cand, key, diff)
            break
    if chosen is None:
        rows["ours (planner)"] = dict(fits=False, why=why)
        return rows
    cand, key, diff = chosen
    p = cand.predicted
    rows["ours (planner)"] = dict(token_s=p["token_latency_s"], ttft_s=p["ttft_s"], token_bytes=p["token_bytes"],
                                  ppl_change=p["ppl_change"], kl=p["kl"], split=cand.split_layer, fits=True,
                                  breakdown=p["breakdown"], codec=_codec_summary(cand.codec, calibrator),
                                  front=str(cand.front),
                                  back=str(cand.back), ppl_ci=ppl_change_ci(nll["reference"], nll[key]),
                                  vs_base_ci=diff, nll=nll[key])
    if drafts:
        # Ours with speculative decoding: the drafter and k the planner picked for this plan. Greedy
        # output equals one token per round trip, so the quality is ours'; bytes per token count
        # every drafted row.
        spec = p["speculation"]
        row = {k: v for k, v in rows["ours (planner)"].items() if k not in ("breakdown", "token_s", "token_bytes")}
        row.update(token_s=spec["token_latency_s"], drafter=spec["drafter"] or "none pays", k=spec["k"],
                   tokens_per_round=spec["tokens_per_round"],
                   token_bytes=round(p["token_bytes"] * (spec["k"] + 1) / spec["tokens_per_round"]))
        rows["ours + speculation (planner)"] = row
    return rows


def _codec_summary(codec, calibrator: V2Calibrator) -> dict:
    """A plan's codec for the report: a v1 config whole, a v2 one as its spec and fingerprint
    (its per-channel arrays would fill results.json once per scenario)."""
    if hasattr(codec, "fingerprint"):
        return dict(calibrator.spec(codec), fingerprint=codec.fingerprint)
    return codec.to_dict()


# A 7B-class Llama shape (Llama-2-7B's published config) for the modelled-only scaling section.
LLAMA7B = dict(name="Llama-2-7B shape", num_layers=32, hidden=4096, vocab=32000, num_heads=32, num_kv_heads=32,
               head_dim=128, linears=((4096, 4096),) * 4 + ((11008, 4096), (11008, 4096), (4096, 11008)),
               layer_other_params=2 * 4096, tied_embeddings=False)


def scaling_rows(table) -> list[dict]:
    """Latency only (no quality): SmoothQuant-style vs ours on a 7B-class model, each at its fastest
    split that fits the board, with our frame statistics (code bits, outliers per token) taken from
    the SmolLM2 calibration. Front 4-bit is listed because 7B-class models are known to tolerate it
    far better than SmolLM2-135M does -- not measured here."""
    shape = ModelShape(**LLAMA7B)
    ours_q = table.get(SPLIT_LAYERS[0], BACK.bits, BACK.bits, OUR_CODECS[0])
    d = shape.hidden
    rows = []
    for edge_name in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb"):
        dev = get_device(edge_name)
        edge, server = Roofline(dev, shape), Roofline(get_device(SERVER), shape)
        for link in LINKS:
            best = {}
            ours_b = frame_bytes(1, d, ours_q.code_bits, ours_q.outliers_per_token)
            for name, front, back, tok_b in (
                ("SmoothQuant W8A8 + int8", SQ_WEIGHTS, SQ_WEIGHTS, d + 2),
                ("ours 8/8-bit", BACK, BACK, ours_b),
                ("ours 4/8-bit", FRONT, BACK, ours_b),
            ):
                for layer in range(1, shape.num_layers):
                    if memory(shape, layer, front, back, 2048, PROMPT).edge_total > dev.usable_bytes:
                        break
                    lat = split_latency(shape, edge, server, link, layer, front, back, tok_b, tok_b * PROMPT,
                                        PROMPT, PROMPT + 64)
                    if name not in best or lat.token_s < best[name][1].token_s:
                        best[name] = (layer, lat)
            rows.append(dict(edge=edge_name, mbps=link.mbps, rtt_ms=link.rtt_ms,
                             **{f"{k}/split": v[0] for k, v in best.items()},
                             **{f"{k}/token_s": v[1].token_s for k, v in best.items()},
                             **{f"{k}/token_bytes": v[1].token_bytes for k, v in best.items()}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (windows of 512)")
    ap.add_argument("--grid", type=Path, nargs="*", default=[], help="codec_grid.py JSON files to include in the report")
    ap.add_argument("--repeats", type=int, default=3, help="profile repeats (best of)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="profile clock: cpu (process CPU time; steady on a shared machine, run with "
                         "OMP_NUM_THREADS=1) or wall")
    ap.add_argument("--speculative", type=Path, nargs="*", default=[],
                    help="bench/speculative.py JSON files whose measured acceptances the speculation rows use")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    drafts = draft_acceptance(args.speculative)
    torch.set_grad_enabled(False)
    t0 = time.time()

    def log(p):
        print(f"[{time.time() - t0:6.0f}s] split {p.split_layer} front {p.front_bits} back {p.back_bits} "
              f"codec {p.codec and (p.codec.get('mode') or p.codec.get('kind'))} bits {p.bits_per_element:.3f} "
              f"ppl {100 * p.ppl_change:+.2f}% kl {p.kl:.4f}", flush=True)

    model, tok = load_smollm2()
    ids = botchan_ids(tok, args.tokens)
    shape = ModelShape.from_config(model.config, name="SmolLM2-135M-Instruct")
    table = calibration(model, tok, ids, args.out, log)
    base = baseline_quality(model, ids, args.out, log)
    nll = token_nll(model, ids, table, args.out, log, calibration_ids(tok))

    def profile():
        data = measure_profile(model, [None, FRONT, BACK, SQ_WEIGHTS], prompt_tokens=PROMPT, decode_steps=8,
                               repeats=args.repeats, name="SmolLM2-135M-Instruct", clock=args.clock)
        # The SmoothQuant-style baseline on the project's fastest W8A8 kernel, in the same run.
        data["formats"]["w8a8 int8_linear"] = measure_forward(w8a8_int8_model(model, ids[:256]), PROMPT, 8,
                                                              args.repeats, CLOCKS[args.clock])
        return data

    prof_data = _json_cache(args.out / "profile.json", profile)
    runs = runtime_runs(model, tok, args.out)
    server = Roofline(get_device(SERVER), shape)
    scenarios = []
    edges = [(name, Roofline(get_device(name), shape), get_device(name).usable_bytes, "modelled (roofline)")
             for name in EDGES]
    edges.append(("this machine (CPU, fp32)", W8A8Profile(prof_data), 16 * 2**30, "measured profile"))
    calibrator = V2Calibrator(model, calibration_ids(tok))
    for edge_name, edge_compute, edge_mem, how in edges:
        for link in LINKS:
            rows = scenario_rows(shape, table, base, nll, edge_compute, edge_mem, server, link, calibrator, drafts)
            for r in rows.values():
                r.pop("nll", None)  # per-token arrays stay in nll.json
            scenarios.append(dict(edge=edge_name, how=how, mbps=link.mbps, rtt_ms=link.rtt_ms, rows=rows))
    grids = [json.loads(p.read_text()) for p in args.grid]
    results = dict(shape=shape.to_dict(), quality=json.loads(table.to_json()), baselines=base, profile=prof_data,
                   runtime=runs, scenarios=scenarios, grids=grids, server=SERVER, prompt_tokens=PROMPT,
                   scaling=scaling_rows(table), drafts=drafts)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.out)
    print(f"report: {args.out / 'report.md'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
