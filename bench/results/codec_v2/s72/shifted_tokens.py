"""One-token frames at shifted positions (docs/FORMATS.md §5.2): the general path (the Python
quantiser and refine, the frame writer; the reference parser, rANS decoder, dequantiser and
apply_residuals), which every such frame took before session 72, beside the one C++ call each
way, in interleaved rounds in one process (bench/timing.py); and, on real split-layer hidden
states of the packaged models, every frame of the shifted positions byte for byte and value for
value against the general path.

    python bench/results/codec_v2/s72/shifted_tokens.py [smollm2 qwen2.5-coder ...]
"""
import sys
from pathlib import Path

import torch

from demo_split import demo_split
from splitkernels.codec import calibrate, decode_frame, encode_frame
from splitkernels.codec.frame_v2 import TOKEN_SHIFTED, read_frame_v2
from splitkernels.codec.v2 import decode_v2, encode_v2
from splitkernels.eval import load_text

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/, for timing.py
import timing  # noqa: E402


def compare(x: torch.Tensor, cfg, start: int) -> tuple[float, float, float, float]:
    """(general encode, fast encode, general decode, fast decode) in us, medians of interleaved rounds
    (bench/timing.py); asserts equal bytes and values first."""
    frame = encode_frame(x, cfg, start=start)
    assert frame == encode_v2(x, cfg, start).to_bytes() and frame[0] & TOKEN_SHIFTED
    assert torch.equal(decode_frame(frame, config=cfg), decode_v2(read_frame_v2(frame, cfg)))
    fns = {"general encode": lambda: encode_v2(x, cfg, start).to_bytes(),
           "fast encode": lambda: encode_frame(x, cfg, start=start),
           "general decode": lambda: decode_v2(read_frame_v2(frame, cfg)),
           "fast decode": lambda: decode_frame(frame, config=cfg)}
    medians = timing.compare(fns, budget_s=2.0, max_reps=300)
    return tuple(medians[k]["median"] * 1e6 for k in fns)


def report(name: str, x: torch.Tensor, cfg, start: int) -> None:
    ge, fe, gd, fd = compare(x, cfg, start)
    s = int(cfg.row_shifts(start, 1)[0])
    print(f"{name} d={cfg.d} {str(x.dtype)[6:]} position {start} (shift {s}): encode {ge:.1f} -> {fe:.1f} us, "
          f"decode {gd:.1f} -> {fd:.1f} us")


gen = torch.Generator().manual_seed(0)
for d in (576, 896, 4096):
    h = torch.randn(64 * 12, d, generator=gen) * (torch.rand(d, generator=gen) * 3 + 0.2)
    early = torch.tensor([50.0] * 8 + [1.0] * 56)  # positions 1-7 weigh 50 late ones: shifts there
    cfg = calibrate(h, bits=4.0, sensitivity=torch.ones(d), position_sensitivity=early)
    for dtype in (torch.float16, torch.float32):
        report("synthetic", h[5:6].to(dtype), cfg, 3)

for name in sys.argv[1:]:
    _, loaded, sm = demo_split(["--model", name], max_sessions=1)
    cfg = sm.codec
    ids = loaded.encode_text(load_text("botchan"))[:, 2000:2000 + max(cfg.shift_end, 1)]
    with torch.inference_mode():
        hidden = sm.edge.forward(ids, None, 0).half()
    early = [p for p in range(cfg.shift_end) if cfg.row_shifts(p, 1, ids[0, p:p + 1])[0] > 0]
    assert cfg.prediction is None  # (encode_v2 above takes no ids)
    for p in early[:-1]:  # every shifted position of the window: bytes and values checked in compare
        compare(hidden[p:p + 1], cfg, p)
    report(loaded.name, hidden[early[-1]:early[-1] + 1], cfg, early[-1])
    print(f"{loaded.name} split {sm.split_layer}: position_shift {cfg.position_shift}, token shifts "
          f"{len(cfg.token_shift)}; {len(early)} shifted positions, every frame identical both ways")
