"""Server-side sessions: one KV cache per sequence, limits, idle expiry and memory accounting.

:class:`SessionManager` is transport-free: it takes and returns protocol messages (or their
bytes) and raises :class:`SplitError`; the in-process and gRPC transports both sit on it.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codec import CodecConfigV2, FrameError, FrameLimitError, FrameLimits, decode_frame
from ..codec.predict import table_for
from ..fastpath import FastCache
from .protocol import (
    FINGERPRINT_BYTES, Close, Open, Opened, SplitError, Status, Step, TokenReply, Verdict, Verify, decode_message,
    encode_message,
)
from .sampling import make_generator
from .segments import Server, cache_nbytes
from .verify import server_verify

NO_FINGERPRINT = bytes(FINGERPRINT_BYTES)
MAX_CODEC_CONFIGS = 16  # distinct codec configs kept parsed at once


@dataclass(frozen=True)
class Limits:
    """Server limits.

    * ``max_sessions``: open sessions at once (RESOURCE_EXHAUSTED past it).
    * ``max_seq_len``: tokens one session may hold in its KV cache.
    * ``idle_timeout_s``: a session untouched this long is closed and its KV cache freed.
    * ``max_kv_bytes``: KV cache bytes over all sessions (None = no limit).
    """

    max_sessions: int = 64
    max_seq_len: int = 2048
    idle_timeout_s: float = 300.0
    max_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s!r}")
        if self.max_kv_bytes is not None and not (isinstance(self.max_kv_bytes, int) and self.max_kv_bytes > 0):
            raise ValueError(f"max_kv_bytes must be None or an int > 0, got {self.max_kv_bytes!r}")


@dataclass
class _Session:
    id: int
    open_msg: Open
    max_seq_len: int
    cache: object
    generator: torch.Generator | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    position: int = 0
    seq: int = 0
    kv_bytes: int = 0
    last_active: float = field(default_factory=time.monotonic)
    closed: bool = False
    on_expire: Callable[[], object] | None = None
    codec: CodecConfigV2 | None = None  # the session's codec v2 config (from OPEN); None = v1 frames only


class SessionManager:
    """Sessions of one :class:`Server` segment.

    Thread-safe: different sessions step concurrently; steps of one session are serialised.
    ``fingerprint`` (16 bytes) identifies the model and split; an OPEN carrying a different
    non-zero fingerprint is refused with FAILED_PRECONDITION.
    """

    def __init__(self, server: Server, limits: Limits | None = None, fingerprint: bytes = NO_FINGERPRINT) -> None:
        if not isinstance(server, Server):
            raise TypeError(f"server must be a Server segment, got {type(server).__name__}")
        self.server = server
        self.limits = limits or Limits()
        self.fingerprint = bytes(fingerprint)
        model_limit = server.adapter.max_positions
        self.max_seq_len = min(self.limits.max_seq_len, model_limit) if model_limit else self.limits.max_seq_len
        self.kv_bytes_per_token = server.kv_bytes_per_token()
        # Fixed for the server's life; read per step (the model config's attribute lookups cost microseconds).
        self._hidden_size, self._device = server.adapter.hidden_size, server.device
        self._sessions: dict[int, _Session] = {}
        self._codec_configs: dict[bytes, CodecConfigV2] = {}  # by canonical bytes, oldest first
        self._table = None  # the input embedding table, once a codec config's token prediction was checked against it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.sessions_opened = 0
        self.sessions_expired = 0
        # Called as observer(event, fields) on "opened", "step", "closed", "expired" (metrics, logs).
        self.observer: Callable[[str, dict], None] | None = None

    def _event(self, name: str, **fields) -> None:
        if self.observer is not None:
            self.observer(name, fields)

    # -- lifecycle -------------------------------------------------------------------------------
    def start_reaper(self) -> None:
        """Close idle sessions in the background (checked a few times per idle timeout)."""
        if self._reaper is None:
            period = min(max(self.limits.idle_timeout_s / 4, 0.01), 1.0)

            def loop() -> None:
                while not self._stop.wait(period):
                    self.reap_idle()

            self._reaper = threading.Thread(target=loop, name="splitkernels-reaper", daemon=True)
            self._reaper.start()

    def shutdown(self) -> None:
        """Stop the reaper and free every session."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None
        with self._lock:
            ids = list(self._sessions)
        for sid in ids:
            self.close(sid)

    # -- requests --------------------------------------------------------------------------------
    def open(self, msg: Open, on_expire: Callable[[], object] | None = None) -> Opened:
        """Open a session; ``on_expire`` is called if the idle timeout closes it (a transport
        ends its stream then, so an idle client does not hold a connection forever)."""
        if msg.fingerprint != NO_FINGERPRINT and self.fingerprint != NO_FINGERPRINT and msg.fingerprint != self.fingerprint:
            raise SplitError(Status.FAILED_PRECONDITION,
                             "the edge runs a different model or split point than this server (fingerprint mismatch)")
        if msg.max_len > self.max_seq_len:
            raise SplitError(Status.RESOURCE_EXHAUSTED,
                             f"requested sequence length {msg.max_len} exceeds the server limit {self.max_seq_len}")
        codec = self._codec_config(msg.codec_config)
        self.reap_idle()
        with self._lock:
            if len(self._sessions) >= self.limits.max_sessions:
                raise SplitError(Status.RESOURCE_EXHAUSTED,
                                 f"server is at its limit of {self.limits.max_sessions} sessions")
            sid = 0
            while sid == 0 or sid in self._sessions:
                sid = secrets.randbits(64)
            cache = self.server.new_decode_cache()  # the fast path's where the segment has one
            self._sessions[sid] = _Session(sid, msg, self.max_seq_len, cache,
                                           make_generator(msg.sampling), on_expire=on_expire, codec=codec)
            self.sessions_opened += 1
        self._event("opened", session=sid)
        return Opened(sid, self.max_seq_len)

    def _codec_config(self, raw: bytes) -> CodecConfigV2 | None:
        """The session's codec v2 config from its OPEN bytes (None without one); one parsed
        object per distinct config, shared by the sessions that send it (its tables are built once)."""
        if not raw:
            return None
        d = self.server.adapter.hidden_size
        with self._lock:
            cached = self._codec_configs.get(raw)
        if cached is not None:
            return cached
        try:
            config = CodecConfigV2.from_canonical_bytes(raw, max_d=d)
        except ValueError as exc:
            raise SplitError(Status.INVALID_ARGUMENT, f"OPEN codec config is invalid: {exc}") from None
        if config.d != d:
            raise SplitError(Status.INVALID_ARGUMENT,
                             f"OPEN codec config is for d = {config.d}, this server's hidden size is {d}")
        if config.prediction is not None:  # the model's one table, kept for every predicting session
            try:
                self._table = table_for(config.prediction, self.server.adapter.model)
            except ValueError as exc:
                raise SplitError(Status.FAILED_PRECONDITION, f"OPEN codec config: {exc}") from None
        with self._lock:
            if len(self._codec_configs) >= MAX_CODEC_CONFIGS:
                self._codec_configs.pop(next(iter(self._codec_configs)))
            self._codec_configs[raw] = config
        return config

    def _get(self, session_id: int) -> _Session:
        with self._lock:
            sess = self._sessions.get(session_id)
        if sess is None:
            raise SplitError(Status.NOT_FOUND, f"session {session_id:#x} is unknown, closed or expired")
        return sess

    def step(self, msg: Step) -> TokenReply:
        """Decode the frame, run the server layers with the session's cache, sample a token.

        Everything is checked before the cache is touched, so a rejected step leaves the
        session as it was; only a failure inside the model closes the session.
        """
        def run(sess: _Session, hidden: torch.Tensor) -> tuple[int, int, int]:
            return 0, self._compute(sess, hidden), sess.position + hidden.shape[0]

        accepted, token, position, decode_s, compute_s, kv = self._run(msg.session_id, msg.seq, msg.frame, 0, run)
        return TokenReply(msg.session_id, msg.seq, token, position, decode_s, compute_s, kv)

    def verify(self, msg: Verify) -> Verdict:
        """A multi-token step (speculative decoding): run the server layers on all rows at once,
        accept a prefix of the drafts, pick the token after it, and cut the cache back to the
        accepted rows. Checked and failing like :meth:`step`."""
        vocab = getattr(self.server.adapter.config, "vocab_size", None)
        if vocab is not None and any(not 0 <= d < vocab for d in msg.drafts):
            raise SplitError(Status.INVALID_ARGUMENT, f"draft token ids must be in [0, {vocab})")

        def run(sess: _Session, hidden: torch.Tensor) -> tuple[int, int, int]:
            return server_verify(self.server, self._eager_cache(sess), sess.position, hidden, msg.drafts,
                                 sess.open_msg.sampling, sess.generator)

        accepted, token, position, decode_s, compute_s, kv = self._run(msg.session_id, msg.seq, msg.frame,
                                                                       len(msg.drafts), run)
        return Verdict(msg.session_id, msg.seq, accepted, token, position, decode_s, compute_s, kv)

    def _run(self, session_id: int, seq: int, frame: bytes, drafts: int, run) -> tuple:
        """Check a step's frame against the session, then ``run(session, hidden)`` -> (accepted,
        token, new position). Returns those with the decode and compute seconds and the KV bytes."""
        sess = self._get(session_id)
        with sess.lock:
            if sess.closed:
                raise SplitError(Status.NOT_FOUND, f"session {session_id:#x} is closed or expired")
            sess.last_active = time.monotonic()
            if seq != sess.seq:
                raise SplitError(Status.INVALID_ARGUMENT, f"step sequence number {seq}, expected {sess.seq}")
            t0 = time.perf_counter()
            hidden = self._decode(frame, sess)
            tokens = hidden.shape[0]
            if tokens < drafts + 1:
                raise SplitError(Status.INVALID_ARGUMENT,
                                 f"frame holds {tokens} rows, {drafts} drafts need at least {drafts + 1}")
            t1 = time.perf_counter()
            try:
                accepted, token, position = run(sess, hidden)
            except SplitError:
                raise  # refused before the cache was touched (a batching scheduler's admission)
            except (MemoryError, torch.OutOfMemoryError) as exc:  # the cache may be half-updated: drop it
                self._drop(sess)
                raise SplitError(Status.RESOURCE_EXHAUSTED, f"server out of memory running the step: {exc}") from None
            except Exception as exc:  # the cache may be half-updated: this session cannot go on
                self._drop(sess)
                raise SplitError(Status.INTERNAL, f"server segment failed: {type(exc).__name__}: {exc}") from exc
            t2 = time.perf_counter()
            sess.position = position
            sess.seq += 1
            sess.kv_bytes = self._cache_bytes(sess)
            sess.last_active = time.monotonic()
            result = accepted, token, position, t1 - t0, t2 - t1, sess.kv_bytes
        self._event("step", session=sess.id, tokens=tokens, frame_bytes=len(frame), seconds=time.perf_counter() - t0)
        return result

    def _decode(self, frame: bytes, sess: _Session) -> torch.Tensor:
        """Decode a step's frame where the layers run, after its header passed this session's
        limits (hidden size, tokens left, KV budget): a forged header costs no allocation."""
        room = sess.max_seq_len - sess.position
        limits = FrameLimits(d=self._hidden_size, max_tokens=room)
        try:
            hidden = decode_frame(frame, limits, self._device, config=sess.codec, embedding=self._table)
        except FrameLimitError as exc:
            status = Status.INVALID_ARGUMENT if exc.field in ("d", "dtype") else Status.RESOURCE_EXHAUSTED
            raise SplitError(status, f"frame refused: {exc} (session at position {sess.position} of "
                                     f"{sess.max_seq_len})") from None
        except FrameError as exc:
            raise SplitError(Status.INVALID_ARGUMENT, f"bad frame: {exc}") from None
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise SplitError(Status.RESOURCE_EXHAUSTED, f"out of memory decoding the frame: {exc}") from None
        tokens = hidden.shape[0]
        if tokens == 0:
            raise SplitError(Status.INVALID_ARGUMENT, "frame holds no tokens")
        if sess.position + tokens > sess.max_seq_len:
            raise SplitError(Status.RESOURCE_EXHAUSTED,
                             f"sequence length {sess.position + tokens} exceeds the limit {sess.max_seq_len}")
        if self.limits.max_kv_bytes is not None:
            grow = tokens * self.kv_bytes_per_token
            if self.kv_bytes_total() + grow > self.limits.max_kv_bytes:
                raise SplitError(Status.RESOURCE_EXHAUSTED,
                                 f"server KV cache budget of {self.limits.max_kv_bytes} bytes is spent")
        return hidden

    def _eager_cache(self, sess: _Session):
        """The session's cache as the model's own (transformers) cache, holding every position."""
        return sess.cache.dynamic() if isinstance(sess.cache, FastCache) else sess.cache

    def _cache_bytes(self, sess: _Session) -> int:
        """Bytes the session's KV cache holds."""
        return cache_nbytes(sess.cache)

    def _compute(self, sess: _Session, hidden: torch.Tensor) -> int:
        """Run the server layers on ``hidden`` ``[T, d]`` with the session's cache; the next token.
        (:class:`~splitkernels.runtime.batching.BatchingSessionManager` batches this across sessions.)"""
        return self.server.next_token(hidden, sess.cache, sess.position, sess.open_msg.sampling, sess.generator)

    def close(self, session_id: int) -> bool:
        """Free a session; False if it was not open."""
        with self._lock:
            sess = self._sessions.pop(session_id, None)
        if sess is None:
            return False
        with sess.lock:
            self._free(sess)
        self._event("closed", session=session_id, position=sess.position)
        return True

    def handle(self, data: bytes) -> bytes | None:
        """One request message in, its reply out (None for CLOSE); raises :class:`SplitError`."""
        msg = decode_message(data)
        if isinstance(msg, Open):
            return encode_message(self.open(msg))
        if isinstance(msg, Step):
            return encode_message(self.step(msg))
        if isinstance(msg, Verify):
            return encode_message(self.verify(msg))
        if isinstance(msg, Close):
            self.close(msg.session_id)
            return None
        raise SplitError(Status.INVALID_ARGUMENT, f"{type(msg).__name__} is not a request")

    # -- housekeeping ----------------------------------------------------------------------------
    def _free(self, sess: _Session) -> None:
        sess.closed = True
        sess.cache = None
        sess.kv_bytes = 0

    def _drop(self, sess: _Session) -> None:
        with self._lock:
            self._sessions.pop(sess.id, None)
        self._free(sess)

    def reap_idle(self) -> int:
        """Close sessions idle longer than the timeout; returns how many."""
        deadline = time.monotonic() - self.limits.idle_timeout_s
        with self._lock:
            stale = [s for s in self._sessions.values() if s.last_active < deadline]
        expired = []
        for sess in stale:
            if not sess.lock.acquire(blocking=False):
                continue  # stepping right now, so not idle
            try:
                if sess.last_active < deadline and not sess.closed:
                    with self._lock:
                        self._sessions.pop(sess.id, None)
                    self._free(sess)
                    expired.append(sess)
            finally:
                sess.lock.release()
        for sess in expired:
            self._event("expired", session=sess.id, position=sess.position)
            if sess.on_expire is not None:
                sess.on_expire()
        self.sessions_expired += len(expired)
        return len(expired)

    @property
    def num_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def kv_bytes_total(self) -> int:
        with self._lock:
            return sum(s.kv_bytes for s in self._sessions.values())

    def stats(self) -> dict:
        """Sessions and memory: per-session KV bytes and positions, totals, weight bytes."""
        with self._lock:
            sessions = [{"id": f"{s.id:016x}", "position": s.position, "kv_bytes": s.kv_bytes,
                         "idle_s": round(time.monotonic() - s.last_active, 3)} for s in self._sessions.values()]
        return {
            "sessions": len(sessions),
            "sessions_opened": self.sessions_opened,
            "sessions_expired": self.sessions_expired,
            "kv_bytes": sum(s["kv_bytes"] for s in sessions),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_bytes": self.server.weight_bytes(),
            "max_seq_len": self.max_seq_len,
            "limits": {"max_sessions": self.limits.max_sessions, "max_seq_len": self.limits.max_seq_len,
                       "idle_timeout_s": self.limits.idle_timeout_s, "max_kv_bytes": self.limits.max_kv_bytes},
            "per_session": sessions,
        }
