"""The native decode step of M sequences at once (``NativeDecoder.step_batch``): each row's
outputs, cache, top k and logits are bit-identical to the one-sequence step on that row alone,
for sequences of different lengths, dense / low-bit layers, int8 / fp32 heads and every ISA;
bad input is refused before anything runs."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import splitkernels._C as _C
from runtime_helpers import family_model
from splitkernels.fastpath import NativeDecoder
from splitkernels.models import tiny_model
from splitkernels.nn import replace_linear


def _model(family: str = "llama", bits: int | None = None, hidden: int = 48):
    heads = 4 if hidden % 8 == 0 else 2  # even head sizes (rotary halves)
    model = tiny_model(family, seed=11, num_layers=3, hidden=hidden, vocab=112, heads=heads)
    with torch.no_grad():  # near-tied head rows: the int8 head's exact fix-up must order them
        w = model.lm_head.weight
        w[1::2] = w[0::2] + 1e-4 * torch.randn_like(w[0::2])
    if bits:
        replace_linear(model, bits=bits, group_size=16, filter=lambda name, _: "lm_head" not in name, progress=False)
    return model


def _caches(decoder: NativeDecoder, model, lengths: list[int], gen: torch.Generator) -> list:
    """Caches holding ``lengths`` positions each, from random hidden states run natively (the
    same states for two copies: one for the batched step, one for the steps alone)."""
    d = model.config.hidden_size
    pairs = []
    for n in lengths:
        pair = [decoder.new_cache(lambda: DynamicCache(config=model.config), min_capacity=4) for _ in range(2)]
        for _ in range(n):
            h = torch.randn(d, generator=gen)
            for c in pair:
                decoder.step(h, c)
        pairs.append(pair)
    return pairs


@pytest.mark.parametrize("family, bits, head, hidden", [("llama", None, "int8", 48), ("qwen2", None, "int8", 48),
                                                         ("mistral", None, "fp32", 48), ("llama", 4, "int8", 48),
                                                         ("llama", None, "fp32", 36), ("gemma3", None, "int8", 48),
                                                         ("gemma2", None, "int8", 48), ("qwen3", None, "fp32", 48)])
def test_step_batch_rows_equal_the_step_alone(family, bits, head, hidden):
    # hidden 36 and MLP 72: dense rows with K tails past 8 and 16 lanes (one row's rows in order,
    # more rows' tiles).
    model = _model(family, bits, hidden)
    decoder = NativeDecoder(model, 1, 3, head=head)
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 5, 1, 13, 4, 7, 2]  # 7 rows: full and partial tiles; capacities 4..16 (grown)
    pairs = _caches(decoder, model, lengths, gen)
    before = _C.lowbit_isa()
    try:
        for step, isa in enumerate(_C.lowbit_isas()):
            _C.set_lowbit_isa(isa)
            hidden = torch.randn(len(lengths), model.config.hidden_size, generator=gen) * (1 + step)
            k = 9
            out, ids, vals, logits = decoder.step_batch(hidden, [p[0] for p in pairs], k, logits=True)
            for m, pair in enumerate(pairs):
                alone = pair[1]
                assert pair[0].length == alone.length + 1
                full = torch.empty(decoder.vocab)
                h_alone, token = decoder.step(hidden[m], alone, full)
                assert torch.equal(out[m], h_alone), (isa, m)
                assert torch.equal(logits[m], full), (isa, m)
                assert int(ids[m, 0]) == token
                alone.truncate(alone.length - 1)
                _, top_ids, top_vals = decoder.step_top(hidden[m], alone, k)
                assert torch.equal(ids[m], top_ids) and torch.equal(vals[m], top_vals), (isa, m)
                n = alone.length
                assert torch.equal(pair[0].static(n)[0][:, :, :, :n], alone.static(n)[0][:, :, :, :n])
            # without full logits the int8 head's W8A8 pass picks the rows: the same top k
            for pair in pairs:
                pair[0].truncate(pair[0].length - 1)
            _, ids2, vals2, none = decoder.step_batch(hidden, [p[0] for p in pairs], k)
            assert none is None and torch.equal(ids2, ids) and torch.equal(vals2, vals)
    finally:
        _C.set_lowbit_isa(before)


@pytest.mark.parametrize("family", ["ministral3", "granite", "phi3", "glm4", "hyperclovax", "phi", "cohere2",
                                    "qwen2_moe", "bloom", "codegen", "gpt_oss"])
def test_step_batch_rows_of_other_families_equal_the_step_alone(family):
    # Ministral 3's query scale depends on each row's own position (a period of 3 here), Granite's
    # logits are divided after the native top k (HyperCLOVA X's multiplied), Phi-3's projections
    # are row ranges of fused ones, GLM 4 turns half of each head (partial rotary), Phi's and
    # Cohere 2's layers are parallel over LayerNorms, Qwen 2 MoE's rows pick their own experts (as
    # gpt-oss's, input-major), BLOOM's ALiBi reads each row's own length, CodeGen's qkv scatters.
    model = family_model(family)
    decoder = NativeDecoder(model, 1, 4, head="int8")
    pairs = _caches(decoder, model, [0, 7, 2, 11], torch.Generator().manual_seed(5))
    hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    out, ids, vals, logits = decoder.step_batch(hidden, [p[0] for p in pairs], 6, logits=True)
    for m, (_, alone) in enumerate(pairs):
        full = torch.empty(decoder.vocab)
        h_alone, token = decoder.step(hidden[m], alone, full)
        assert torch.equal(out[m], h_alone) and torch.equal(logits[m], full) and int(ids[m, 0]) == token
        assert torch.equal(vals[m], full[ids[m]])  # the top k's values are the transformed logits


def test_step_batch_of_one_and_threads_agree():
    model = _model()
    decoder = NativeDecoder(model, 0, 3, head="int8")
    before = _C.num_threads()
    results = []
    try:
        for threads in (1, 2):
            _C.set_num_threads(threads)
            pairs = _caches(decoder, model, [30, 3, 0, 17], torch.Generator().manual_seed(1))
            hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
            stats = _C.team_stats()
            results.append(decoder.step_batch(hidden, [p[0] for p in pairs], 5)[:3])
            # The step's phases run on the pool, never on torch's OpenMP team (decode.cpp says why).
            assert _C.team_stats()["team_calls"] == stats["team_calls"]
            assert _C.team_stats()["pool_calls"] > stats["pool_calls"] or threads == 1
            one = decoder.step_batch(hidden[1:2], [pairs[1][1]], 5)
            assert torch.equal(one[0][0], results[-1][0][1]) and torch.equal(one[1][0], results[-1][1][1])
    finally:
        _C.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_threaded_attention_agrees_bit_for_bit():
    # Context enough for the attention to run on the pool (decode.cpp: positions x heads x
    # head_dim >= 2^16). Its units are the query heads of a key/value head while there are at
    # least two per thread (one thread; two threads at two rows), else single query heads (three
    # threads): every way must give the same bits.
    torch.manual_seed(12)
    config = LlamaConfig(vocab_size=112, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=96, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    decoder = NativeDecoder(model, 0, 2, head="fp32")
    before = _C.num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            _C.set_num_threads(threads)
            pairs = _caches(decoder, model, [300, 200], torch.Generator().manual_seed(3))
            hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
            stats = _C.team_stats()
            results.append(decoder.step_batch(hidden, [p[0] for p in pairs], 5, logits=True))
            assert _C.team_stats()["pool_calls"] > stats["pool_calls"] or threads == 1
    finally:
        _C.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_step_batch_rejects_bad_input():
    model = _model()
    decoder = NativeDecoder(model, 0, 3, head="int8")
    new = lambda: decoder.new_cache(lambda: DynamicCache(config=model.config))  # noqa: E731
    a, b = new(), new()
    d = model.config.hidden_size
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 112\]"):
        decoder.step_batch(torch.zeros(2, d), [a, b], 0)
    with pytest.raises(ValueError, match=r"hidden must be \[2, 48\]"):
        decoder.step_batch(torch.zeros(3, d), [a, b], 1)
    with pytest.raises(ValueError, match="at least one"):
        decoder.step_batch(torch.zeros(0, d), [], 1)
    with pytest.raises(ValueError, match="caches must be distinct"):
        decoder.step_batch(torch.zeros(2, d), [a, a], 1)
    with pytest.raises(ValueError, match="needs a decoder with a head"):
        NativeDecoder(model, 0, 3).step_batch(torch.zeros(2, d), [a, b], 1)
    assert a.length == b.length == 0  # refused before the step ran
