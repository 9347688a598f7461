"""The database port: every statement the server runs on the request and delivery paths, as
one small interface (PostgreSQL in reinitd.server.pgstore, memory in reinitd.server.memstore)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from reinitd.server.claim import Verdict


@dataclass(frozen=True, slots=True)
class Admitted:
    """A known token's agent and workspace, and what the durable check says of it (used by
    `wait=true` requests only)."""

    agent_id: uuid.UUID
    workspace_id: uuid.UUID
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Present:
    """A request waiting now, as a presence report carries it (`age`: seconds it has waited)."""

    seq: int
    agent_id: uuid.UUID
    workspace_id: uuid.UUID
    mode: str
    wait: bool
    age: float


@dataclass(frozen=True, slots=True)
class Receipt:
    """A claim event or an error frame written to an agent (`age`: seconds since the write)."""

    workspace_id: uuid.UUID
    agent_id: uuid.UUID
    build_id: uuid.UUID | None
    kind: str  # event | error
    path: str  # notify | seeded | resync
    age: float


class Store(Protocol):
    """What the server asks of its database."""

    async def admit_many(self, token_hashes: Sequence[bytes]) -> list[Admitted | None]:
        """For each token hash, its agent and its workspace's verdict (None: an unknown token),
        in one round trip however many."""

    async def verdicts(self, workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        """The verdict for every workspace of a batch, in one round trip."""

    async def report_presence(
        self,
        replica: str,
        ttl: float,
        *,
        full: bool,
        present: Sequence[Present],
        left: Sequence[int],
    ) -> bool:
        """Record what began and ended (or, `full`, everything held); False: the database did
        not know the replica and applied nothing (send everything)."""

    async def retire(self, replica: str) -> None:
        """Remove the replica and all it reported."""

    async def record_deliveries(self, replica: str, receipts: Sequence[Receipt]) -> None:
        """Write receipts, in one statement."""

    async def prune_deliveries(self, keep: float, limit: int) -> int:
        """Remove up to `limit` receipts older than `keep` seconds; returns how many went."""
