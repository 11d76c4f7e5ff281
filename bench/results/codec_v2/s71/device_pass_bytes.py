"""Generality: codec v2 long frames (T = 512, with center offsets) of real hidden states of two
model families, encoded by the host path and by the emulated CUDA device pass (its kernels under
the CPU emulation, the offsets fitted by frame_center.fit in C++): the same bytes."""
import sys, tempfile, time, contextlib, torch
sys.path.insert(0, "python_tests")
from splitkernels.models.loading import load_packaged
from splitkernels.codec import calibrate, v2_device
from splitkernels.codec.v2 import encode_v2
from splitkernels._backends import cuda as glue
from test_cuda_backend import EmulatedModule, _build_emulation
from pathlib import Path
lib = _build_emulation(Path("csrc"), Path(tempfile.mkdtemp()) / "sk_cuda_emulation.so")
text = open("README.md").read()
for name, split in (("smollm2", 15), ("qwen2.5-coder", 12)):
    model, tok = load_packaged(name, dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[split][0]
    cfg = calibrate(hs[:512], bits=4.0)
    x = hs[512:1024].to(torch.bfloat16)  # a window the calibration did not see
    host = encode_v2(x, cfg)
    real = (glue._C, glue._require_cuda, glue._stream)
    glue._C, glue._require_cuda, glue._stream = EmulatedModule(lib), (lambda n, t: None), (lambda d: 0)
    try:
        with contextlib.ExitStack():
            torch_cuda_device = torch.cuda.device
            torch.cuda.device = lambda d: contextlib.nullcontext()
            t0 = time.time()
            dev = v2_device.encode  # the device pass through the emulated kernels, via encode_v2's own steps
            from splitkernels.codec import v2 as v2mod
            orig_kernel = v2_device.kernel
            v2_device.kernel = lambda op, device: glue.codec_v2_encode if op == v2_device.ENCODE_OP else None
            try:
                emu = encode_v2(x, cfg)
                one = [(encode_v2(x[i:i + 1], cfg, start=i).to_bytes()) for i in range(16)]
            finally:
                v2_device.kernel = orig_kernel
                torch.cuda.device = torch_cuda_device
    finally:
        glue._C, glue._require_cuda, glue._stream = real
    same = host.to_bytes() == emu.to_bytes()
    one_same = sum(b == encode_v2(x[i:i + 1], cfg, start=i).to_bytes() for i, b in enumerate(one))
    print(f"{name} split {split}: T=512 d={x.shape[1]} bf16, center offsets {host.center_offset is not None}, "
          f"escapes {host.escapes.numel()}, raw {int(host.raw.sum())}, frame {len(host.to_bytes())} B, "
          f"device-pass bytes identical: {same}; one-token frames (start 0-15) identical: {one_same}/16 "
          f"({time.time() - t0:.1f} s emulated)", flush=True)
