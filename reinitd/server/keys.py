"""Every typed application and request key in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from reinitd.server.admission import Admission
from reinitd.server.doorbell import Doorbell
from reinitd.server.hub import Hub
from reinitd.server.internals import Paths
from reinitd.server.listener import Listener
from reinitd.server.presence import Presence
from reinitd.server.readiness import Readiness
from reinitd.server.refusal import Refusals
from reinitd.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
POOL = web.AppKey("pool", asyncpg.Pool)
LISTENER = web.AppKey("listener", Listener)
DOORBELL = web.AppKey("doorbell", Doorbell)
ADMISSION = web.AppKey("admission", Admission)
READINESS = web.AppKey("readiness", Readiness)
REFUSALS = web.AppKey("refusals", Refusals)
PRESENCE = web.AppKey("presence", Presence)  # absent with --presence off
INTERNALS = web.AppKey("internals", Paths)  # which private paths run (reinitd.server.internals)

REQUEST_ID = web.RequestKey("request_id", str)
# Set on a refused request that gets no access line (reinitd.server.access).
UNLOGGED = web.RequestKey("unlogged", bool)
