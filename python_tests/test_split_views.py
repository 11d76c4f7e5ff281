"""The views of :mod:`splitkernels.models.split` whose layers are stand-ins: each stand-in returns
the received hidden state in the form the real layer returns its output (a tensor, or a tuple
with the hidden state first), so the model's own forward indexes or unpacks it as it would the
real layer's. Falcon, Bloom and MPT take ``outputs[0]`` of each layer, Llama (transformers 5) a
bare tensor: the head view (every layer a stand-in, early-exit drafting) gives ``[1, T, V]``
logits equal to the model's own for the same last hidden state, before and after the edge frees
the server's layers, and early-exit speculation on Falcon equals ``model.generate``."""
from __future__ import annotations

import pytest
import torch

from runtime_helpers import family_model, prompt as _prompt
from splitkernels.models import adapter_for, tiny_model
from splitkernels.runtime import split_model
from splitkernels.runtime.speculative import speculate

VOCAB = 128  # family_model's vocabulary
# Falcon, Bloom, MPT and GPT-NeoX-Japanese layers return tuples; Llama's a tensor.
TUPLE_FAMILIES = ["falcon", "bloom", "mpt", "gpt_neox_japanese"]


def _model(family: str):
    return tiny_model("llama", seed=3, vocab=VOCAB) if family == "llama" else family_model(family)


def _last_hidden_and_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last decoder layer's output hidden state ``[1, T, d]`` and the model's logits ``[1, T, V]``."""
    seen = []
    last = adapter_for(model).layers[-1]
    handle = last.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.inference_mode():
            logits = model(ids, use_cache=False).logits
    finally:
        handle.remove()
    return seen[-1], logits


@pytest.mark.parametrize("family", ["llama", *TUPLE_FAMILIES])
def test_head_gives_the_models_own_logits(family):
    model = _model(family)
    ids = _prompt(5, 7, vocab=VOCAB)
    hidden, logits = _last_hidden_and_logits(model, ids)
    adapter = adapter_for(model)
    with torch.inference_mode():
        got = adapter.head(hidden)
        assert got.shape == (1, 7, VOCAB)
        torch.testing.assert_close(got, logits)
        # A random hidden state of a few positions, through a reused head view.
        view = adapter.head_view()
        assert adapter.head(torch.randn(1, 3, adapter.hidden_size), view).shape == (1, 3, VOCAB)


def test_head_after_the_edge_frees_the_servers_layers():
    # An edge process drops the server's layers; the stand-ins' form was learnt from them before.
    model = family_model("falcon")
    ids = _prompt(6, 5, vocab=VOCAB)
    hidden, logits = _last_hidden_and_logits(model, ids)
    sm = split_model(model, 2)
    sm.release("server")
    assert sm.adapter.layers[-1] is None
    with torch.inference_mode():
        torch.testing.assert_close(sm.adapter.head(hidden), logits)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_early_exit_speculation_equals_generate_on_falcon(split):
    model = family_model("falcon")
    eos = model.generation_config.eos_token_id
    ids = _prompt(7, 11, vocab=VOCAB)
    ids = torch.cat([ids, ids[:, :5]], dim=1)  # something for prompt lookup to find
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
    sm = split_model(model, split)
    for drafter, k in (("early-exit", 2), ("early-exit", 4), ("lookup+early-exit", None)):
        result = speculate(sm, ids, 12, drafter=drafter, k=k, eos_token_id=eos)
        assert torch.equal(result.sequences, expected), (drafter, k)
        assert sm.manager.num_sessions == 0
    sm.close()
