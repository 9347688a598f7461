"""Every typed application key in one place."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from reinitd.admission import Admission
from reinitd.doorbell import Doorbell
from reinitd.hub import Hub
from reinitd.limit import Refusals
from reinitd.listener import Listener
from reinitd.readiness import Readiness
from reinitd.settings import Settings


@dataclass
class Lifecycle:
    """Mutable run state (an app's own keys are frozen once it starts)."""

    stopping: bool = False


SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)
DOORBELL = web.AppKey("doorbell", Doorbell)
ADMISSION = web.AppKey("admission", Admission)
READINESS = web.AppKey("readiness", Readiness)
REFUSALS = web.AppKey("refusals", Refusals)
