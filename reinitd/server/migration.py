"""Apply the ordered `sql/migrations/*.sql` files that a database is missing."""

from __future__ import annotations

import asyncpg
import structlog

from reinitd.server import database
from reinitd.server.query import QUERIES, migrations

log = structlog.get_logger("reinitd.server.migration")


async def _applied(conn: asyncpg.Connection) -> set[str]:
    if not await conn.fetchval(QUERIES["migration_table_exists"]):
        return set()
    return {row["name"] for row in await conn.fetch(QUERIES["applied_migrations"])}


async def migrate(dsn: str, *, connect_timeout: float = database.CONNECT_TIMEOUT) -> list[str]:
    """Apply missing migrations in one transaction; returns the names applied.

    With nothing missing it only reads, so a server running under the least-privileged
    `reinitd_server` role can start. Otherwise an advisory lock taken first serialises
    replicas that start at once: the second waits, then finds everything recorded.
    """
    conn = await database.connect(dsn, timeout=connect_timeout)
    applied: list[str] = []
    try:
        done = await _applied(conn)
        if any(name not in done for name, _ in migrations()):
            async with conn.transaction():
                await conn.execute(QUERIES["migration_lock"])
                await conn.execute(QUERIES["migration_table"])
                done = await _applied(conn)
                for name, sql in migrations():
                    if name in done:
                        continue
                    log.info("migration_applying", migration=name)
                    await conn.execute(sql)
                    await conn.execute(QUERIES["record_migration"], name)
                    applied.append(name)
    finally:
        await conn.close()
    log.info("migrations_done", applied=applied, already=len(done))
    return applied
