"""Markdown report and PNG plots for bench/e2e/run.py."""
from __future__ import annotations

from pathlib import Path

import sys

from splitkernels.planner.costs import MESSAGE_OVERHEAD_BYTES, REPLY_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import LEVEL, WINDOW, fmt_ci  # noqa: E402

PROTOCOL_BYTES = MESSAGE_OVERHEAD_BYTES + REPLY_BYTES

GOAL_SPEEDUP = 1.49
GOAL_BYTES = 4.0
SPLIT_BASELINES = ("split fp16", "SmoothQuant W8A8 + int8", "Atom-style 4-bit + int8 outliers")
METHODS = ("cloud-only", "edge-only (fp16)", *SPLIT_BASELINES, "ours (planner)", "ours + speculation (planner)")


def _ms(x: float) -> str:
    return f"{1e3 * x:.2f}"


def _codec_name(c: dict | None) -> str:
    if c is None:
        return "fp16"
    if c.get("kind") == "v2":
        return f"v2 {c['bits']:g} bits, {c.get('sensitivity', 'uniform')} scales"
    if c["mode"] == "passthrough":
        return "passthrough (fp16 frame)"
    rest = f"eps {c['eps']:g}" if c["mode"] == "error" else f"avg {c['avg_bits']:g} bits"
    bits = "" if list(c["bit_choices"]) == [2, 3, 4, 5, 6, 8] else f" bits {c['bit_choices']}"
    return f"TS a{c['alpha']:g} C{c['capacity']} {c['mode']} {rest}{bits}"


def verdicts(results: dict) -> list[dict]:
    """Per scenario: ours vs the fastest split baseline (speed, perplexity) and vs fp16 (bytes)."""
    out = []
    for sc in results["scenarios"]:
        rows = sc["rows"]
        base = [(k, rows[k]) for k in SPLIT_BASELINES if rows.get(k, {}).get("fits")]
        ours = rows.get("ours (planner)", {})
        if not base or not ours.get("fits"):
            out.append(dict(sc=sc, ok=False, why=ours.get("why", "no feasible baseline")))
            continue
        name, b = min(base, key=lambda kv: kv[1]["token_s"])
        fp16 = rows["split fp16"]
        speed = b["token_s"] / ours["token_s"]
        fewer = fp16["token_bytes"] / ours["token_bytes"] if fp16.get("fits") else float("nan")
        frames = (fp16["token_bytes"] - PROTOCOL_BYTES) / (ours["token_bytes"] - PROTOCOL_BYTES) \
            if fp16.get("fits") else float("nan")
        # "Equal or better": not worse beyond the noise -- the bootstrap interval of the difference
        # reaches zero (run.py only admits such plans).
        diff = ours.get("vs_base_ci")
        out.append(dict(sc=sc, ok=True, base=name, speedup=speed, ppl_ok=diff is None or not diff[1] > 0,
                        diff=diff, bytes_ratio=fewer, frame_ratio=frames))
    return out


def _plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    edge = "jetson-orin-nano-8gb"
    for rtt in (5.0, 50.0):
        scs = [s for s in results["scenarios"] if s["edge"] == edge and s["rtt_ms"] == rtt]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in METHODS:
            pts = [(s["mbps"], s["rows"][m]["token_s"] * 1e3) for s in scs if s["rows"].get(m, {}).get("fits")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel("per-token latency (ms, modelled)")
        ax.set_title(f"SmolLM2-135M, {edge} + {results['server']}, RTT {rtt:g} ms")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        name = f"latency_{edge}_rtt{int(rtt)}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    grids = results.get("grids") or []
    if grids:
        # The grid with the most layers measured (the longest text if tied) makes the plot.
        grid = max(grids, key=lambda g: (len({r["layer"] for r in g["measured"]}), g["tokens"]))
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for layer in sorted({r["layer"] for r in grid["measured"]}):
            rows = [r for r in grid["measured"] if r["layer"] == layer and r["bits"] < 12]
            ax.scatter([r["bits"] for r in rows], [r["kl"] for r in rows], label=f"split {layer}", s=18)
        ax.axhline(0.006, color="k", lw=0.8, ls="--")
        ax.axvline(4.5, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("frame bits per element (all metadata)")
        ax.set_ylabel("KL to unsplit model (nats/token)")
        ax.set_title(f"Activation codecs on SmolLM2 (measured, {grid['tokens']} tokens)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "codec_kl_vs_bits.png", dpi=110)
        plt.close(fig)
        files.append("codec_kl_vs_bits.png")
    return files


def write_report(results: dict, out: Path) -> None:
    q = results["quality"]
    base = results["baselines"]
    lines = ["# End-to-end evaluation: SmolLM2-135M split between an edge board and a server", ""]
    lines += [
        f"Model SmolLM2-135M-Instruct (30 layers, d = {results['shape']['hidden']}); quality on Botchan, "
        f"{q['points'] and next(iter(q['points']))['tokens']} scored tokens in windows of {q['context']}, "
        f"weights group {q['group_size']}; prompt {results['prompt_tokens']} tokens for TTFT; server "
        f"{results['server']} (modelled).",
        "",
        "**Measured** on this machine: perplexity, KL and top-1 agreement of every method, frame bytes, "
        "the CPU profile (the SmoothQuant-style layers timed as W8A8 on the project's `int8_linear`) and the "
        "runtime runs. **Modelled**: every latency on the edge boards and the server "
        f"(roofline over `splitkernels/planner/devices.json`) and the link (bytes / bandwidth + RTT; "
        f"{MESSAGE_OVERHEAD_BYTES} B per request besides the frame, {REPLY_BYTES} B per reply).",
        "",
        f"Perplexity changes carry a {100 * LEVEL:.0f}% paired bootstrap interval over windows of {WINDOW} "
        "scored tokens (bench/e2e/stats.py). \"Equal or better perplexity\" means not worse beyond that "
        "noise: the interval of ours minus the baseline reaches zero.",
        "",
    ]
    for grid in results.get("grids") or []:
        lines += [f"## Activation codecs at the split ({grid['tokens']} scored tokens; measured, dense weights; "
                  "bench/e2e/codec_grid.py)", "",
                  f"Unsplit perplexity {grid['ppl_reference']:.3f} over {grid['tokens']} scored tokens. "
                  "Bits per element count every frame byte (header, per-token fields, outliers, CRC) at "
                  "512-token frames; the baselines' frames carry no header or CRC.", "",
                  "| split | codec | bits/elt | ppl change | KL | top-1 | within goal (<= 4.5 bits, KL <= 0.006) |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for r in sorted(grid["measured"], key=lambda r: (r["layer"], -r["bits"])):
            ok = r["bits"] <= 4.5 and r["kl"] <= 0.006 and r["ppl_change"] <= 0.01
            lines.append(f"| {r['layer']} | {r['name']} | {r['bits']:.3f} | {100 * r['ppl_change']:+.2f}% | "
                         f"{r['kl']:.4f} | {100 * r['top1']:.1f}% | {'yes' if ok else 'no'} |")
        lines.append("")
    lines += ["## Our configurations (calibration, measured)", "",
              "| split | front | back | codec | bits/elt | code bits | outliers/token | ppl change | KL | top-1 |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(q["points"], key=lambda p: (p["split_layer"], p["front_bits"] or 99, str(p["codec"]))):
        ch = p["ppl"] / p["ppl_reference"] - 1
        lines.append(f"| {p['split_layer']} | {p['front_bits']}-bit | {p['back_bits']}-bit | {_codec_name(p['codec'])} | "
                     f"{p['bits_per_element']:.3f} | {p['code_bits']:.2f} | {p['outliers_per_token']:.2f} | "
                     f"{100 * ch:+.2f}% | {p['kl']:.4f} | {100 * p['top1_agreement']:.1f}% |")
    lines += ["", "## Baselines (measured)", "",
              "| split | method | bits/elt | ppl change | KL |", "|---:|---|---:|---:|---:|"]
    for key, v in base.items():
        if "/" in key:
            m, layer = key.split("/")
            label = "SmoothQuant W8A8 + int8 transfer" if m == "sq" else "Atom-style transfer, 8/8-bit g64 weights"
            lines.append(f"| {layer} | {label} | {v['bits']:.3f} | {100 * v['ppl_change']:+.2f}% | {v['kl']:.4f} |")
    lines += ["", f"Reference perplexity (unsplit fp32): {base['ppl_reference']:.3f}.", ""]

    lines += ["## Runtime on this machine (measured, in-process transport, 2 shared CPU cores, fp32)", "",
              "| method | TTFT ms | per token ms | edge ms | encode ms | decode ms | server ms | frame B/token | x fewer than fp16 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in results["runtime"].items():
        d = s["decode_mean"]
        lines.append(f"| {name} | {_ms(s['ttft_s'])} | {_ms(s['per_token_s'])} | {_ms(d['edge_compute_s'])} | "
                     f"{_ms(d['encode_s'])} | {_ms(d['decode_s'])} | {_ms(d['server_compute_s'])} | "
                     f"{s['bytes_per_token']:.0f} | {s['compression_vs_fp16']:.2f} |")
    prof = results["profile"]
    lines += ["", f"CPU profile ({prof['machine']}, {prof['torch_threads']} threads, {prof.get('clock', 'wall')} clock, backends {prof['backends']}): "
              + ", ".join(f"{k}: decode {_ms(v['decode_layer_s'])} ms/layer, prefill {_ms(v['prefill_layer_s'])} ms/layer"
                          for k, v in prof["formats"].items()), ""]

    lines += ["## Scenarios (latency modelled, quality measured)", ""]
    if results.get("drafts"):
        lines += ["*ours + speculation*: the planner's split with the drafter and k that "
                  "`planner.speculation.choose_speculation` picks for the scenario, from the acceptances "
                  "measured by bench/speculative.py (" + ", ".join(
                      f"{n}{'' if b is None else f' {b}-bit'}: {a:.2f}" for n, a, b in results["drafts"])
                  + "); greedy output equals one token per round trip, so its quality is ours'. The 4-bit "
                  "draft model accepts every draft only because SmolLM2 ships as 4-bit groups of 32 (a 4-bit "
                  "copy re-quantises it almost exactly).", ""]
    for sc in results["scenarios"]:
        lines += [f"### {sc['edge']} ({sc['how']}), {sc['mbps']:g} Mbit/s, RTT {sc['rtt_ms']:g} ms", "",
                  f"| method | split | per token ms | TTFT ms | bytes/token | ppl change [{100 * LEVEL:.0f}% CI] | KL |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in METHODS:
            r = sc["rows"].get(m)
            if not r or not r.get("fits"):
                why = (r or {}).get("why")
                lines.append(f"| {m} | {'no plan: ' + why.splitlines()[0] if why else 'does not fit'} | | | | | |")
                continue
            ppl = fmt_ci(r["ppl_ci"]) if r.get("ppl_ci") else f"{100 * r['ppl_change']:+.2f}%"
            label = f"{m}: {r['drafter']}, k = {r['k']}" if "drafter" in r else m
            if r.get("codec"):
                label += f" ({_codec_name(r['codec'])})"
            lines.append(f"| {label} | {r['split'] or '-'} | {_ms(r['token_s'])} | {_ms(r['ttft_s'])} | {r['token_bytes']} | "
                         f"{ppl} | {r['kl']:.4f} |")
        lines.append("")

    lines += ["## Goal check", "",
              f"Goal: at equal or better perplexity, ours >= {GOAL_SPEEDUP}x faster per token than the fastest split "
              f"baseline, and >= {GOAL_BYTES}x fewer bytes per token than fp16 transfer.", "",
              "| edge | link | fastest baseline | speed-up | ppl ours - baseline [CI] | no worse beyond noise | "
              "x fewer frame bytes than fp16 | x fewer bytes incl. protocol |",
              "|---|---|---|---:|---:|---|---:|---:|"]
    for v in verdicts(results):
        sc = v["sc"]
        link = f"{sc['mbps']:g} Mbit/s, {sc['rtt_ms']:g} ms"
        if not v["ok"]:
            lines.append(f"| {sc['edge']} | {link} | - | no plan within the noise of the fastest baseline's "
                         "perplexity | | | | |")
            continue
        diff = fmt_ci(v["diff"]) if v["diff"] else "-"
        lines.append(f"| {sc['edge']} | {link} | {v['base']} | {v['speedup']:.2f}x | {diff} | "
                     f"{'yes' if v['ppl_ok'] else 'no'} | {v['frame_ratio']:.2f}x | {v['bytes_ratio']:.2f}x |")
    scaling = results.get("scaling")
    if scaling:
        methods = ("SmoothQuant W8A8 + int8", "ours 8/8-bit", "ours 4/8-bit")
        lines += ["", "## Modelled only: the same comparison for a 7B-class model", "",
                  "Latency and bytes only -- no quality was measured for this shape. Each method gets its fastest "
                  "split that fits the board (split / ms per token / bytes per token); our frame statistics are "
                  "SmolLM2's. Server " + results["server"] + ".", "",
                  "| edge | link | " + " | ".join(methods) + " | ours 8/8 vs SQ | ours 4/8 vs SQ |",
                  "|---|---|---|---|---|---:|---:|"]
        for r in scaling:
            cells = []
            for m in methods:
                cells.append(f"{r[m + '/split']} / {_ms(r[m + '/token_s'])} / {r[m + '/token_bytes']}"
                             if m + "/token_s" in r else "does not fit")
            sq = r.get(methods[0] + "/token_s")
            ratios = [f"{sq / r[m + '/token_s']:.2f}x" if sq and m + "/token_s" in r else "-" for m in methods[1:]]
            lines.append(f"| {r['edge']} | {r['mbps']:g} Mbit/s, {r['rtt_ms']:g} ms | " + " | ".join(cells) + " | "
                         + " | ".join(ratios) + " |")
    plots = _plots(results, out)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
