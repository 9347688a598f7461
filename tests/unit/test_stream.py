"""A stream after the take-over: what happens to a client that stops reading."""

from __future__ import annotations

import asyncio
import socket

from reinitd.server.hub import End, Hub
from tests.support import attach_stream, bare_admission


async def test_a_stream_ended_while_its_client_does_not_read_is_cut_off() -> None:
    """Ending a stream closes its connection, which waits for the buffer to drain: a client
    that never reads again is cut off when its write timeout runs out, and its slot freed."""
    hub = Hub()
    admission = bare_admission(hub)
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        sub = attach_stream(admission, hub, transport, write_timeout=0.2)
        transport.write(b"x" * (1 << 20))  # beyond the socket's buffers: writing pauses
        assert transport.get_write_buffer_size() > 0
        sub.end(End("test"))
        async with asyncio.timeout(5):
            while admission.in_use:
                await asyncio.sleep(0.02)
        assert len(hub) == 0
    finally:
        transport.abort()
        theirs.close()
