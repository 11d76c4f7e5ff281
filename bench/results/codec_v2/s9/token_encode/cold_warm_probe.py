import time, torch
from splitkernels.codec import encode, encode_frame, calibrate
torch.set_num_threads(1)
torch.manual_seed(0)
for d in (576, 2048):
    h = torch.randn(2048, d) * torch.rand(d) * 3
    cfg = calibrate(h, bits=4.0)
    x = (torch.randn(1, d) * torch.rand(d) * 3).half()
    big = torch.empty(64 << 20, dtype=torch.uint8); big2 = torch.empty_like(big)
    def t(f, cold):
        ts = []
        for _ in range(40):
            if cold: big2.copy_(big)
            s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
        return sorted(ts)[20] * 1e6
    assert encode_frame(x, cfg, start=600) == encode(x, cfg, start=600).to_bytes()
    for name, f in (("encode().to_bytes()", lambda: encode(x, cfg, start=600).to_bytes()),
                    ("encode_frame (one C++ call)", lambda: encode_frame(x, cfg, start=600))):
        print(f"d={d} {name:28s} warm {t(f, False):6.1f} us  cold {t(f, True):6.1f} us")
