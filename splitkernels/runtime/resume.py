"""Sessions that survive a broken stream or a server restart.

:class:`ResumingTransport` wraps any transport. Its sessions remember the frames they sent and
the tokens that came back; when a step fails because the stream broke (UNAVAILABLE, or CANCELLED
by the server), the session is reopened with bounded, backed-off retries and the remembered
frames are replayed, in order, before the failed step is sent again. Replaying the very frames
the server saw rebuilds its KV cache and advances a seeded sampler exactly as the first time, so
the output is identical to an uninterrupted run (greedy and seeded sampling; an unseeded sampler
draws afresh). A prefill of the token history would be cheaper on the server, but batched and
incremental layers round differently, so it could change a greedy choice: replay is exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .protocol import Open, SplitError, Status
from .transport import Exchange, SessionHandle, Transport

# The stream (not the request) failed: the server went away, restarted, or dropped the stream.
RESUMABLE = frozenset({Status.UNAVAILABLE, Status.CANCELLED})


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` reopenings per failure, waiting ``initial_s`` then ``multiplier`` times longer
    each time, at most ``max_s``; ``attempts=0`` turns resumption off."""

    attempts: int = 6
    initial_s: float = 0.25
    multiplier: float = 2.0
    max_s: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 0:
            raise ValueError(f"attempts must be an int >= 0, got {self.attempts!r}")
        if not (self.initial_s >= 0 and self.multiplier >= 1 and self.max_s >= self.initial_s):
            raise ValueError("need initial_s >= 0, multiplier >= 1 and max_s >= initial_s")

    def delays(self):
        delay = self.initial_s
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * self.multiplier, self.max_s)


class ResumeError(SplitError):
    """A resumed session could not be brought back to where the first one was."""


class _ResumingSession(SessionHandle):
    def __init__(self, transport: "ResumingTransport", request: Open) -> None:
        self._transport, self._request = transport, request
        self._frames: list[bytes] = []
        self._tokens: list[int] = []
        self._inner = transport._open_with_retries(request)
        self.session_id, self.max_seq_len = self._inner.session_id, self._inner.max_seq_len

    @property
    def _deterministic(self) -> bool:
        s = self._request.sampling
        return not s.do_sample or s.seed is not None

    def step(self, seq: int, frame: bytes) -> Exchange:
        if seq != len(self._frames):
            raise ValueError(f"steps must come in order: got seq {seq}, expected {len(self._frames)}")
        try:
            ex = self._inner.step(seq, frame)
        except SplitError as exc:
            if exc.status not in RESUMABLE:
                raise
            ex = self._resume_and_step(seq, frame, exc)
        self._frames.append(frame)
        self._tokens.append(ex.reply.token)
        return ex

    def _resume_and_step(self, seq: int, frame: bytes, first: SplitError) -> Exchange:
        last = first
        for delay in self._transport.policy.delays():
            time.sleep(delay)
            try:
                self._inner.cancel()
                self._inner = self._transport.inner.open(self._request)
                replies = self._inner.replay(self._frames)
                self._check(replies)
                ex = self._inner.step(seq, frame)
            except SplitError as exc:
                if exc.status not in RESUMABLE:
                    raise
                last = exc
                continue
            self._transport.resumes += 1
            self.session_id = self._inner.session_id
            return ex
        raise SplitError(last.status, f"{last.message} (gave up after {self._transport.policy.attempts} attempts "
                                      f"to resume the session)")

    def _check(self, replies) -> None:
        if not self._deterministic:
            return
        for i, (reply, token) in enumerate(zip(replies, self._tokens)):
            if reply.token != token:
                raise ResumeError(Status.FAILED_PRECONDITION,
                                  f"the resumed session diverged at step {i}: token {reply.token}, first run "
                                  f"{token} (is the restarted server the same model and split?)")

    def close(self) -> None:
        self._inner.close()

    def cancel(self) -> None:
        self._inner.cancel()


class ResumingTransport(Transport):
    """Sessions on ``inner`` that reopen and replay themselves when their stream breaks;
    :attr:`resumes` counts how often that happened."""

    def __init__(self, inner: Transport, policy: RetryPolicy | None = None) -> None:
        if not isinstance(inner, Transport):
            raise TypeError(f"inner must be a Transport, got {type(inner).__name__}")
        self.inner, self.policy = inner, policy or RetryPolicy()
        self.resumes = 0

    def _open_with_retries(self, request: Open) -> SessionHandle:
        delays = self.policy.delays()
        while True:
            try:
                return self.inner.open(request)
            except SplitError as exc:
                delay = next(delays, None) if exc.status is Status.UNAVAILABLE else None
                if delay is None:
                    raise
                time.sleep(delay)

    def open(self, request: Open) -> SessionHandle:
        return _ResumingSession(self, request)

    def close(self) -> None:
        self.inner.close()
