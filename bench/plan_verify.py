"""Plans checked against the runtime on this machine: a codec plan and a lossless plan for two tiny
model families and for SmolLM2, each run through the runtime by splitkernels.planner.verify.

    OMP_NUM_THREADS=1 python bench/plan_verify.py --out DIR [--no-smollm2] [--clock cpu|wall]

Tiny models are calibrated on random token ids and profiled here; SmolLM2 is planned from the
shipped calibration table for the issue's scenario (Raspberry Pi 5 edge, L4 server, 20 Mbit/s,
RTT 30 ms), in float32 with a float16 wire. Latency predictions use a profile of this machine
measured in the same run (``--clock cpu``: both in process CPU time, which a shared machine's load
does not inflate). Writes ``plan_verify.json`` and ``plan_verify.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import resources
from pathlib import Path

import torch

from splitkernels.codec import CodecConfig
from splitkernels.codec.spec import config_from_dict
from splitkernels.models import ModelShape, tiny_model
from splitkernels.nn import QuantConfig
from splitkernels.planner.costs import Link
from splitkernels.planner.optimizer import Limits, Scenario, codec_text, plan
from splitkernels.planner.profile import Profile, measure_profile
from splitkernels.planner.quality import QualityTable, calibrate
from splitkernels.planner.verify import verify_plan

LINK = Link(20.0, 30.0)
FAMILIES = ("llama", "opt")


def _tiny(family: str, clock: str) -> list[dict]:
    def load():
        return tiny_model(family, seed=3, num_layers=6, hidden=256, vocab=1024)

    model = load()
    text = torch.randint(0, 1024, (1024,), generator=torch.Generator().manual_seed(0))
    table = calibrate(model, text[:512], [2, 3], [8], [8], [None, CodecConfig()], context=256, group_size=64,
                      model_name=f"tiny {family}")
    profile = measure_profile(model, [QuantConfig(8, 64)], 64, 8, 3, clock=clock)
    here = Profile(profile)
    scenario = Scenario(ModelShape.from_model(model, dtype_bytes=4), here, here, LINK, 64)
    off = Limits(max_kl=None, max_ppl_change=None)
    rows = []
    for objective in ("latency", "lossless"):
        p = plan(scenario, table, off, objective=objective, seq_lens=(512,), dtype="float32").plan
        v = verify_plan(p, load, LINK, text[512:576], 16, text[576:], 256, profile, 3, clock)
        rows.append({"model": f"tiny {family} (6 layers, d 256)", "objective": objective, "plan": p.to_dict(),
                     "verification": v.to_dict(), "table": v.table()})
    return rows


def _smollm2(clock: str) -> list[dict]:
    from splitkernels.eval import load_text
    from splitkernels.models import load_smollm2
    from splitkernels.planner.costs import Roofline
    from splitkernels.planner.devices import get_device

    model, tok = load_smollm2()
    table = QualityTable.from_json(resources.files("splitkernels.planner").joinpath("smollm2_quality.json").read_text())
    shape = ModelShape.from_model(model, dtype_bytes=4)
    edge, server = get_device("raspberry-pi-5-8gb"), get_device("nvidia-l4")
    scenario = Scenario(shape, Roofline(edge, shape), Roofline(server, shape), LINK, 128)
    ids = tok(load_text("botchan"), return_tensors="pt").input_ids[0]
    limits = Limits(edge_memory_bytes=edge.usable_bytes, server_memory_bytes=server.usable_bytes,
                    max_token_latency_s=0.2, max_kl=0.01, max_ppl_change=0.02)
    profile = None
    rows = []
    for objective in ("latency", "lossless"):
        p = plan(scenario, table, limits, objective=objective, dtype="float32").plan
        if profile is None:
            profile = measure_profile(model, [p.front], 128, 8, 3, codec=p.codec, wire_dtype=torch.float16,
                                      clock=clock)
        v = verify_plan(p, lambda: load_smollm2()[0], LINK, ids[:128], 16, ids[128:128 + 1024], 512, profile, 3,
                        clock)
        rows.append({"model": "SmolLM2-135M-Instruct", "objective": objective, "plan": p.to_dict(),
                     "verification": v.to_dict(), "table": v.table()})
    return rows


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Plans checked against the runtime (bench/plan_verify.py)", "",
             f"Machine: {meta['machine']}, {meta['threads']} torch thread(s), OMP_NUM_THREADS={meta['omp']}, "
             f"{meta['clock']} clock; the 2-core VM was shared with other jobs (load average ~10). Link {LINK} "
             "emulated (delay reported, not waited). Bytes and memory are judged at 5%, per-token latency at 25% "
             "(latency predicted with this machine's profile, measured in the same run).", "",
             "| model | plan | frame B/token pred / meas | edge mem MiB pred / meas | server mem MiB pred / meas "
             "| per token ms pred / meas | all sizes within 5% | latency within 25% |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        c = {x["name"]: x for x in r["verification"]["checks"]}
        p = r["plan"]
        codec = codec_text(config_from_dict(p["codec"]))
        what = f"split {p['split_layer']}, {codec}, {p['wire_dtype']} wire, max {p['max_seq_len']}"
        fb, em = c["decode frame bytes per token"], c["edge weights + KV + activations"]
        sw, sk = c["server weights"], c["server KV cache at max_seq_len"]
        lat = c["per-token latency (this machine)"]
        lines.append(
            f"| {r['model']} | {what} | {fb['predicted']:.0f} / {fb['measured']:.1f} | "
            f"{em['predicted'] / 2**20:.2f} / {em['measured'] / 2**20:.2f} | "
            f"{(sw['predicted'] + sk['predicted']) / 2**20:.2f} / {(sw['measured'] + sk['measured']) / 2**20:.2f} | "
            f"{1e3 * lat['predicted']:.2f} / {1e3 * lat['measured']:.2f} ({100 * lat['error']:+.1f}%) | "
            f"{'yes' if r['verification']['sizes_ok'] else 'NO'} | {'yes' if lat['ok'] else 'NO'} |")
    lines += ["", "Edge memory here is the model's part (weights + KV cache at max_seq_len + activation peak of the "
              "planned prompt); the plan adds the runtime's own resident memory (RUNTIME_OVERHEAD_BYTES). Full "
              "tables:", ""]
    for r in rows:
        lines += [f"## {r['model']}, objective {r['objective']}", "", "```", r["table"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--no-smollm2", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = [r for f in FAMILIES for r in _tiny(f, args.clock)]
    if not args.no_smollm2:
        rows += _smollm2(args.clock)
    import os

    meta = {"machine": f"{platform.node()} {platform.machine()}", "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS", "unset"), "clock": args.clock, "seconds": time.time() - t0}
    (args.out / "plan_verify.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "plan_verify.md").write_text(_markdown(rows, meta) + "\n")
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
