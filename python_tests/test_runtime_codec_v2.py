"""Codec v2 in the split runtime: the OPEN carries the calibrated config once, the server decodes
the session's v2 frames with it (in process, over the package's gRPC transport and over the .proto
service), and a missing, mismatched or malformed config is refused with one clear error."""
from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

from runtime_helpers import prompt
from splitkernels.codec import CodecConfig, CodecConfigV2, FrameError, config_from_spec, encode, from_bytes
from splitkernels.codec.calibrate import PREDICTION_MIN_SAVING
from splitkernels.codec.predict import EmbeddingPrediction, table_digest
from splitkernels.codec.spec import config_for_model
from splitkernels.models import tiny_model
from splitkernels.nn import QuantConfig
from splitkernels.runtime import SplitConfig, SplitError, Status, split_model
from splitkernels.runtime.grpc_transport import GrpcServer, GrpcTransport
from splitkernels.runtime.protocol import (
    FLAG_CODEC_CONFIG, HEADER, Open, ProtocolError, SamplingParams, decode_message, encode_message,
)
from splitkernels.runtime.proto import split_pb2, split_pb2_grpc
from splitkernels.runtime.split_model import open_request

SPLIT = 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5, num_layers=4, hidden=48)


@pytest.fixture(scope="module")
def calib_ids():
    return prompt(77, 256)[0]


@pytest.fixture(scope="module")
def config(model, calib_ids) -> CodecConfigV2:
    return config_for_model({"kind": "v2", "bits": 4.0, "sensitivity": "fisher", "predict": False}, model, SPLIT, calib_ids,
                            window=128)


@pytest.fixture(scope="module")
def predicting(model, calib_ids) -> CodecConfigV2:
    return config_for_model({"kind": "v2", "bits": 4.0, "sensitivity": "fisher"}, model, SPLIT, calib_ids, window=128)


def _other_config(config: CodecConfigV2) -> CodecConfigV2:
    return dataclasses.replace(config, center=tuple(c + 1e-3 for c in config.center))


def _frame(sm, ids: torch.Tensor, codec) -> bytes:
    return encode(sm.edge.forward(ids, None, 0), codec).to_bytes()


def test_spec_gives_a_calibrated_v2_config(config, model, calib_ids):
    assert isinstance(config, CodecConfigV2) and config.d == 48
    assert config.info["scales"] == "fisher" and abs(config.info["target_bits"] - 4.0) < 1e-9
    uniform = config_for_model({"kind": "v2", "bits": 3.0}, model, SPLIT, calib_ids, window=128)
    assert uniform.info["scales"] == "uniform" and uniform.fingerprint != config.fingerprint
    assert config_from_spec({"kind": "passthrough"}) == CodecConfig.passthrough()
    assert config_from_spec({"kind": "v1", "eps": 0.3}) == CodecConfig(eps=0.3)
    for bad, words in (({"kind": "v3"}, "'kind'"), ({"kind": "v2", "bits": 0.5}, "'bits'"),
                       ({"kind": "v2", "sensitivity": "hessian"}, "'sensitivity'"),
                       ({"kind": "v2", "step": 1}, "not .'step'."), ({"kind": "v1", "nope": 1}, "kind 'v1'"),
                       ("v2", "must be a dict")):
        with pytest.raises(ValueError, match=words):
            config_from_spec(bad, torch.randn(64, 48))
    with pytest.raises(ValueError, match="hidden"):
        config_from_spec({"kind": "v2"})
    with pytest.raises(ValueError, match="Fisher"):
        config_from_spec({"kind": "v2", "sensitivity": "fisher"}, torch.randn(64, 48))


def test_canonical_bytes_round_trip_and_are_checked(config):
    raw = config.canonical_bytes()
    back = CodecConfigV2.from_canonical_bytes(raw)
    assert back == config and back.fingerprint == config.fingerprint
    for bad, words in ((raw[:10], "truncated"), (raw[:-1], "must be"), (raw + b"\0", "must be"),
                       (b"\x09" + raw[1:], "version")):
        with pytest.raises(ValueError, match=words):
            CodecConfigV2.from_canonical_bytes(bad)
    with pytest.raises(ValueError, match="d = 48"):
        CodecConfigV2.from_canonical_bytes(raw, max_d=32)


def test_open_carries_the_config_once_behind_a_flag(config):
    plain = encode_message(Open(SamplingParams(), max_len=9))
    assert HEADER.unpack_from(plain)[3] == 0
    msg = encode_message(open_request(SamplingParams(), bytes(16), 9, config))
    assert HEADER.unpack_from(msg)[3] == FLAG_CODEC_CONFIG
    assert decode_message(msg).codec_config == config.canonical_bytes()
    assert decode_message(plain).codec_config == b""
    corrupt = bytearray(msg)
    corrupt[-1] ^= 1
    with pytest.raises(ProtocolError, match="digest"):
        decode_message(bytes(corrupt))
    short = bytearray(msg[: len(plain) + 8])
    HEADER.pack_into(short, 0, b"SKRP", 1, 1, FLAG_CODEC_CONFIG, 0, len(short) - HEADER.size)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_message(bytes(short))
    step_with_flag = bytearray(encode_message(Open(SamplingParams())))
    HEADER.pack_into(step_with_flag, 0, b"SKRP", 1, 3, FLAG_CODEC_CONFIG, 0, len(step_with_flag) - HEADER.size)
    with pytest.raises(ProtocolError, match="flags"):
        decode_message(bytes(step_with_flag))


@pytest.mark.parametrize("transport", ["in-process", "grpc"])
@pytest.mark.parametrize("codec", ["config", "predicting"])
def test_greedy_v2_generation_runs_through_bytes(model, codec, transport, request):
    config = request.getfixturevalue(codec)
    sm = split_model(model, SplitConfig(SPLIT, codec=config))
    ids = prompt(3, 7)
    if transport == "grpc":
        with GrpcServer(sm.manager) as server, GrpcTransport(server.address) as client:
            result = sm.run(ids, 6, transport=client)
    else:
        result = sm.run(ids, 6)
    new = result.new_tokens
    assert len(new) == 6
    # v2 codes every token on its own, so the teacher-forced split model (edge -> v2 frame bytes ->
    # server, no cache; with a prediction, its ids beside each row) must pick the same greedy
    # tokens as the cached generation did.
    logits = sm(result.sequences[:, :-1])
    assert logits[0, ids.shape[1] - 1:].argmax(-1).tolist() == new
    s = result.metrics.summary()
    assert 1.0 < s["bits_per_element_prefill"] < 12 and 1.0 < s["bits_per_element_decode"] < 12
    if config.prediction is None:
        assert all(step.frame_bytes < 2 * 48 * step.tokens for step in result.metrics.steps)  # smaller than fp16
    else:  # each frame carries its token ids
        assert all(step.frame_bytes > config.prediction.id_bytes(step.tokens) for step in result.metrics.steps)
    sm.close()


def test_proto_service_carries_the_config(model, config):
    sm = split_model(model, SplitConfig(SPLIT, codec=config))
    ids = prompt(4, 5)
    new = sm.generate(ids, 4)[0, 5:].tolist()
    frames, cache, feed, position = [], sm.edge.new_cache(), ids, 0
    for token in new:
        frames.append(encode(sm.edge.forward(feed, cache, position), config).to_bytes())
        position += feed.shape[1]
        feed = torch.tensor([[token]])
    with GrpcServer(sm.manager) as server, grpc.insecure_channel(server.address) as channel:
        stub = split_pb2_grpc.SplitStub(channel)

        def requests(codec_config: bytes):
            yield split_pb2.Request(open=split_pb2.Open(sampling=split_pb2.Sampling(), max_len=16,
                                                        codec_config=codec_config))
            for seq, frame in enumerate(frames):
                yield split_pb2.Request(step=split_pb2.Step(seq=seq, frame=frame))

        replies = list(stub.Session(requests(config.canonical_bytes()), timeout=60))
        assert [r.token.token for r in replies[1:]] == new
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Session(requests(b""), timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CodecConfigV2" in e.value.details()
    sm.close()


def test_missing_mismatched_or_wrong_configs_are_refused(model, config):
    sm = split_model(model, SplitConfig(SPLIT, codec=config))
    other = _other_config(config)
    ids = prompt(5, 4)
    cases = ((b"", _frame(sm, ids, config), "needs the session's CodecConfigV2"),
             (config.canonical_bytes(), _frame(sm, ids, other), "another codec config"))
    for codec_config, frame, words in cases:
        session = sm.transport.open(Open(SamplingParams(), max_len=8, codec_config=codec_config))
        with pytest.raises(SplitError) as e:
            session.step(0, frame)
        assert e.value.status is Status.INVALID_ARGUMENT and words in e.value.message
        assert "\n" not in str(e.value)
        session.close()
    # v1 frames stay accepted in a v2 session.
    with sm.transport.open(open_request(SamplingParams(), bytes(16), 8, config)) as session:
        assert session.step(0, _frame(sm, ids, CodecConfig())).reply.position == 4
    narrow = config_from_spec({"kind": "v2"}, torch.randn(64, 32))
    for raw, words in ((narrow.canonical_bytes(), "d = 32"), (config.canonical_bytes()[:-2], "invalid")):
        with pytest.raises(SplitError) as e:
            sm.transport.open(Open(SamplingParams(), codec_config=raw))
        assert e.value.status is Status.INVALID_ARGUMENT and words in e.value.message
    with pytest.raises(ValueError, match="hidden size"):
        split_model(tiny_model("llama", seed=5, num_layers=4, hidden=32), SplitConfig(SPLIT, codec=config))
    with pytest.raises(FrameError, match="another codec config"):
        from_bytes(_frame(sm, ids, config), other)
    sm.close()


def test_sessions_share_one_parsed_config(model, config):
    sm = split_model(model, SplitConfig(SPLIT, codec=config))
    a = sm.manager.open(open_request(SamplingParams(), bytes(16), 8, config))
    b = sm.manager.open(open_request(SamplingParams(), bytes(16), 8, config))
    assert sm.manager._get(a.session_id).codec is sm.manager._get(b.session_id).codec
    sm.close()


@pytest.mark.parametrize("codec", ["config", "predicting"])
def test_speculative_rounds_carry_v2_frames(model, codec, request):
    from splitkernels.runtime.speculative import speculate

    sm = split_model(model, SplitConfig(SPLIT, codec=request.getfixturevalue(codec)))
    ids = prompt(6, 6)
    plain = sm.generate(ids, 8)
    result = speculate(sm, ids, 8, drafter="early-exit", k=3)
    assert torch.equal(result.sequences, plain)
    assert sum(r.drafted for r in result.metrics.rounds) > 0  # drafts went through the codec (with their ids)
    sm.close()


def _predicting(model, config: CodecConfigV2, gain: float = 0.5) -> CodecConfigV2:
    """``config`` with a token prediction from ``model``'s input table (the tiny model gains little
    from one, so calibration would not keep it: these tests are about carrying it)."""
    table = model.get_input_embeddings().weight
    return dataclasses.replace(config, prediction=EmbeddingPrediction([gain] * config.d, table.shape[0], table_digest(table)))


def test_the_spec_predicts_where_it_pays(predicting, config):
    # The tiny model's split-layer state is still much like its embedding: the prediction pays there.
    assert predicting.prediction is not None and predicting.info["prediction_saving"] >= PREDICTION_MIN_SAVING
    assert predicting.version == 5 and config.prediction is None and "prediction_saving" not in config.info
    with pytest.raises(ValueError, match="'predict' must be true or false"):
        config_from_spec({"kind": "v2", "predict": 1}, torch.randn(8, 4))


def test_a_prediction_from_another_table_is_refused(model, config):
    sm = split_model(model, SplitConfig(SPLIT, codec=config))
    table = model.get_input_embeddings().weight
    foreign = dataclasses.replace(config, prediction=EmbeddingPrediction([0.5] * config.d, table.shape[0], "0" * 64))
    with pytest.raises(SplitError) as e:
        sm.transport.open(open_request(SamplingParams(), bytes(16), 8, foreign))
    assert e.value.status is Status.FAILED_PRECONDITION and "does not match" in e.value.message
    with pytest.raises(ValueError, match="does not match"):
        split_model(model, SplitConfig(SPLIT, codec=foreign))
    sm.close()


def test_a_quantised_embedding_cannot_predict():
    fresh = tiny_model("llama", seed=5, num_layers=4, hidden=48)
    predicting = _predicting(fresh, config_from_spec({"kind": "v2"}, torch.randn(256, 48)))
    with pytest.raises(ValueError, match="no plain table"):
        split_model(fresh, SplitConfig(SPLIT, codec=predicting, front=QuantConfig(bits=4, group_size=16),
                                       quantize_embedding=True))


def test_generation_frames_follow_the_rate_policy(model, config):
    """With a rate policy in the config, the edge's frames move to its bits (scaled frames, which the
    server decodes with the session's config); ``rate_control=False`` keeps the calibrated step."""
    ids = prompt(3, 7)

    def decode_bits(codec, rated: bool) -> float:
        sm = split_model(model, SplitConfig(SPLIT, codec=codec, rate_control=rated))
        steps = sm.run(ids, 12).metrics.steps[2:]  # after the prefill and the first decode step
        sm.close()
        return 8.0 * sum(s.frame_bytes for s in steps) / (len(steps) * 48)

    plain = decode_bits(config, False)
    target = plain - 1.0
    rated_config = dataclasses.replace(config, info={**config.info, "rate": {"bits": target, "finest": 0}})
    assert abs(decode_bits(rated_config, False) - plain) < 1e-9  # rate control off: the calibrated step
    assert abs(decode_bits(rated_config, True) - target) < 0.4
