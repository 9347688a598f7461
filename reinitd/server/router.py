"""Where a NOTIFY goes: one handler per channel, called by the listener."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("reinitd.server.router")

# A channel's handler gets the payload and the listener's receipt time (time.monotonic()).
# It runs inside the listener's callback: it must be synchronous and only hand off.
ChannelHandler = Callable[[str, float], None]


class Router:
    """The table from LISTEN channels to their handlers; the listener LISTENs on its keys."""

    def __init__(self, routes: Mapping[str, ChannelHandler]) -> None:
        self._routes = dict(routes)

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def __call__(self, channel: str, payload: str, received_at: float) -> None:
        handler = self._routes.get(channel)
        if handler is None:  # not LISTENed here: cannot happen unless asyncpg misroutes
            log.warning("notify_unrouted", channel=channel)
            return
        handler(payload, received_at)
