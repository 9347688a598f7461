"""The database port in memory: for the unit tier and for benchmarks that leave PostgreSQL
out (as procrastinate ships its InMemoryConnector)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from collections.abc import Sequence

from reinitd.server.claim import WAIT, Verdict, judge
from reinitd.server.store import Admitted, Present, Receipt

GONE: Verdict = judge(None)  # what the builds say of a workspace that does not exist


class MemoryStore:
    """reinitd.server.store.Store with the database's answers set by hand.

    `verdicts` is what the builds say about each workspace (a workspace it does not hold is
    gone); presence and receipts are kept as the SQL keeps them. `fail`, when set, is raised
    by every call (an outage); `calls` counts the calls by name (statements sent). While
    `hold` is set, `admit_many` stops between its read and its answer (`reading` tells when), the
    instant where a claim must not slip through."""

    def __init__(self) -> None:
        self.agents: dict[bytes, tuple[uuid.UUID, uuid.UUID]] = {}
        self.states: dict[uuid.UUID, Verdict] = {}
        self.presence: dict[str, dict[int, Present]] = {}
        self.receipts: list[tuple[str, Receipt]] = []
        self.calls: Counter[str] = Counter()
        self.fail: Exception | None = None
        self.hold: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def add_agent(self, token: str, workspace_id: uuid.UUID | None = None) -> uuid.UUID:
        """An agent (a new workspace unless given) waiting to be claimed; returns the
        workspace."""
        workspace_id = workspace_id or uuid.uuid4()
        self.agents[hashlib.sha256(token.encode()).digest()] = (uuid.uuid4(), workspace_id)
        self.states.setdefault(workspace_id, WAIT)
        return workspace_id

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.fail is not None:
            raise self.fail

    async def admit_many(self, token_hashes: Sequence[bytes]) -> list[Admitted | None]:
        self._call("admit_many")
        found = [self.agents.get(token_hash) for token_hash in token_hashes]
        answers: list[Admitted | None] = [
            None if f is None else Admitted(f[0], f[1], self.states.get(f[1], GONE)) for f in found
        ]
        if self.hold is not None:
            self.reading.set()
            await self.hold.wait()
        return answers

    async def verdicts(self, workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        self._call("verdicts")
        return {ws: self.states.get(ws, GONE) for ws in workspace_ids}

    async def report_presence(
        self,
        replica: str,
        ttl: float,
        *,
        full: bool,
        present: Sequence[Present],
        left: Sequence[int],
    ) -> bool:
        self._call("report_presence")
        rows = self.presence.get(replica)
        if rows is None:
            if not full:
                return False
            rows = self.presence[replica] = {}
        elif full:
            rows.clear()
        for seq in left:
            rows.pop(seq, None)
        for row in present:
            rows.setdefault(row.seq, row)
        return True

    async def retire(self, replica: str) -> None:
        self._call("retire")
        self.presence.pop(replica, None)

    async def record_deliveries(self, replica: str, receipts: Sequence[Receipt]) -> None:
        self._call("record_deliveries")
        self.receipts.extend((replica, receipt) for receipt in receipts)

    async def prune_deliveries(self, keep: float, limit: int) -> int:
        self._call("prune_deliveries")
        return 0
