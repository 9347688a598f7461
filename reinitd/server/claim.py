"""The durable check: what a workspace's builds say a waiting agent should get."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import asyncpg

from reinitd.server.query import QUERIES
from reinitd.wire import ReinitEvent

# The prebuilds system user: a workspace is a prebuild while this user owns it.
PREBUILDS_USER_ID: Final = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")

NOT_WAITING_MESSAGE = "Workspace is not a prebuilt workspace waiting to be claimed."
CLAIM_FAILED_MESSAGE = "Claim build failed permanently."


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to deliver yet: the claim has not happened or its build is still running."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """The claim, and the claim build it comes from (for the delivery receipt)."""

    event: ReinitEvent
    build_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """A 409: the agent must stop waiting; `build_id` is the latest build, when there is one."""

    message: str
    detail: str
    build_id: uuid.UUID | None = None


Verdict = Wait | Deliver | Refuse


class Row(Protocol):
    """A `claim_states` row: an asyncpg Record, or a dict in tests."""

    def __getitem__(self, key: str, /) -> Any: ...


WAIT = Wait()


def judge(row: Row | None) -> Verdict:
    """Apply the `wait=true` rules (docs/protocol.md) to a `claim_states` row (None: the
    workspace is gone)."""
    if row is None:
        return Refuse(NOT_WAITING_MESSAGE, "The workspace no longer exists.")
    owner: uuid.UUID = row["owner_id"]
    if owner == PREBUILDS_USER_ID:
        return WAIT
    build: uuid.UUID | None = row["latest_build_id"]
    if row["first_initiator_id"] != PREBUILDS_USER_ID:
        return Refuse(NOT_WAITING_MESSAGE, "The workspace was not created as a prebuild.", build)
    if row["latest_stage"] != "claim":
        return Refuse(
            NOT_WAITING_MESSAGE,
            f"The workspace was claimed in the past; its latest build is a "
            f"{row['latest_stage']!r} build.",
            build,
        )
    match row["latest_status"]:
        case "failed":
            return Refuse(CLAIM_FAILED_MESSAGE, row["latest_error"] or "", build)
        case "succeeded":
            return Deliver(ReinitEvent(row["workspace_id"], owner_id=owner), build)
        case _:
            return WAIT


async def read_verdicts(
    db: asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    workspace_ids: Sequence[uuid.UUID],
) -> dict[uuid.UUID, Verdict]:
    """One round trip: the verdict for every workspace in `workspace_ids`."""
    rows = await db.fetch(QUERIES["claim_states"], workspace_ids)
    found: dict[uuid.UUID, Row] = {row["workspace_id"]: row for row in rows}
    return {ws: judge(found.get(ws)) for ws in workspace_ids}
