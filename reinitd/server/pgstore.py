"""The database port on PostgreSQL: each call one statement on a pooled connection."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from reinitd.server.claim import Verdict, judge, read_verdicts
from reinitd.server.database import pooled
from reinitd.server.query import QUERIES
from reinitd.server.store import Admitted, Present, Receipt


class PgStore:
    """reinitd.server.store.Store on an asyncpg pool; every call waits at most `timeout` for a
    connection (and the pool's command timeout bounds its query)."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def admit_many(self, token_hashes: Sequence[bytes]) -> list[Admitted | None]:
        async with pooled(self.pool, self.timeout) as conn:
            if len(token_hashes) == 1:  # a lone connect: the cheaper single-hash statement
                rows = await conn.fetch(QUERIES["admit_one"], token_hashes[0])
            else:
                rows = await conn.fetch(QUERIES["admit_many"], token_hashes)
        found: list[Admitted | None] = [None] * len(token_hashes)
        for row in rows:  # null columns: the workspace is gone
            verdict = judge(row if row["owner_id"] is not None else None)
            found[row["i"] - 1] = Admitted(row["agent_id"], row["workspace_id"], verdict)
        return found

    async def verdicts(self, workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        async with pooled(self.pool, self.timeout) as conn:
            return await read_verdicts(conn, workspace_ids)

    async def report_presence(
        self,
        replica: str,
        ttl: float,
        *,
        full: bool,
        present: Sequence[Present],
        left: Sequence[int],
    ) -> bool:
        async with pooled(self.pool, self.timeout) as conn:
            known: bool = await conn.fetchval(
                QUERIES["report_presence"],
                replica,
                ttl,
                full,
                [p.seq for p in present],
                [p.agent_id for p in present],
                [p.workspace_id for p in present],
                [p.mode for p in present],
                [p.wait for p in present],
                [p.age for p in present],
                list(left),
            )
        return known

    async def retire(self, replica: str) -> None:
        async with pooled(self.pool, self.timeout) as conn:
            await conn.execute(QUERIES["retire_replica"], replica)

    async def record_deliveries(self, replica: str, receipts: Sequence[Receipt]) -> None:
        async with pooled(self.pool, self.timeout) as conn:
            await conn.execute(
                QUERIES["record_deliveries"],
                replica,
                [r.workspace_id for r in receipts],
                [r.agent_id for r in receipts],
                [r.build_id for r in receipts],
                [r.kind for r in receipts],
                [r.path for r in receipts],
                [r.age for r in receipts],
            )

    async def prune_deliveries(self, keep: float, limit: int) -> int:
        async with pooled(self.pool, self.timeout) as conn:
            gone: int = await conn.fetchval(QUERIES["prune_deliveries"], keep, limit)
        return gone
