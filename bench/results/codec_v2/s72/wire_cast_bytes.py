"""Generality of the fused wire cast: real split-layer hidden states of each packaged family, every
token of a 256-token window as a one-token frame in fp16 and bf16, fused (the C++ call casts) against
`to_wire` then encode: byte for byte.

    python bench/results/codec_v2/s72/wire_cast_bytes.py smollm2 qwen2.5-coder
"""
import sys

import torch

from demo_split import demo_split
from splitkernels.codec import encode_frame
from splitkernels.codec.wire_dtype import to_wire
from splitkernels.eval import load_text

for name in sys.argv[1:]:
    _, loaded, sm = demo_split(["--model", name], max_sessions=1)
    ids = loaded.encode_text(load_text("botchan"))[:, 1000:1256]
    with torch.inference_mode():
        hidden = sm.edge.forward(ids, None, 0).float()
    same = total = 0
    for wire in (torch.float16, torch.bfloat16):
        for t in range(hidden.shape[0]):
            x = hidden[t:t + 1]
            try:
                expected = encode_frame(to_wire(x, wire), sm.codec, start=t)
            except ValueError as exc:  # a value the wire dtype cannot hold: both must refuse
                try:
                    encode_frame(x, sm.codec, start=t, wire_dtype=wire)
                except ValueError as again:
                    same += str(again) == str(exc)
                total += 1
                continue
            same += encode_frame(x, sm.codec, start=t, wire_dtype=wire) == expected
            total += 1
    print(f"{loaded.name} split {sm.split_layer} d={hidden.shape[1]} |x| max {hidden.abs().max():.4g}: "
          f"{same} of {total} one-token frames identical (fp16 and bf16 wire)")
