"""The main job's decode steps (`splitkernels demo`'s model, split, codec and gRPC loopback) with the
edge's cast to the wire dtype (where the runtime still calls `to_wire` itself) and its encode call
timed apart, each as the runtime calls it: right after the edge's forward pass, caches cold.

    python bench/results/codec_v2/s72/demo_step_parts.py [demo flags]

Prints the median decode-step components of 5 generations of 20 tokens and the medians of the
one-token parts in microseconds.
"""
import statistics as st
import sys
import time

from demo_split import demo_split  # imports splitkernels.runtime.split_model, the module patched below
from splitkernels.codec.rate import session_encoder
from splitkernels.runtime.grpc_transport import GrpcServer, GrpcTransport

smod = sys.modules["splitkernels.runtime.split_model"]
parts = {"to_wire": [], "encode": []}
cast = smod.to_wire


def to_wire(h, dtype):
    t0 = time.perf_counter()
    out = cast(h, dtype)
    parts["to_wire"].append((h.shape[0], time.perf_counter() - t0))
    return out


def timed_encoder(codec, *args):
    enc = session_encoder(codec, *args)

    def run(x, *a):
        t0 = time.perf_counter()
        frame = enc(x, *a)
        parts["encode"].append((x.shape[0], time.perf_counter() - t0))
        return frame
    return run


smod.to_wire, smod.session_encoder = to_wire, timed_encoder
args, loaded, sm = demo_split(sys.argv[1:])
ids = loaded.encode_prompt(args.prompt)
server = GrpcServer(sm.manager, "127.0.0.1", 0, token="t", info={})
server.start()
transport = GrpcTransport(server.address, token="t", timeout_s=60.0)
sm.run(ids, 2, transport=transport)  # warm-up, as the demo does
for v in parts.values():
    v.clear()
runs = [sm.run(ids, 20, transport=transport).metrics.summary()["decode_mean"] for _ in range(5)]
print("decode step ms:", {k: round(st.median(r[k] for r in runs) * 1e3, 3) for k in runs[0]})
print("one-token parts us:", {k: round(st.median(t for n, t in v if n == 1) * 1e6, 1) for k, v in parts.items() if v})
transport.close()
server.stop()
