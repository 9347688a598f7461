"""The stop signals and the policy for them, shared by `serve` and its workers' supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

# The signals that ask a process to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop:
    """The process's signal policy, for its whole life: the first SIGINT, SIGTERM or SIGHUP
    asks for a clean stop (waking the running event loop, if any); a second SIGINT raises
    KeyboardInterrupt, which cuts a slow shutdown short (cleanup still runs)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum
            if self._loop is not None and self._event is not None:
                self._loop.call_soon_threadsafe(self._event.set)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (so far)."""
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[Stop]:
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def wait(self) -> None:
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        if self.signal is not None:
            self._event.set()
        try:
            await self._event.wait()
        finally:
            self._loop = self._event = None
