"""Which families' servers take their tokens from the native LM head: every causal-LM family
transformers lists, built from a tiny random config as python_tests/test_families.py builds them,
split after layer 2; counts by path and, for the rest, ``Server.head_reason`` with the families.
Usage: python head_census.py"""
import collections
import warnings

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from splitkernels.models.tiny import tiny_config
from splitkernels.runtime import split_model

warnings.simplefilter("ignore")
counts = collections.Counter()
reasons: dict[str, list[str]] = collections.defaultdict(list)
for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
    try:
        config = tiny_config(model_type, num_layers=4, hidden=64, vocab=128)
        if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", True) is False:
            continue
        cls = getattr(transformers, class_name)
        with torch.device("meta"):
            if sum(p.numel() for p in cls(config).parameters()) > 10_000_000:
                continue
        torch.manual_seed(0)
        sm = split_model(cls(config).eval(), 2)
    except Exception:  # noqa: BLE001 -- families the split cannot build at test size (test_families says why)
        continue
    server = sm.server
    path = "native layers" if server.fast else ("native head" if server.native_head is not None else "eager head")
    counts[path] += 1
    if path == "eager head":
        reasons[server.head_reason].append(model_type)
    sm.close()
print(dict(counts))
for reason, families in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
    print(f"{len(families)} {reason}: {', '.join(families)}")
