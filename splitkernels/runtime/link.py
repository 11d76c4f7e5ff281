"""A link emulator in front of any transport: adds round-trip time and serialisation delay at a
given bandwidth to every exchange, for experiments on links slower than the one at hand."""
from __future__ import annotations

import math
import time

from .protocol import Open
from .transport import Exchange, SessionHandle, Transport


def link_delay(bytes_up: int, bytes_down: int, bandwidth_bps: float, rtt_s: float) -> float:
    """Seconds one request/reply takes on the link: RTT + both messages' bits / bandwidth."""
    return rtt_s + 8.0 * (bytes_up + bytes_down) / bandwidth_bps


class _LinkSession(SessionHandle):
    def __init__(self, inner: SessionHandle, link: "LinkEmulator") -> None:
        self._inner, self._link = inner, link
        self.session_id, self.max_seq_len = inner.session_id, inner.max_seq_len

    def step(self, seq: int, frame: bytes) -> Exchange:
        return self._delayed(self._inner.step(seq, frame))

    def verify(self, seq: int, drafts: tuple[int, ...], frame: bytes) -> Exchange:
        return self._delayed(self._inner.verify(seq, drafts, frame))

    def _delayed(self, ex: Exchange) -> Exchange:
        delay = self._link.delay(ex.bytes_up, ex.bytes_down)
        virtual = ex.virtual_link_s + (0.0 if self._link.sleep else delay)
        return Exchange(ex.reply, ex.bytes_up, ex.bytes_down, virtual)

    def close(self) -> None:
        self._inner.close()


class LinkEmulator(Transport):
    """Wraps ``inner`` so each exchange also costs ``rtt_s`` plus its bytes at ``bandwidth_bps``.

    ``sleep=True`` really waits (wall-clock latency as on the link); ``sleep=False`` only reports
    the delay in the step metrics, for fast what-if runs.
    """

    def __init__(self, inner: Transport, bandwidth_bps: float, rtt_s: float = 0.0, sleep: bool = True) -> None:
        if not isinstance(inner, Transport):
            raise TypeError(f"inner must be a Transport, got {type(inner).__name__}")
        if not (isinstance(bandwidth_bps, (int, float)) and math.isfinite(bandwidth_bps) and bandwidth_bps > 0):
            raise ValueError(f"bandwidth_bps must be a finite number > 0, got {bandwidth_bps!r}")
        if not (isinstance(rtt_s, (int, float)) and math.isfinite(rtt_s) and rtt_s >= 0):
            raise ValueError(f"rtt_s must be a finite number >= 0, got {rtt_s!r}")
        self.inner, self.bandwidth_bps, self.rtt_s, self.sleep = inner, float(bandwidth_bps), float(rtt_s), sleep

    def delay(self, bytes_up: int, bytes_down: int) -> float:
        d = link_delay(bytes_up, bytes_down, self.bandwidth_bps, self.rtt_s)
        if self.sleep:
            time.sleep(d)
        return d

    def open(self, request: Open) -> SessionHandle:
        handle = self.inner.open(request)
        self.delay(0, 0)  # the open handshake costs one round trip
        return _LinkSession(handle, self)

    def close(self) -> None:
        self.inner.close()
