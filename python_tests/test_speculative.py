"""Speculative decoding across the split: greedy output equal to ``model.generate`` with any
drafter (including ones that are mostly wrong, so every rollback path runs), the sampling rule's
output distribution, KV cache rollback, VERIFY/VERDICT messages, adaptive k and the planner model."""
from __future__ import annotations

import math

import pytest
import torch

from runtime_helpers import family_model, prompt as _prompt, sliding_window_models
from splitkernels.models import FAMILIES, tiny_model
from splitkernels.nn import QuantConfig
from splitkernels.planner import ModelShape, Roofline, get_device
from splitkernels.planner.costs import LatencyEstimate, layer_weight_bytes
from splitkernels.planner.speculation import (
    DraftOption, choose_speculation, draft_model_option, round_costs,
    best_draft_length, expected_tokens_per_round, speculative_token_s, tokens_per_second,
)
from splitkernels.runtime import LinkEmulator, SplitError, Status, split_model
from splitkernels.runtime.drafting import (
    NATIVE_FEED_MAX, ChainDrafter, Drafter, DraftPolicy, EarlyExitDrafter, ModelDrafter, PromptLookupDrafter,
)
from splitkernels.runtime.metrics import StepMetrics
from splitkernels.runtime.protocol import (
    Open, ProtocolError, SamplingParams, Step, Verdict, Verify, decode_message, encode_message,
)
from splitkernels.runtime.sampling import probabilities
from splitkernels.runtime.speculative import speculate
from splitkernels.runtime.verify import enable_rollback, truncate_cache, verify_drafts

NUM_LAYERS = 4
try:  # the native decode step needs the C++ extension (CI always builds it)
    import splitkernels._C  # noqa: F401
    NATIVE = True
except ImportError:
    NATIVE = False


def _hf_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)


class NoisyOracle(Drafter):
    """Drafts the true continuation but replaces each token with a wrong one with probability
    ``error``: accepted prefixes of every length, so rollback runs at every offset."""

    name = "noisy-oracle"

    def __init__(self, truth: list[int], error: float, seed: int, vocab: int = 256) -> None:
        self.truth, self.error, self.vocab = truth, error, vocab
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, context, k, last_hidden):
        start = len(context)
        out = []
        for t in self.truth[start:start + k]:
            if float(torch.rand((), generator=self.g)) < self.error:
                t = (t + 1 + int(torch.randint(0, self.vocab - 1, (), generator=self.g))) % self.vocab
            out.append(t)
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_generate_with_every_drafter(family):
    model = tiny_model(family, seed=3, num_layers=NUM_LAYERS)
    eos = model.generation_config.eos_token_id
    ids = _prompt(7, 11)
    ids = torch.cat([ids, ids[:, :5]], dim=1)  # something for prompt lookup to find
    expected = _hf_greedy(model, ids, 16)
    truth = expected[0].tolist()
    sm = split_model(model, 2)
    cases = [("lookup", None), ("early-exit", 2), ("lookup+early-exit", None), ("draft-model", 3),
             ("lookup+draft-model", None), (NoisyOracle(truth, 0.3, 1), 5),
             (NoisyOracle(truth, 0.3, 2), 2), (NoisyOracle(truth, 1.0, 3), 1)]
    _speculate_cases(sm, ids, expected, eos, cases)


def _speculate_cases(sm, ids, expected, eos, cases) -> None:
    partial = 0
    for drafter, k in cases:
        result = speculate(sm, ids, 16, drafter=drafter, k=k, eos_token_id=eos)
        assert torch.equal(result.sequences, expected), (drafter, k)
        partial += sum(0 < r.accepted < r.drafted for r in result.metrics.rounds)
        assert sm.manager.num_sessions == 0
    assert partial > 0  # some round kept part of its drafts: the rollback was exercised mid-draft


def test_eager_layers_verify_drafts_through_the_native_head_in_one_pass():
    # CTRL's layers stay eager: its server verifies a round's drafts through the native head's
    # argmax of every draft row in one pass.
    model = family_model("ctrl")
    eos = model.generation_config.eos_token_id
    ids = _prompt(7, 11, vocab=128)
    ids = torch.cat([ids, ids[:, :5]], dim=1)
    expected = _hf_greedy(model, ids, 16)
    truth = expected[0].tolist()
    sm = split_model(model, 2)
    assert not sm.server.fast and sm.server.native_head is not None
    rows = []
    top_rows = sm.server.native_head.top_rows
    sm.server.native_head.top_rows = lambda h, k: rows.append(h.shape[0]) or top_rows(h, k)
    oracles = [(NoisyOracle(truth, error, seed, vocab=128), k) for error, seed, k in ((0.3, 1, 5), (1.0, 3, 1))]
    _speculate_cases(sm, ids, expected, eos, [("lookup", None), ("draft-model", 3), *oracles])
    assert any(n > 1 for n in rows), rows


@pytest.mark.parametrize("split", [1, 3])
def test_greedy_equals_generate_with_sliding_windows(split):
    models = sliding_window_models(NUM_LAYERS, window=5)
    ids = _prompt(10, 9)
    for model in models:
        expected = _hf_greedy(model, ids, 16)
        sm = split_model(model, split)
        # k = 6 drafts plus the decided token exceed the window of 5: rollback past the window.
        for drafter in (NoisyOracle(expected[0].tolist(), 0.4, 3), "lookup+early-exit"):
            got = speculate(sm, ids, 16, drafter=drafter, k=6).sequences
            assert torch.equal(got, expected), (model.config.model_type, split, drafter)


def test_lossy_codec_speculation_matches_one_token_steps():
    from splitkernels.codec import CodecConfig

    model = tiny_model("llama", seed=4, num_layers=NUM_LAYERS, hidden=128)
    sm = split_model(model, 2, codec=CodecConfig(eps=0.03))
    ids = _prompt(2, 12)
    plain = sm.generate(ids, 12)
    got = speculate(sm, ids, 12, drafter=NoisyOracle(plain[0].tolist(), 0.0, 0), k=4)
    # Every draft is the split's own greedy choice: all accepted, 5 tokens per round after the prefill.
    assert torch.equal(got.sequences, plain)
    assert [r.new_tokens for r in got.metrics.rounds] == [1, 5, 5, 1]
    assert got.metrics.summary()["acceptance_rate"] == 1.0


def test_drafter_takes_the_prompt_in_the_prefill_round():
    class Recording(NoisyOracle):
        def prepare(self, context):
            self.prepared.append((list(context), len(self.rounds_seen)))

        def propose(self, context, k, last_hidden):
            self.rounds_seen.append(len(context))
            return super().propose(context, k, last_hidden)

    sm = split_model(tiny_model("llama", seed=4, num_layers=NUM_LAYERS), 2)
    ids = _prompt(3, 7)
    plain = sm.generate(ids, 8)
    drafter = Recording(plain[0].tolist(), 0.0, 0)
    drafter.rounds_seen, drafter.prepared = [], []
    assert torch.equal(speculate(sm, ids, 8, drafter=drafter, k=3).sequences, plain)
    assert drafter.prepared == [(ids[0].tolist(), 0)]  # once, with the prompt, before any proposal


def test_eos_inside_accepted_drafts_stops_there():
    model = tiny_model("gpt2", seed=5, num_layers=2)
    sm = split_model(model, 1)
    ids = _prompt(3, 6)
    plain = sm.generate(ids, 10)[0].tolist()
    eos = plain[6 + 3]  # the fourth new token
    expected = sm.generate(ids, 10, eos_token_id=eos)
    got = speculate(sm, ids, 10, drafter=NoisyOracle(plain, 0.0, 0), k=6, eos_token_id=eos)
    assert torch.equal(got.sequences, expected)
    assert got.sequences[0, -1] == eos


def _empirical(sample_fn, runs: int, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for i in range(runs):
        counts[sample_fn(i)] += 1
    return counts / runs


@pytest.mark.parametrize("with_q", [False, True])
def test_speculative_sampling_rule_keeps_the_distribution(with_q):
    """The first token out of a round is distributed as ``p`` whatever the drafts: total variation
    between the empirical and exact distribution stays within sampling noise."""
    vocab, runs = 12, 6000
    g0 = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g0) * 1.5
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=8)
    p = probabilities(logits, params)
    q = torch.softmax(torch.randn(2, vocab, generator=g0), -1)
    gen = torch.Generator().manual_seed(1)

    def first_token(i: int) -> int:
        if with_q:
            drafts = [int(torch.multinomial(q[0], 1, generator=gen)), int(torch.multinomial(q[1], 1, generator=gen))]
        else:
            drafts = [i % vocab, 3]  # deterministic drafts, often outside top-k
        accepted, token = verify_drafts(logits, drafts, params, gen, q if with_q else None)
        return drafts[0] if accepted > 0 else token

    freq = _empirical(first_token, runs, vocab)
    tv = 0.5 * float((freq - p[0]).abs().sum())
    # E[TV] ~ sum sqrt(p(1-p)/(2 pi n)); 0.035 is several standard deviations above it for n = 6000.
    assert tv < 0.035, tv
    assert float(freq[p[0] == 0].sum()) == 0.0  # never a token top-k removed


def test_sampled_generation_matches_one_token_sampling_in_distribution():
    """Short sampled generations through the split, speculative vs one token per step: the joint
    distribution of the first three new tokens agrees (total variation within noise)."""
    model = tiny_model("llama", seed=8, num_layers=2, hidden=32, vocab=16)
    sm = split_model(model, 1)
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    runs = 300
    kw = dict(do_sample=True, temperature=1.5, top_k=4)

    def hist(gen_fn) -> dict:
        h: dict = {}
        for seed in range(runs):
            key = tuple(gen_fn(seed)[0, 5:].tolist())
            h[key] = h.get(key, 0) + 1
        return h

    plain = hist(lambda s: sm.generate(ids, 2, seed=s, **kw))
    spec = hist(lambda s: speculate(sm, ids, 2, drafter="lookup+early-exit", k=2, seed=10_000 + s, **kw).sequences)
    keys = set(plain) | set(spec)
    tv = 0.5 * sum(abs(plain.get(k, 0) - spec.get(k, 0)) for k in keys) / runs
    # Two independent histograms of 300 over at most 16 outcomes: TV noise is about 0.1.
    assert tv < 0.2, tv


def test_verify_rule_greedy_and_checks():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    greedy = SamplingParams()
    assert verify_drafts(logits, [1, 0], greedy) == (2, 2)
    assert verify_drafts(logits, [1, 2], greedy) == (1, 0)
    assert verify_drafts(logits, [2, 0], greedy) == (0, 1)
    assert verify_drafts(logits[:1], [], greedy) == (0, 1)
    with pytest.raises(ValueError, match="logits must be"):
        verify_drafts(logits, [1], greedy)
    with pytest.raises(ValueError, match="draft_probs"):
        verify_drafts(logits, [1, 0], SamplingParams(do_sample=True), None, torch.ones(1, 3))


def test_truncate_cache_drops_the_rejected_positions():
    model = tiny_model("llama", seed=1, num_layers=2)
    sm = split_model(model, 1)
    ids = _prompt(4, 9)
    cache = sm.edge.new_cache()
    enable_rollback(cache)
    full = sm.edge.forward(ids, cache, 0)
    truncate_cache(cache, 6)
    assert cache.get_seq_length(0) == 6
    # Re-running the dropped positions gives what the full pass gave.
    again = sm.edge.forward(ids[:, 6:], cache, 6)
    assert torch.allclose(again, full[6:], atol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_cache(cache, 10)


@pytest.mark.parametrize("msg", [
    Verify(7, 3, (1, 2, 2**32 - 1), b"frame-bytes"),
    Verify(1, 0, (), b"x"),
    Verdict(9, 4, 2, 17, 30, 0.5, 0.25, 1 << 40),
])
def test_verify_messages_round_trip_and_truncation(msg):
    data = encode_message(msg)
    assert decode_message(data) == msg
    for cut in range(1, len(data)):
        if isinstance(msg, Verify) and cut >= len(data) - len(msg.frame):
            continue  # a shorter frame is still a well-formed message; the codec checks the frame
        with pytest.raises(ProtocolError):
            decode_message(data[:cut])


def test_verify_is_checked_and_old_steps_still_work():
    from splitkernels.codec import CodecConfig, encode

    model = tiny_model("qwen2", seed=2, num_layers=2)
    sm = split_model(model, 1)
    m = sm.manager
    opened = m.open(Open(SamplingParams()))
    sid = opened.session_id
    ids = _prompt(5, 4)
    frame = encode(sm.edge.forward(ids, None, 0), CodecConfig.passthrough()).to_bytes()
    with pytest.raises(SplitError, match="4 drafts need at least 5") as e:
        m.verify(Verify(sid, 0, (1, 2, 3, 4), frame))
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(SplitError, match="draft token ids"):
        m.verify(Verify(sid, 0, (1, 999), frame))
    v = m.verify(Verify(sid, 0, (5, 6), frame))  # rejected or not, the session moves on consistently
    assert v.position == 2 + v.accepted and 0 <= v.accepted <= 2
    one = encode(sm.edge.forward(torch.tensor([[v.token]]), None, 0), CodecConfig.passthrough()).to_bytes()
    reply = m.step(Step(sid, 1, one))  # a plain step after a verify
    assert reply.position == v.position + 1
    m.close(sid)


def test_link_emulator_charges_one_round_trip_per_round():
    model = tiny_model("llama", seed=6, num_layers=2)
    sm = split_model(model, 1)
    link = LinkEmulator(sm.transport, bandwidth_bps=1e9, rtt_s=0.5, sleep=False)
    ids = _prompt(4, 5)
    plain = sm.generate(ids, 9)
    result = speculate(sm, ids, 9, drafter=NoisyOracle(plain[0].tolist(), 0.0, 0), k=4, transport=link)
    assert torch.equal(result.sequences, plain)
    assert len(result.metrics.steps) == 3  # prefill, then two rounds of 4 drafts + 1
    for s in result.metrics.steps:
        assert 0.5 <= s.link_s <= s.total_s
    summary = result.metrics.summary()
    assert summary["tokens_per_round_trip"] == 4.0
    assert summary["per_token"]["link_s"] == pytest.approx(sum(s.link_s for s in result.metrics.steps[1:]) / 8)


def test_transport_without_verify_says_so():
    from splitkernels.runtime.transport import Exchange, SessionHandle, Transport

    class OneTokenOnly(Transport):
        def open(self, request):
            class H(SessionHandle):
                session_id, max_seq_len = 1, 100

                def step(self, seq, frame) -> Exchange:
                    raise AssertionError("not reached")

                def close(self):
                    pass
            return H()

    sm = split_model(tiny_model("llama", seed=1, num_layers=2), 1)
    with pytest.raises(SplitError, match="multi-token"):
        speculate(sm, _prompt(1, 3), 3, transport=OneTokenOnly())


def test_prompt_lookup_and_chain_drafters():
    d = PromptLookupDrafter(max_ngram=3)
    assert d.propose([5, 6, 7, 8, 9, 5, 6, 7], 3, None) == [8, 9, 5]
    assert d.propose([1, 2, 3, 1, 2, 4, 1, 2], 2, None) == [4, 1]  # the latest match wins
    assert d.propose([1, 2, 3], 2, None) == []
    assert d.propose([4], 2, None) == []
    head = lambda h: torch.nn.functional.one_hot(torch.tensor([[7]]), 10).float()  # noqa: E731
    chain = ChainDrafter(d, EarlyExitDrafter(head))
    assert chain.propose([1, 2, 3], 4, torch.zeros(4)) == [7]
    assert chain.propose([1, 2, 3], 4, None) == []  # the early exit waits for the hidden state
    assert chain.propose([1, 2, 1], 4, torch.zeros(4)) == [2, 1]
    assert chain.name == "lookup+early-exit"
    with pytest.raises(ValueError, match="max_ngram"):
        PromptLookupDrafter(max_ngram=0)
    with pytest.raises(TypeError, match="head"):
        EarlyExitDrafter(None)


@pytest.mark.parametrize("family,fast", [("llama", True), ("llama", False), ("gpt2", True), ("opt", True)])
def test_model_drafter_continues_greedily_and_rewinds(family, fast):
    model = tiny_model(family, seed=5, num_layers=NUM_LAYERS)
    ids = _prompt(9, 13)
    truth = _hf_greedy(model, ids, NATIVE_FEED_MAX + 8)[0].tolist()
    d = ModelDrafter(model, fast=fast)  # the model itself as its own draft: every draft is the greedy token
    # The native step covers these families' layers (when the extension is built); GPT-2's and OPT's
    # one-token steps add the learned position embedding of each cached length.
    assert (d.native is not None) == (fast and NATIVE), d.fast_reason
    n = ids.shape[1]
    assert d.propose(truth[:n], 4, None) == truth[n:n + 4]
    assert d.propose(truth[:n + 2], 3, None) == truth[n + 2:n + 5]  # reuses the cache past a partial accept
    assert d.propose(truth[:n + 1], 2, None) == truth[n + 1:n + 3]  # shorter context: cut back
    other = truth[:n - 3] + [(truth[n - 3] + 1) % 256]
    expected = _hf_greedy(model, torch.tensor([other]), 3)[0].tolist()[len(other):]
    assert d.propose(other, 3, None) == expected  # a diverged context
    assert d.propose(truth[:n + 6], 1, None) == [truth[n + 6]]  # a few new tokens: one-token steps
    far = n + NATIVE_FEED_MAX + 4
    assert d.propose(truth[:far], 1, None) == [truth[far]]  # more than NATIVE_FEED_MAX: one eager forward
    assert d.propose(truth[:n + 3], 1, None) == [truth[n + 3]]  # cut back inside that cache
    # prepare() takes the prompt in, so the first proposal only continues it.
    fresh = ModelDrafter(model, fast=fast)
    fresh.prepare(truth[:n])
    assert fresh._tokens == truth[:n] and fresh.propose(truth[:n], 2, None) == truth[n:n + 2]
    assert d.propose(truth[:n + 5], 0, None) == [] and d.propose([], 2, None) == []
    with pytest.raises(TypeError, match="nn.Module"):
        ModelDrafter(object())


def test_draft_model_drafter_needs_the_whole_model():
    from splitkernels.runtime.speculative import make_drafter

    sm = split_model(tiny_model("llama", seed=1, num_layers=NUM_LAYERS), 2)
    sm.edge.adapter.layers[3] = None  # as an edge-only process that dropped the server's layers
    with pytest.raises(ValueError, match="whole model"):
        make_drafter("draft-model", sm.edge)
    with pytest.raises(ValueError, match="drafter must be one of"):
        make_drafter("oracle", sm.edge)


def _step(rows: int, total: float, server: float = 0.001) -> StepMetrics:
    return StepMetrics(tokens=rows, edge_compute_s=0.001 * rows, encode_s=0.0, frame_bytes=100, bytes_up=120,
                       bytes_down=40, link_s=total - 0.001 * rows - server, decode_s=0.0,
                       server_compute_s=server, total_s=total)


def test_draft_policy_adapts_to_acceptance_and_round_trip():
    fast_link, slow_link = DraftPolicy(k_max=8), DraftPolicy(k_max=8)
    for _ in range(30):
        fast_link.observe(4, 4, _step(5, 0.006), 0.0)
        slow_link.observe(4, 4, _step(5, 0.055), 0.0)
    assert fast_link.acceptance > 0.9
    assert slow_link.k() == 8  # drafts always right, round trip dear: send as many as allowed
    bad = DraftPolicy(k_max=8, probe_every=4)
    ks = []
    for _ in range(32):
        bad.observe(4, 0, _step(5, 0.055), 0.04)  # 10 ms per draft: dear at this acceptance
        ks.append(bad.k())
    assert bad.acceptance < 0.1
    assert ks.count(1) == 8 and ks.count(0) == 24  # drafting does not pay; a probe every 4th round
    assert DraftPolicy(fixed_k=3).k() == 3
    with pytest.raises(ValueError, match="k_min"):
        DraftPolicy(k_min=5, k_max=2)


def test_planner_model_of_tokens_per_round():
    assert expected_tokens_per_round(0.0, 5) == 1.0
    assert expected_tokens_per_round(1.0, 5) == 6.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    # Monte Carlo check of the closed form.
    g = torch.Generator().manual_seed(0)
    alpha, k, n = 0.7, 4, 20000
    ok = torch.rand(n, k, generator=g) < alpha
    accepted = torch.cumprod(ok.int(), dim=1).sum(1).float()
    assert float((accepted + 1).mean()) == pytest.approx(expected_tokens_per_round(alpha, k), rel=0.02)
    assert best_draft_length(0.9, 0.05, 0.001, 16) > best_draft_length(0.9, 0.005, 0.001, 16)
    assert best_draft_length(0.0, 0.05, 0.001, 16) == 0
    assert tokens_per_second(0.8, 3, 0.02, 0.002) == pytest.approx(expected_tokens_per_round(0.8, 3) / 0.026)
    lat = LatencyEstimate(edge_s=0.001, encode_s=0.0, transfer_s=0.0005, rtt_s=0.05, decode_s=0.0, server_s=0.002,
                          ttft_s=0.1, token_bytes=300, prompt_bytes=1000)
    assert speculative_token_s(lat, 0.0, 0) == pytest.approx(lat.token_s)
    assert speculative_token_s(lat, 0.8, 4) < lat.token_s / 2
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_round(1.5, 2)
    assert math.isfinite(speculative_token_s(lat, 1.0, 8))


def test_speculation_over_grpc_equals_in_process():
    from splitkernels.runtime.grpc_transport import GrpcServer, GrpcTransport

    model = tiny_model("llama", seed=21, num_layers=2, hidden=32)
    sm = split_model(model, 1)
    server = GrpcServer(sm.manager, token="t").start()
    try:
        with GrpcTransport(server.address, token="t") as client:
            ids = _prompt(1, 7)
            ids = torch.cat([ids, ids], dim=1)
            expected = _hf_greedy(model, ids, 12)
            assert torch.equal(speculate(sm, ids, 12, drafter="lookup+early-exit", transport=client).sequences,
                               expected)
            kw = dict(drafter="lookup+early-exit", k=3, do_sample=True, top_k=20, seed=4)
            # Seeded sampling is reproducible: the same drafts and draws over either transport.
            assert torch.equal(speculate(sm, ids, 12, transport=client, **kw).sequences,
                               speculate(sm, ids, 12, **kw).sequences)
    finally:
        server.stop(0)


def test_planner_chooses_the_drafter_and_k():
    lat = LatencyEstimate(edge_s=0.004, encode_s=0.0, transfer_s=0.0005, rtt_s=0.02, decode_s=0.0, server_s=0.002,
                          ttft_s=0.1, token_bytes=300, prompt_bytes=1000)
    fixed, per_draft = round_costs(lat)
    options = [DraftOption("lookup", 0.2), DraftOption("model", 0.9, draft_s=0.006, edge_bytes=10**8)]
    choice = choose_speculation(lat, options, k_max=8)
    # Brute force over every option and k: the choice is the minimum (and beats no speculation).
    costs = {(o.name, k): (fixed + k * (per_draft + o.draft_s)) / expected_tokens_per_round(o.acceptance, k)
             for o in options for k in range(1, 9)}
    (name, k), best = min(costs.items(), key=lambda kv: kv[1])
    assert (choice.drafter, choice.k) == (name, k) and choice.token_s == pytest.approx(best)
    assert best < lat.token_s
    assert choice.tokens_per_round == pytest.approx(expected_tokens_per_round(0.9, k))
    # Without memory for the draft model the lookup drafter (or nothing) remains.
    assert choose_speculation(lat, options, edge_bytes_free=10**6).drafter in ("lookup", None)
    # Drafts nobody accepts never pay.
    none = choose_speculation(lat, [DraftOption("never", 0.0, draft_s=0.001)])
    assert (none.drafter, none.k, none.token_s) == (None, 0, lat.token_s)
    with pytest.raises(ValueError, match="alpha"):
        DraftOption("bad", 1.2)
    with pytest.raises(ValueError, match="draft_s"):
        DraftOption("bad", 0.5, draft_s=-1.0)


def test_draft_model_option_costs_every_layer_and_the_head():
    shape = ModelShape.from_config(tiny_model("llama", seed=0, num_layers=4).config)
    edge = Roofline(get_device("jetson-orin-nano-8gb"), shape)
    option = draft_model_option(shape, edge, 4, 0.8, 128)
    quant = QuantConfig(bits=4, group_size=32)
    assert option.draft_s == pytest.approx(4 * edge.layer_s(quant, 1, 128) + edge.head_s(1))
    assert option.edge_bytes > shape.num_layers * layer_weight_bytes(shape, quant)
    assert option.name == "draft-model 4-bit" and option.acceptance == 0.8


@pytest.mark.parametrize("error", [0.0, 0.3])
def test_drafting_during_the_round_trip(error):
    import threading

    class Threads(NoisyOracle):
        def propose(self, context, k, last_hidden):
            self.calls.append(threading.current_thread().name.startswith("drafter"))
            return super().propose(context, k, last_hidden)

    sm = split_model(tiny_model("llama", seed=4, num_layers=NUM_LAYERS), 2)
    ids = _prompt(5, 7)
    plain = sm.generate(ids, 20)
    runs = {}
    for overlap in (False, True):
        drafter = Threads(plain[0].tolist(), error, seed=3)
        drafter.calls = []
        runs[overlap] = speculate(sm, ids, 20, drafter=drafter, k=3, overlap=overlap)
        assert torch.equal(runs[overlap].sequences, plain)  # wrong guesses and wrong drafts alike
        if not overlap:
            assert not any(drafter.calls)
        elif error == 0.0:
            # Every guess of the server's token is right: after the first round, every round's
            # drafts were proposed in the background while the previous round was away.
            assert drafter.calls[0] is False and drafter.calls.count(False) == 1 and sum(drafter.calls) >= 3
        else:
            assert True in drafter.calls
    if error == 0.0:  # (with noise, the extra background proposals draw other noise)
        assert [r.new_tokens for r in runs[True].metrics.rounds] == [r.new_tokens for r in runs[False].metrics.rounds]
