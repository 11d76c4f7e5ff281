"""The edge's view of a server: open a session, exchange one step, close. The in-process
transport calls a :class:`SessionManager` directly, still through the byte-level protocol, so
tests exercise exactly what crosses a wire."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .protocol import (
    Close, Open, Opened, ProtocolError, SplitError, Status, Step, TokenReply, Verdict, Verify, decode_message,
    encode_message,
)
from .sessions import SessionManager


@dataclass(frozen=True)
class Exchange:
    """One step's reply (a :class:`Verdict` for a multi-token step) and what it cost on the way:
    message bytes each direction, and link time an emulator reports without waiting for it
    (``LinkEmulator(sleep=False)``; else 0)."""

    reply: TokenReply | Verdict
    bytes_up: int
    bytes_down: int
    virtual_link_s: float = 0.0


class SessionHandle(ABC):
    """One open session on a server."""

    session_id: int
    max_seq_len: int

    @abstractmethod
    def step(self, seq: int, frame: bytes) -> Exchange:
        """Send codec frame number ``seq``; the server's token reply."""

    def verify(self, seq: int, drafts: tuple[int, ...], frame: bytes) -> Exchange:
        """Send a multi-token step: ``frame``'s last ``len(drafts)`` rows are drafts to verify."""
        raise SplitError(Status.FAILED_PRECONDITION,
                         f"{type(self).__name__} does not carry multi-token (speculative) steps")

    @abstractmethod
    def close(self) -> None:
        """Free the session on the server (idempotent)."""

    def replay(self, frames: list[bytes]) -> list[TokenReply]:
        """Send ``frames`` as steps 0..n-1 of a fresh session (a resumed session's history); the
        replies in order. Transports may pipeline them."""
        return [self.step(seq, frame).reply for seq, frame in enumerate(frames)]

    def cancel(self) -> None:
        """Drop the session without waiting for the server (it may be gone already)."""
        try:
            self.close()
        except SplitError:
            pass  # the session is gone either way

    def __enter__(self) -> "SessionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Transport(ABC):
    """Opens sessions on one server."""

    @abstractmethod
    def open(self, request: Open) -> SessionHandle:
        """Open a session; raises :class:`SplitError` when the server refuses."""

    def close(self) -> None:
        """Release the transport's own resources (channels)."""


def expect(reply: bytes, kind: type, session_id: int | None = None):
    """Parse a server reply and check it is the expected kind for the expected session."""
    msg = decode_message(reply)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected a {kind.__name__} reply, got {type(msg).__name__}")
    if session_id is not None and msg.session_id != session_id:
        raise ProtocolError(f"reply for session {msg.session_id:#x}, expected {session_id:#x}")
    return msg


class _InProcessSession(SessionHandle):
    def __init__(self, manager: SessionManager, opened: Opened) -> None:
        self._manager = manager
        self.session_id, self.max_seq_len = opened.session_id, opened.max_seq_len
        self._closed = False

    def step(self, seq: int, frame: bytes) -> Exchange:
        request = encode_message(Step(self.session_id, seq, frame))
        reply = self._manager.handle(request)
        return Exchange(expect(reply, TokenReply, self.session_id), len(request), len(reply))

    def verify(self, seq: int, drafts: tuple[int, ...], frame: bytes) -> Exchange:
        request = encode_message(Verify(self.session_id, seq, tuple(drafts), frame))
        reply = self._manager.handle(request)
        return Exchange(expect(reply, Verdict, self.session_id), len(request), len(reply))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.handle(encode_message(Close(self.session_id)))


class InProcessTransport(Transport):
    """Sessions on a :class:`SessionManager` in this process (tests, single-machine runs)."""

    def __init__(self, manager: SessionManager) -> None:
        if not isinstance(manager, SessionManager):
            raise TypeError(f"manager must be a SessionManager, got {type(manager).__name__}")
        self.manager = manager

    def open(self, request: Open) -> SessionHandle:
        return _InProcessSession(self.manager, expect(self.manager.handle(encode_message(request)), Opened))
