"""Every typed application key in one place."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from reinitd.delivery import Resyncer
from reinitd.hub import Hub
from reinitd.limit import Refusals, StreamsPerAgent
from reinitd.listener import Listener
from reinitd.readiness import Readiness
from reinitd.settings import Settings


@dataclass
class Lifecycle:
    """Mutable run state (an app's own keys are frozen once it starts)."""

    stopping: bool = False
    # Test seam: awaited after the queue is registered and before the build read.
    before_durable_check: Callable[[uuid.UUID], Awaitable[None]] | None = None


SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)
RESYNCER = web.AppKey("resyncer", Resyncer)
READINESS = web.AppKey("readiness", Readiness)
STREAM_LIMITS = web.AppKey("stream_limits", StreamsPerAgent)
REFUSALS = web.AppKey("refusals", Refusals)
