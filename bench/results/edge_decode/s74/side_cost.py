"""Startup of an edge process: split_model(..., side="edge") against the old way (both halves
built, then the server released). One model load per process; prints seconds and peak RSS."""
import resource, sys, time
import torch
from splitkernels.models import load_model
from splitkernels.runtime.split_model import split_model
how, model_name, split = sys.argv[1], sys.argv[2], int(sys.argv[3])
loaded = load_model(model_name)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "old":
    sm = split_model(loaded.model, split)
    sm.release("server")
else:
    sm = split_model(loaded.model, split, side="edge")
dt = time.perf_counter() - t
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{how} {model_name} split {split}: split_model {dt*1e3:.0f} ms, peak RSS {rss0/1024:.0f} -> {rss1/1024:.0f} MiB (+{(rss1-rss0)/1024:.0f})")
