"""A header deadline for uvicorn's h11 protocol: a connection that has not sent a complete request head within
``header_timeout`` seconds of opening (or of its previous response) is closed. uvicorn bounds idle keep-alive
connections but not a client that trickles its headers a byte at a time (slow-loris), which would otherwise hold
a connection slot for ever.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["header_deadline_protocol"]


class _HeaderDeadline(H11Protocol):
    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        # still waiting for (the rest of) a request head: drop the connection, nothing was dispatched yet
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is complete: the app and the body caps take over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this keep-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_deadline_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol closing connections whose request head is not complete within ``header_timeout``
    seconds; pass it as ``uvicorn.run(..., http=header_deadline_protocol(10))``."""
    if header_timeout <= 0:
        raise ValueError(f"header_timeout must be positive, got {header_timeout}")
    return type("HeaderDeadlineH11", (_HeaderDeadline,), {"header_timeout": float(header_timeout)})
