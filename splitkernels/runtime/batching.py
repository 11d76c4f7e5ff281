"""Continuous batching on the server: one scheduler thread runs the decode steps of many sessions
as one forward of the server segment.

Where the segment has the native decode step (:mod:`splitkernels.fastpath`, the families it
covers), a batched decode step is one native call for all its sessions
(``NativeDecoder.step_batch``): every weight is read once for the batch, each session attends
over its own cache of its own length (no padding), the pool runs it on all cores, and the LM
head's exact top k (W8A8 with an fp32 fix-up) serves every row. Each session's result is
bit-identical to its step on the unbatched server (the native sums run in the same order), so
greedy and seeded sampled tokens are the same with batching on and off.

Other segments (families the native step does not cover, ``fast=False``) run the model's own
forward on the batch: the sessions' caches (the segment's ``DynamicCache``) are gathered once
into padded rows (:class:`_Resident`, one buffer per layer, each session right-aligned, the
padding masked by the model's own mask helper: ``create_causal_mask`` with a 2-D padding mask).
The rows stay there while the same sessions keep stepping together (closed-loop edges do), each
step appending one column; they are written back into the sessions' caches when the batch's
sessions change, before a prefill chunk or a speculative step reads one of those caches, and at
shutdown. A batched matmul and a padded attention sum in a different order from the one-session
forward, so those logits may differ in the last bits (the tests bound ``|batched - unbatched| /
|unbatched|`` and check that the sampled tokens are identical). Where the server has a native LM
head (``Server.native_head``) and every row of the batch needs only its top k, the forward stops at
the head and the native head takes each row's top k in one pass.

Prefill frames (more than one token) run chunk by chunk through the unbatched segment forward,
at most ``prefill_chunk`` tokens per scheduler iteration, between decode batches: a long prompt
delays every other session by one chunk at most, not by the whole prompt. Sampling is per
session with its own generator.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

from ..fastpath import FastCache
from .protocol import SamplingParams, SplitError, Status
from .sampling import sample
from .segments import Server, pick_token
from .sessions import NO_FINGERPRINT, Limits, SessionManager


@dataclass(frozen=True)
class BatchConfig:
    """Scheduler settings.

    * ``window_s``: once a step is queued and the scheduler is free, wait at most this long for
      the steps of the sessions that are stepping (those served by the last two batches and still
      open) before running the batch; the wait ends early once all of them, or every open session,
      have a step queued. Closed-loop clients come back one round trip after their token, so a
      window shorter than that round trip splits the sessions into cohorts that take turns, each
      batch half as large at almost the same cost. Default from ``bench/serve_load.py``.
    * ``max_batch``: decode steps in one forward.
    * ``prefill_chunk``: prefill tokens run per scheduler iteration.
    * ``max_tokens_in_flight``: tokens queued or running over all sessions; a step past it is
      refused with RESOURCE_EXHAUSTED (the session stays usable).
    * ``window_fraction``: the wait may stretch to this fraction of the last decode batch's time
      when that is longer than ``window_s`` (many sessions: their steps take longer to come back,
      and a batch that waits for them saves a whole forward).
    """

    window_s: float = 0.02
    max_batch: int = 64
    prefill_chunk: int = 128
    max_tokens_in_flight: int = 16384
    window_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.window_s, (int, float)) and 0 <= self.window_s <= 1.0):
            raise ValueError(f"window_s must be a number in [0, 1] seconds, got {self.window_s!r}")
        if not (isinstance(self.window_fraction, (int, float)) and 0 <= self.window_fraction <= 1.0):
            raise ValueError(f"window_fraction must be a number in [0, 1], got {self.window_fraction!r}")
        for name in ("max_batch", "prefill_chunk", "max_tokens_in_flight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


@dataclass(frozen=True)
class BatchStats:
    """Counters the scheduler keeps (read with :meth:`Scheduler.stats`)."""

    batches: int
    decode_steps: int
    prefill_chunks: int
    max_batch_seen: int
    tokens_in_flight: int
    queue_s_total: float
    busy_s_total: float  # seconds the scheduler spent running forwards (decode batches and prefill chunks)


@dataclass(eq=False)  # identity: the queue removes a work item by itself, not by value
class Work:
    """One step of one session waiting for the scheduler.

    ``hidden`` is the decoded frame ``[T, d]``; ``start`` the session's position (tokens already
    in ``cache``). The scheduler sets ``token`` or ``error`` and then ``done``.
    """

    hidden: torch.Tensor
    cache: object
    start: int
    sampling: SamplingParams
    generator: torch.Generator | None
    key: int = 0  # who submitted it (a session id); used to end the batching window early
    done_tokens: int = 0  # prefill tokens already run
    token: int | None = None
    error: BaseException | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[0])


def _eager(cache):
    """The transformers cache behind a session cache (a fast-path cache hands out its eager form)."""
    return cache.dynamic() if isinstance(cache, FastCache) else cache


class _Resident:
    """The keys and values of the sessions of one decode batch, padded into one buffer per layer
    and kept there from batch to batch while the same sessions step together.

    Rows are right-aligned: session ``i``'s ``lengths[i]`` positions sit in columns
    ``[width - lengths[i], width)``, the padding before them is zeros (masked). A decode step
    writes every session's new key and value into column ``width`` with one copy per layer and
    hands the attention columns ``[0, width]``; no per-session work. The sessions' own caches are
    stale while their rows live here: :meth:`flush` writes the rows back (the scheduler does it
    before anything else reads those caches, and when the batch's sessions change).

    Also the cache object the model's forward gets (``update`` per attention layer).
    """

    is_compileable = False

    def __init__(self, keys: list[int], caches: list, lengths: list[int]) -> None:
        self.keys, self.caches, self.lengths = keys, caches, list(lengths)
        self.width = max(lengths)
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    def matches(self, keys: list[int], caches: list, lengths: list[int]) -> bool:
        """Whether a batch of these sessions (in this order, at these lengths) can run on these rows."""
        return keys == self.keys and lengths == self.lengths and all(a is b for a, b in zip(caches, self.caches))

    # -- the cache interface the model's forward uses ----------------------------------------------
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width + query_length, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``[B, kv_heads, 1, head_dim]`` new keys and values -> all of them ``[B, kv_heads, width + 1, head_dim]``."""
        keys, values = self._k.get(layer_idx), self._v.get(layer_idx)
        if keys is None:  # first step of this batch: gather the sessions' caches once
            keys, values = self._gather(layer_idx, key_states, value_states)
        elif keys.shape[2] <= self.width:  # full: double the columns
            keys, values = (torch.cat([t, torch.zeros_like(t)], dim=2) for t in (keys, values))
        keys[:, :, self.width] = key_states[:, :, 0]
        values[:, :, self.width] = value_states[:, :, 0]
        self._k[layer_idx], self._v[layer_idx] = keys, values
        return keys[:, :, :self.width + 1], values[:, :, :self.width + 1]

    def _gather(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        b, heads, _, dim = key_states.shape
        columns = self.width + max(16, self.width // 2)  # room to grow before the first doubling
        keys = key_states.new_zeros(b, heads, columns, dim)
        values = value_states.new_zeros(b, heads, columns, value_states.shape[-1])
        for i, (cache, n) in enumerate(zip(self.caches, self.lengths)):
            if n:
                layer = _eager(cache).layers[layer_idx]
                keys[i, :, self.width - n:self.width] = layer.keys[0]
                values[i, :, self.width - n:self.width] = layer.values[0]
        return keys, values

    # -- bookkeeping -------------------------------------------------------------------------------
    def advance(self) -> None:
        """The step's forward completed: every row holds one more position."""
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]

    def flush(self) -> None:
        """Write every row back into its session's own cache (copies, so the buffers are freed)."""
        for i, (cache, n) in enumerate(zip(self.caches, self.lengths)):
            eager = _eager(cache)
            for layer_idx, keys in self._k.items():
                layer = eager.layers[layer_idx]
                k = keys[i:i + 1, :, self.width - n:self.width].clone()
                v = self._v[layer_idx][i:i + 1, :, self.width - n:self.width].clone()
                if not layer.is_initialized:
                    layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
        self._k, self._v = {}, {}


class Scheduler:
    """Owns the batch: one thread takes queued :class:`Work` and runs it on ``server``.

    ``expected`` returns how many sessions could submit right now (the open sessions); once that
    many distinct sessions have work queued the window closes early.
    """

    def __init__(self, server: Server, config: BatchConfig | None = None,
                 expected: Callable[[], int] | None = None) -> None:
        if not isinstance(server, Server):
            raise TypeError(f"server must be a Server segment, got {type(server).__name__}")
        self.server = server
        self.config = config or BatchConfig()
        self._expected = expected or (lambda: 1 << 30)
        # Only plain full-attention caches can be padded into one batch; sliding-window, chunked and
        # recurrent layers run session by session.
        probe = server.adapter.new_cache(server.first, server.last).layers
        self.batchable = all(i < len(probe) and type(probe[i]) is DynamicLayer for i in range(server.first, server.last))
        self._queue: deque[Work] = deque()
        self._queued: dict[int, int] = {}  # key -> its queued works (the window's test, kept as works come and go)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._batches = self._decode_steps = self._prefill_chunks = self._max_batch_seen = 0
        self._queue_s = self._busy_s = 0.0
        # Sessions served by the last two decode batches (still open): whose steps a window waits for.
        self._served: tuple[set[int], set[int]] = (set(), set())
        self._last_batch_s = 0.0
        # The rows of the last decode batch, kept padded while the same sessions step together;
        # the lock keeps a forward and a release (another thread needing a session's cache) apart.
        self._resident: _Resident | None = None
        self._resident_lock = threading.Lock()
        self.on_batch: Callable[[int, list[float], float], None] | None = None  # (size, queue times, seconds)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="splitkernels-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; queued work fails with UNAVAILABLE."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            pending, self._queue = list(self._queue), deque()
            self._queued.clear()
        for w in pending:
            self._finish(w, error=SplitError(Status.UNAVAILABLE, "server is shutting down"))
        self.release()

    def release(self, cache: object | None = None) -> None:
        """Write the rows of the last decode batch back into the sessions' own caches if ``cache``
        is one of them (None: in any case), so another reader of that cache sees all of it. Waits
        for a batch that is running."""
        with self._resident_lock:
            r = self._resident
            if r is not None and (cache is None or any(c is cache for c in r.caches)):
                r.flush()
                self._resident = None

    def forget(self, key: int) -> None:
        """``key``'s session closed: no window waits for its next step."""
        with self._cond:
            for served in self._served:
                served.discard(key)
            self._cond.notify_all()

    # -- submission ------------------------------------------------------------------------------
    def submit(self, work: Work) -> Work:
        """Queue ``work``; RESOURCE_EXHAUSTED past ``max_tokens_in_flight`` (nothing is queued then)."""
        limit = self.config.max_tokens_in_flight
        with self._cond:
            if self._stop or self._thread is None:
                raise SplitError(Status.UNAVAILABLE, "the batching scheduler is not running")
            if self._in_flight + work.tokens > limit:
                raise SplitError(Status.RESOURCE_EXHAUSTED,
                                 f"{self._in_flight} tokens are in flight on the server and this step adds "
                                 f"{work.tokens}; the limit is {limit} (max_tokens_in_flight)")
            self._in_flight += work.tokens
            self._queue.append(work)
            self._queued[work.key] = self._queued.get(work.key, 0) + 1
            # Wake the scheduler only when this step can end its wait (the first step queued, or the
            # window's last expected one): each wake-up costs a thread switch and the GIL, and a
            # batch of 16 sessions would otherwise wake it 16 times.
            if len(self._queue) == 1 or self._window_full():
                self._cond.notify_all()
        return work

    def run(self, work: Work) -> int:
        """Submit ``work`` and wait for its token; re-raises the error the scheduler hit."""
        self.submit(work).done.wait()
        if work.error is not None:
            raise work.error
        return work.token

    # -- the loop --------------------------------------------------------------------------------
    def _take(self) -> tuple[list[Work], list[Work]] | None:
        """Wait for work and for the window; split the queue into decodes (up to max_batch) and
        prefills. None when stopping."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return None
            window = max(self.config.window_s, self.config.window_fraction * self._last_batch_s)
            deadline = time.perf_counter() + window
            while not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0 or self._window_full():
                    break
                self._cond.wait(left)
            decodes, prefills = [], []
            for w in self._queue:
                is_decode = w.tokens == 1 and self.batchable
                if is_decode and len(decodes) < self.config.max_batch:
                    decodes.append(w)
                elif not is_decode:
                    prefills.append(w)
            return decodes, prefills

    def _window_full(self) -> bool:
        """Whether the window can close now: as many sessions have a step queued as could submit
        (up to ``max_batch``), or every session that is stepping has one. Under ``_cond``."""
        queued = self._queued
        if len(queued) >= min(self._expected(), self.config.max_batch):
            return True
        stepping = self._served[0] | self._served[1]
        return bool(stepping) and all(key in queued for key in stepping)

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            decodes, prefills = taken
            try:
                if decodes:
                    self._run_decodes(decodes)
                budget = self.config.prefill_chunk
                for w in prefills:
                    if budget <= 0:
                        break
                    budget -= self._run_prefill_chunk(w, budget)
            except Exception as exc:  # a fault outside the model must not leave steps waiting forever
                self._resident = None  # its sessions' caches are lost with their steps
                with self._cond:
                    pending, self._queue, self._in_flight = list(self._queue), deque(), 0
                    self._queued.clear()
                for w in pending:
                    self._finish(w, error=exc)

    def _dequeue(self, works: list[Work]) -> None:
        with self._cond:
            for w in works:
                self._queue.remove(w)
                self._in_flight -= w.tokens
                left = self._queued[w.key] - 1
                if left:
                    self._queued[w.key] = left
                else:
                    del self._queued[w.key]

    def _finish(self, work: Work, token: int | None = None, error: BaseException | None = None) -> None:
        work.token, work.error = token, error
        work.done.set()

    def _run_decodes(self, works: list[Work]) -> None:
        now = time.perf_counter()
        queue_times = [now - w.enqueued for w in works]
        self._dequeue(works)
        try:
            tokens = self.decode_tokens(works)
        except Exception as exc:  # every cache in the batch may be half-updated
            for w in works:
                self._finish(w, error=exc)
            return
        seconds = time.perf_counter() - now
        self._busy_s += seconds
        self._last_batch_s = seconds
        self._batches += 1
        self._decode_steps += len(works)
        self._max_batch_seen = max(self._max_batch_seen, len(works))
        self._queue_s += sum(queue_times)
        with self._cond:
            self._served = (self._served[1], {w.key for w in works})
        for w, t in zip(works, tokens):
            self._finish(w, token=t)
        if self.on_batch is not None:
            self.on_batch(len(works), queue_times, seconds)

    def _run_prefill_chunk(self, work: Work, budget: int) -> int:
        """Run up to ``budget`` more tokens of ``work``'s prefill; returns how many ran."""
        if work.started is None:
            work.started = time.perf_counter()
        a = work.done_tokens
        b = min(work.tokens, a + budget)
        t0 = time.perf_counter()
        last = b == work.tokens
        try:
            self.release(work.cache)
            logits = self.server.forward(work.hidden[a:b], work.cache, work.start + a, last_only=True)
            token = sample(logits, work.sampling, work.generator) if last else None
        except Exception as exc:
            self._dequeue([work])
            self._finish(work, error=exc)
            return b - a
        work.done_tokens = b
        self._prefill_chunks += 1
        self._busy_s += time.perf_counter() - t0
        if last:
            self._dequeue([work])
            self._queue_s += work.started - work.enqueued
            self._finish(work, token=token)
            if self.on_batch is not None:
                self.on_batch(1, [work.started - work.enqueued], time.perf_counter() - work.started)
        return b - a

    @torch.inference_mode()
    def forward_decode(self, hiddens: list[torch.Tensor], caches: list, starts: list[int]) -> torch.Tensor:
        """One token per session, ``hiddens[i]`` ``[1, d]`` at position ``starts[i]`` (= tokens in
        ``caches[i]``, the model's own caches), as one forward of the model on padded rows; logits
        ``[B, V]``. Appends to every cache."""
        self.release()
        rows = _Resident(list(range(len(caches))), caches, starts)
        logits = self._forward(hiddens, rows)
        rows.advance()
        rows.flush()
        return logits

    @torch.inference_mode()
    def decode_tokens(self, works: list[Work]) -> list[int]:
        """The next token of every decode step in ``works`` from one batched forward (appends to
        every cache): the native batched step where the segment has one and the sessions hold
        its caches, else the model's forward on padded rows (a batch of the same sessions as the
        last one reuses them); each session samples with its own parameters and generator."""
        server = self.server
        if server.native is not None and all(isinstance(w.cache, FastCache) for w in works):
            return self._native_tokens(works)
        # A native head serves the batch when every row needs only its top k (Server.fused_k).
        ks = [server.fused_k(w.sampling) for w in works] if server.native_head is not None else [0]
        to_head = all(ks)
        hiddens = [w.hidden for w in works]
        keys, caches, starts = [w.key for w in works], [w.cache for w in works], [w.start for w in works]
        with self._resident_lock:
            rows = self._resident
            if rows is None or not rows.matches(keys, caches, starts):
                if rows is not None:
                    rows.flush()
                rows = self._resident = _Resident(keys, caches, starts)
            try:
                out = self._forward(hiddens, rows, to_head)
            except BaseException:
                self._resident = None  # half-updated: these sessions fail with this batch
                raise
            rows.advance()
        if to_head:
            ids, vals = server.native_head.top_rows(out, max(ks))
            return [pick_token(w.sampling, w.generator, k, ids[i], vals[i], None)
                    for i, (w, k) in enumerate(zip(works, ks))]
        return [sample(out[i], w.sampling, w.generator) for i, w in enumerate(works)]

    def _native_tokens(self, works: list[Work]) -> list[int]:
        """Tokens of one native batched step, chosen as ``Server.next_token`` chooses them for one
        session (``Server.fused_k``, ``pick_token``); all fp32 logits are computed for the batch
        only when a row samples from the whole distribution."""
        server = self.server
        ks = [server.fused_k(w.sampling) for w in works]
        for w in works:
            if w.start != w.cache.length:  # the manager's position and the cache disagree: a bug
                raise ValueError(f"start must equal the positions already cached ({w.cache.length}), got {w.start}")
            self.release(w.cache)  # a model-forward batch may hold its newest rows
        hidden = torch.cat([w.hidden for w in works])
        _, ids, vals, logits = server.native.step_batch(hidden, [w.cache for w in works], max(ks), logits=0 in ks)
        firsts = ids[:, 0].tolist()  # the argmax of every row: a greedy row's token, read without a tensor per row
        return [firsts[i] if not w.sampling.do_sample else
                pick_token(w.sampling, w.generator, k, ids[i], vals[i], None if logits is None else
                           logits[i].to(server.dtype)) for i, (w, k) in enumerate(zip(works, ks))]

    def _forward(self, hiddens: list[torch.Tensor], rows: _Resident, to_head: bool = False) -> torch.Tensor:
        """The server's logits at the new position of every session of ``rows``, ``[B, V]``, or with
        ``to_head`` (through the server's ``head_view``) the LM head's input ``[B, d]``."""
        server = self.server
        h = torch.cat(hiddens).to(device=server.device, dtype=server.dtype).unsqueeze(1)  # [B, 1, d]
        pos = torch.tensor(rows.lengths, device=h.device).unsqueeze(1)  # [B, 1]
        total = rows.width + 1
        # Session i's keys sit right-aligned in the padded rows: valid are the last lengths[i] + 1.
        idx = torch.arange(total, device=h.device).unsqueeze(0)
        padding = idx >= (total - 1 - pos)  # [B, total]
        # The model's own forward on the padded batch: its mask helper combines causality and padding.
        if to_head:
            return server.adapter.run_back_to_head(server.head_view, h, rows, attention_mask=padding,
                                                   position_ids=pos)[:, 0]
        return server.adapter.run_back(server.view, h, rows, last_only=False, tail=1, attention_mask=padding,
                                       position_ids=pos)[:, -1]

    def stats(self) -> BatchStats:
        with self._cond:
            in_flight = self._in_flight
        return BatchStats(self._batches, self._decode_steps, self._prefill_chunks, self._max_batch_seen,
                          in_flight, self._queue_s, self._busy_s)


class BatchingSessionManager(SessionManager):
    """A :class:`SessionManager` whose steps run through a :class:`Scheduler` (one batched forward
    for the decode steps of many sessions). Validation, limits, idle expiry and accounting are the
    unbatched manager's; only the compute differs."""


    def __init__(self, server: Server, limits: Limits | None = None, fingerprint: bytes = NO_FINGERPRINT,
                 batch: BatchConfig | None = None) -> None:
        super().__init__(server, limits, fingerprint)
        self.scheduler = Scheduler(server, batch, expected=lambda: self.num_sessions)
        self.scheduler.on_batch = lambda size, queue_s, seconds: self._event("batch", size=size, queue_s=queue_s,
                                                                               seconds=seconds)
        self.scheduler.start()

    def _compute(self, sess, hidden: torch.Tensor) -> int:
        return self.scheduler.run(Work(hidden, sess.cache, sess.position, sess.open_msg.sampling,
                                       sess.generator, key=sess.id))

    def _free(self, sess) -> None:
        super()._free(sess)
        self.scheduler.forget(sess.id)

    def _eager_cache(self, sess):
        self.scheduler.release(sess.cache)  # its newest positions may live in the scheduler's batch rows
        return super()._eager_cache(sess)

    def _cache_bytes(self, sess) -> int:
        if not self.scheduler.batchable:
            return super()._cache_bytes(sess)
        # Full-attention layers: a fixed number of bytes per position, counted without reading the
        # cache (its newest rows may be in the scheduler's batch).
        return sess.position * self.kv_bytes_per_token

    def shutdown(self) -> None:
        """Stop the scheduler (queued steps fail UNAVAILABLE), then the reaper and the sessions."""
        self.scheduler.stop()
        super().shutdown()

    def stats(self) -> dict:
        return {**super().stats(), "batching": {**asdict(self.scheduler.config), **asdict(self.scheduler.stats())}}
