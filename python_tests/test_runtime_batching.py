"""Continuous batching: batched decode logits match the unbatched segment, per-session outputs are
identical with batching on and off (greedy and seeded sampling, sessions of different lengths
joining and leaving mid-batch), chunked prefill does not stall decodes, admission refusals, and a
killed gRPC client frees its slot.

Tolerance policy: fp32 tiny models; a batched matmul and a padded attention may round differently
from the one-session path, so logits are compared with ||batched - unbatched|| / ||unbatched||
<= 1e-5 and sampled tokens must be identical."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime_helpers import family_model, prompt as _prompt, wait_for as _wait_for
from splitkernels.codec import CodecConfig, encode
from splitkernels.models import tiny_model
from splitkernels.runtime import Limits, SplitError, Status, split_model
from splitkernels.runtime.batching import BatchConfig, BatchingSessionManager, Scheduler, Work
from splitkernels.runtime.grpc_transport import GrpcServer, GrpcTransport
from splitkernels.runtime.protocol import Open, SamplingParams, Step, Verify
from splitkernels.runtime.transport import InProcessTransport, Transport

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _split(family: str):
    return split_model(tiny_model(family, seed=5, num_layers=3, hidden=32), 1,
                       limits=Limits(max_sessions=16, max_seq_len=256))


@pytest.fixture(scope="module")
def sm():
    return _split("llama")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
@pytest.mark.parametrize("lengths", [[7, 1, 19, 0, 33], [0], [4, 4]])
def test_batched_decode_matches_unbatched(family, lengths):
    """One batched forward over caches of different lengths (0 included) = each session alone."""
    sm = _split(family)
    d = sm.adapter.hidden_size
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randn(n, d, generator=gen) for n in lengths]
    step = torch.randn(len(lengths), 1, d, generator=gen)
    batched_caches, alone_caches = [], []
    for p in prompts:
        for caches in (batched_caches, alone_caches):
            c = sm.server.new_cache()
            if p.shape[0]:
                sm.server.forward(p, c, 0)
            caches.append(c)
    logits = Scheduler(sm.server).forward_decode(list(step), batched_caches, lengths)
    for i, n in enumerate(lengths):
        alone = sm.server.forward(step[i], alone_caches[i], n)
        assert _rel(logits[i], alone) <= RTOL
        assert int(logits[i].argmax()) == int(alone.argmax())
        layer = sm.server.first
        assert batched_caches[i].get_seq_length(layer) == n + 1
        assert _rel(batched_caches[i].layers[layer].keys, alone_caches[i].layers[layer].keys) <= RTOL


def _run_sessions(sm, transport, specs, stagger_s: float):
    """Generate ``specs`` [(prompt, new tokens, sampling kwargs)] concurrently, session i starting
    ``i * stagger_s`` after the first (they join while others decode and leave at different times)."""
    out: list = [None] * len(specs)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        time.sleep(i * stagger_s)
        prompt, new, kw = specs[i]
        try:
            out[i] = sm.generate(prompt, new, transport=transport, **kw)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return out


class _OpenTogether(Transport):
    """Holds each of the first ``n`` sessions after its Open until all ``n`` are open, so that they
    overlap however fast the machine runs them (the ones after join while these decode)."""

    def __init__(self, inner: Transport, n: int) -> None:
        self.inner, self.barrier = inner, threading.Barrier(n)
        self.opened, self.lock = 0, threading.Lock()

    def open(self, request):
        session = self.inner.open(request)
        with self.lock:
            self.opened += 1
            held = self.opened <= self.barrier.parties
        if held:
            self.barrier.wait(timeout=60)
        return session


def test_outputs_identical_with_batching_on_and_off(sm):
    specs = [(_prompt(i, 2 + 5 * i), 4 + 3 * (i % 4),
              {"do_sample": True, "top_k": 30, "temperature": 0.9, "seed": 100 + i} if i % 2 else {})
             for i in range(8)]
    expected = [sm.generate(p, n, **kw) for p, n, kw in specs]  # the unbatched in-process server
    # The window waits for every open session's step, so the first three (held until all three
    # are open) share forwards on any machine; a timed stagger alone left them apart on a fast one.
    manager = BatchingSessionManager(sm.server, sm.manager.limits, sm.fingerprint,
                                     BatchConfig(window_s=0.05, prefill_chunk=6))
    try:
        got = _run_sessions(sm, _OpenTogether(InProcessTransport(manager), 3), specs, stagger_s=0.01)
        stats = manager.scheduler.stats()
    finally:
        manager.shutdown()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert stats.max_batch_seen >= 2, "no two sessions ever shared a forward"
    assert stats.prefill_chunks > len(specs), "no prefill was chunked"
    assert stats.tokens_in_flight == 0 and manager.num_sessions == 0


def test_long_prefill_does_not_stall_decodes(sm):
    d = sm.adapter.hidden_size
    scheduler = Scheduler(sm.server, BatchConfig(window_s=0.0, prefill_chunk=4)).start()
    try:
        greedy = SamplingParams()
        long_cache, short_cache, ref_cache = sm.server.new_cache(), sm.server.new_cache(), sm.server.new_cache()
        sm.server.forward(torch.randn(5, d), short_cache, 0)
        long_hidden = torch.randn(200, d, generator=torch.Generator().manual_seed(1))
        prefill = scheduler.submit(Work(long_hidden, long_cache, 0, greedy, None, key=1))
        assert _wait_for(lambda: prefill.done_tokens > 0)
        decode = scheduler.submit(Work(torch.randn(1, d), short_cache, 5, greedy, None, key=2))
        assert decode.done.wait(20) and decode.error is None
        assert not prefill.done.is_set(), "the decode waited for the whole prefill"
        assert prefill.done.wait(60) and prefill.error is None
        assert prefill.token == int(sm.server.forward(long_hidden, ref_cache, 0).argmax())
    finally:
        scheduler.stop()


def test_window_closes_when_the_expected_steps_are_queued(sm):
    # A long window (1 s) and three sessions that could submit: two queued steps wait for the
    # third, which closes the window at once (its submit wakes the scheduler), one batch of three.
    d = sm.adapter.hidden_size
    scheduler = Scheduler(sm.server, BatchConfig(window_s=1.0), expected=lambda: 3).start()
    try:
        works = [Work(torch.randn(1, d), sm.server.new_decode_cache(), 0, SamplingParams(), None, key=k)
                 for k in range(3)]
        for w in works[:2]:
            scheduler.submit(w)
        time.sleep(0.2)
        assert not any(w.done.is_set() for w in works[:2]), "the window closed before the expected steps came"
        t0 = time.perf_counter()
        scheduler.submit(works[2])
        assert all(w.done.wait(20) and w.error is None for w in works)
        assert time.perf_counter() - t0 < 0.6, "the last expected step did not close the window"
        stats = scheduler.stats()
        assert (stats.batches, stats.max_batch_seen, stats.tokens_in_flight) == (1, 3, 0)
    finally:
        scheduler.stop()


def test_admission_refuses_past_tokens_in_flight_and_session_survives(sm):
    manager = BatchingSessionManager(sm.server, Limits(max_sessions=1, max_seq_len=256), sm.fingerprint,
                                     BatchConfig(max_tokens_in_flight=8))
    try:
        transport = InProcessTransport(manager)
        d = sm.adapter.hidden_size
        frame = lambda n: encode(torch.randn(n, d), CodecConfig.passthrough()).to_bytes()  # noqa: E731
        session = transport.open(Open(SamplingParams()))
        with pytest.raises(SplitError) as e:
            session.step(0, frame(9))
        assert e.value.status == Status.RESOURCE_EXHAUSTED and "max_tokens_in_flight" in e.value.message
        assert session.step(0, frame(8)).reply.position == 8  # refused before the cache was touched
        with pytest.raises(SplitError) as e:
            transport.open(Open(SamplingParams()))
        assert e.value.status == Status.RESOURCE_EXHAUSTED
        session.close()
    finally:
        manager.shutdown()


@pytest.mark.parametrize("kw, match", [({"window_s": -1}, "window_s"), ({"max_batch": 0}, "max_batch"),
                                       ({"prefill_chunk": 1.5}, "prefill_chunk"),
                                       ({"max_tokens_in_flight": True}, "max_tokens_in_flight")])
def test_batch_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        BatchConfig(**kw)


def test_grpc_batched_server_killed_client_frees_slot(sm):
    manager = BatchingSessionManager(sm.server, Limits(max_sessions=2, max_seq_len=256), sm.fingerprint,
                                     BatchConfig(window_s=0.005))
    server = GrpcServer(manager).start()
    try:
        with GrpcTransport(server.address) as client:
            ids = _prompt(3, 9)
            expected = sm.generate(ids, 10)
            doomed = client.open(Open(SamplingParams()))
            d = sm.adapter.hidden_size
            doomed.step(0, encode(torch.randn(3, d), CodecConfig.passthrough()).to_bytes())
            got: list = []
            survivor = threading.Thread(target=lambda: got.append(sm.generate(ids, 10, transport=client)))
            survivor.start()
            doomed.cancel()  # the client dies mid-session, its stream is gone
            survivor.join(timeout=60)
            assert got and torch.equal(got[0], expected)
            assert _wait_for(lambda: manager.num_sessions == 0)
            for _ in range(2):  # both slots are free again
                assert torch.equal(sm.generate(ids, 10, transport=client), expected)
            assert client.info()["batching"]["max_batch_seen"] >= 1
    finally:
        server.stop(0)


def test_a_failing_batch_ends_its_sessions_and_the_server_goes_on(sm, monkeypatch):
    manager = BatchingSessionManager(sm.server, sm.manager.limits, sm.fingerprint)
    try:
        transport = InProcessTransport(manager)
        d = sm.adapter.hidden_size
        frame = lambda n: encode(torch.randn(n, d), CodecConfig.passthrough()).to_bytes()  # noqa: E731
        session = transport.open(Open(SamplingParams()))
        session.step(0, frame(3))

        def broken(*args):
            raise RuntimeError("injected fault")

        monkeypatch.setattr(manager.scheduler, "decode_tokens", broken)
        with pytest.raises(SplitError) as e:
            session.step(1, frame(1))
        assert e.value.status == Status.INTERNAL and "injected fault" in e.value.message
        assert manager.num_sessions == 0  # its cache may be half-updated: the session is gone
        monkeypatch.undo()
        ids = _prompt(8, 5)
        assert torch.equal(sm.generate(ids, 4, transport=transport), sm.generate(ids, 4))
    finally:
        manager.shutdown()


def test_batch_rows_persist_between_steps_and_are_written_back(sm):
    """Decode steps of the same sessions reuse the scheduler's padded rows; a release writes them
    back: tokens, caches and a different batch afterwards all equal the unbatched segment's."""
    d = sm.adapter.hidden_size
    gen = torch.Generator().manual_seed(9)
    lengths = [3, 0, 9]
    batched, alone = [], []
    for n in lengths:
        p = torch.randn(n, d, generator=gen)
        for caches in (batched, alone):
            c = sm.server.new_cache()
            if n:
                sm.server.forward(p, c, 0)
            caches.append(c)
    scheduler = Scheduler(sm.server)  # driven directly, no thread
    greedy = SamplingParams()
    for members in ([0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 0], [2, 0], [1]):  # the same, then other sessions
        hs = torch.randn(len(members), 1, d, generator=gen)
        works = [Work(hs[j], batched[i], lengths[i], greedy, None, key=i) for j, i in enumerate(members)]
        tokens = scheduler.decode_tokens(works)
        for j, i in enumerate(members):
            assert tokens[j] == int(sm.server.forward(hs[j], alone[i], lengths[i]).argmax())
            lengths[i] += 1
    scheduler.release(batched[1])
    layer = sm.server.first
    for b, a, n in zip(batched, alone, lengths):
        assert b.get_seq_length(layer) == n
        assert _rel(b.layers[layer].keys, a.layers[layer].keys) <= RTOL
        assert _rel(b.layers[layer].values, a.layers[layer].values) <= RTOL


def test_verify_after_batched_steps_sees_the_whole_cache(sm):
    """A speculative (multi-token) step on the batching server right after batched decode steps
    gets the same verdict as on the unbatched server (the rows are written back first)."""
    d = sm.adapter.hidden_size
    gen = torch.Generator().manual_seed(4)
    frames = [encode(torch.randn(n, d, generator=gen), CodecConfig.passthrough()).to_bytes() for n in (5, 1, 1, 1)]
    spec = encode(torch.randn(3, d, generator=gen), CodecConfig.passthrough()).to_bytes()
    batching = BatchingSessionManager(sm.server, sm.manager.limits, sm.fingerprint, BatchConfig(window_s=0.0))
    try:
        verdicts = []
        for manager in (sm.manager, batching):
            sid = manager.open(Open(SamplingParams())).session_id
            other = manager.open(Open(SamplingParams())).session_id  # a second session in the batches
            for seq, frame in enumerate(frames):  # the last batch before the verify holds sid's rows
                manager.step(Step(other, seq, frame))
                last = manager.step(Step(sid, seq, frame)).token
            verdicts.append(manager.verify(Verify(sid, len(frames), (last, 7), spec)))
            verdicts.append(manager.step(Step(sid, len(frames) + 1, frames[2])))
            manager.close(sid)
            manager.close(other)
        ref, ref_next, got, got_next = verdicts
        assert (got.accepted, got.token, got.position) == (ref.accepted, ref.token, ref.position)
        assert (got_next.token, got_next.position) == (ref_next.token, ref_next.position)
    finally:
        batching.shutdown()


def _step_batches_against_steps_alone(server, modes, lengths, gen, seed, batches):
    """Sessions at ``lengths`` (each cache twice, filled by the same prompt), stepped in the
    scheduler's ``batches`` (lists of session indices) and each alone through next_token, with
    generators seeded alike: every token the same. Returns (batched caches, caches alone, the
    scheduler); ``lengths`` end as the caches' lengths."""
    d = server.adapter.hidden_size
    batched, alone = [], []
    for n in lengths:
        p = torch.randn(n, d, generator=gen)
        pair = [server.new_decode_cache() for _ in range(2)]
        for c in pair:
            server.forward(p, c, 0)
        batched.append(pair[0])
        alone.append(pair[1])
    gens_b = [torch.Generator().manual_seed(seed + i) for i in range(len(modes))]
    gens_a = [torch.Generator().manual_seed(seed + i) for i in range(len(modes))]
    scheduler = Scheduler(server)  # driven directly, no thread
    for members in batches:
        hs = torch.randn(len(members), 1, d, generator=gen)
        works = [Work(hs[j], batched[i], lengths[i], modes[i], gens_b[i], key=i) for j, i in enumerate(members)]
        tokens = scheduler.decode_tokens(works)
        for j, i in enumerate(members):
            assert tokens[j] == server.next_token(hs[j], alone[i], lengths[i], modes[i], gens_a[i])
            lengths[i] += 1
    return batched, alone, scheduler


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_native_batched_step_equals_next_token_alone(family):
    """Sessions on the native path (their caches are the fast path's) run as one native batched
    step; greedy rows, top-k sampling rows and full-distribution sampling rows (top_k 0) get the
    unbatched server's tokens exactly (same generators, same draws), at different lengths, and the
    caches equal the unbatched ones bit for bit."""
    sm = _split(family)
    server = sm.server
    assert server.native is not None
    d = sm.adapter.hidden_size
    gen = torch.Generator().manual_seed(12)
    modes = [SamplingParams(), SamplingParams(do_sample=True, top_k=5, temperature=0.8, seed=1),
             SamplingParams(do_sample=True, top_k=0, top_p=0.9, seed=2), SamplingParams(),
             SamplingParams(do_sample=True, top_k=40, seed=3)]
    lengths = [6, 1, 11, 3, 8]
    batched, alone, scheduler = _step_batches_against_steps_alone(
        server, modes, lengths, gen, 50, ([0, 1, 2, 3, 4], [4, 2, 0], [1, 3], [0, 1, 2, 3, 4]))
    for b, a, n in zip(batched, alone, lengths):
        assert b.length == a.length == n
        assert torch.equal(b.static(n)[0][..., :n, :], a.static(n)[0][..., :n, :])
    with pytest.raises(ValueError, match="start must equal the positions already cached"):
        scheduler.decode_tokens([Work(torch.zeros(1, d), batched[0], lengths[0] - 1, modes[0], None)])


def test_eager_batched_step_takes_the_native_heads_top_k(monkeypatch):
    """A family whose layers stay eager (CTRL): a batch whose rows all need only their top k
    (greedy, top-k sampling) stops the padded forward at the LM head and takes every row's top k
    from the native head in one pass; a batch with a full-distribution row keeps the logits. Each
    row gets the token that the unbatched server's next_token gives it, with the same generator."""
    sm = split_model(family_model("ctrl"), 1, limits=Limits(max_sessions=16, max_seq_len=256))
    server = sm.server
    assert server.native is None and server.native_head is not None
    passes = []
    top_rows = server.native_head.top_rows
    monkeypatch.setattr(server.native_head, "top_rows", lambda h, k: passes.append(h.shape[0]) or top_rows(h, k))
    gen = torch.Generator().manual_seed(21)
    modes = [SamplingParams(), SamplingParams(do_sample=True, top_k=5, temperature=0.8, seed=1), SamplingParams(),
             SamplingParams(do_sample=True, top_k=0, top_p=0.9, seed=2)]
    lengths = [6, 1, 11, 3]
    batched, alone, scheduler = _step_batches_against_steps_alone(
        server, modes, lengths, gen, 60, ([0, 1, 2], [2, 0], [0, 1, 2, 3], [1]))
    # Batches of 3 and 2 rows in one pass each, the batch with the full-distribution row none, the
    # last batch 1; next_token alone 1 row each (9 calls: all but the full-distribution row's).
    assert passes.count(3) == 1 and passes.count(2) == 1 and passes.count(1) == 1 + 9
    scheduler.release(batched[1])  # the last batch's rows, written back
    layer = server.first
    for b, a, n in zip(batched, alone, lengths):
        assert b.get_seq_length(layer) == n
        assert _rel(b.layers[layer].keys, a.layers[layer].keys) <= RTOL
