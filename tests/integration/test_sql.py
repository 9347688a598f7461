"""The SQL API and migrations (docs/protocol.md §2), on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg
import pytest

from reinitd.server.claim import PREBUILDS_USER_ID
from reinitd.server.embedded import Cluster
from reinitd.server.migration import migrate
from reinitd.server.query import migrations
from tests.support import Provisioned, Sql


async def test_prebuild_is_owned_and_built_by_prebuilds_user(
    sql: Sql, conn: asyncpg.Connection
) -> None:
    """create_prebuild: owner and build-1 initiator are the prebuilds user; token only hashed."""
    agent = await sql.prebuild("pool-1")
    owner = await conn.fetchval(
        "SELECT owner_id FROM reinitd.workspaces WHERE id = $1", agent.workspace_id
    )
    build = await conn.fetchrow(
        "SELECT * FROM reinitd.workspace_builds WHERE workspace_id = $1", agent.workspace_id
    )
    assert owner == PREBUILDS_USER_ID
    assert build is not None
    assert (build["build_number"], build["stage"], build["status"]) == (1, "prebuild", "succeeded")
    assert build["initiator_id"] == PREBUILDS_USER_ID
    stored = await conn.fetchval(
        "SELECT token_hash FROM reinitd.workspace_agents WHERE id = $1", agent.agent_id
    )
    assert stored == hashlib.sha256(agent.token.encode()).digest()
    assert str(uuid.UUID(agent.token)) == agent.token  # canonical UUID text


async def test_claim_moves_owner_and_adds_succeeded_claim_build(
    sql: Sql, conn: asyncpg.Connection
) -> None:
    """claim_prebuild: new owner, build 2 is a succeeded claim by the new owner."""
    agent = await sql.prebuild()
    owner = await sql.user()
    build_id = await sql.claim(agent.workspace_id, owner)
    build = await conn.fetchrow("SELECT * FROM reinitd.workspace_builds WHERE id = $1", build_id)
    assert build is not None
    assert (build["build_number"], build["stage"], build["status"]) == (2, "claim", "succeeded")
    assert build["initiator_id"] == owner
    assert build["completed_at"] is not None


async def test_claim_announces_exact_payload(sql: Sql, database_url: str) -> None:
    """The NOTIFY payload names the workspace and the reason, and not the owner: any role that
    can connect may LISTEN."""
    listener: asyncpg.Connection = await asyncpg.connect(database_url)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("prebuild_claimed", lambda *args: got.put_nowait(args[3]))
    try:
        agent = await sql.prebuild()
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        payload = await asyncio.wait_for(got.get(), 5)
        assert payload == f'{{"workspace_id":"{agent.workspace_id}","reason":"prebuild_claimed"}}'
        build = await sql.claim((await sql.prebuild()).workspace_id, owner, complete=False)
        await sql.complete(build, "nope")
        failed = await asyncio.wait_for(got.get(), 5)
        assert failed.endswith('","reason":"claim_failed"}')
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("claim twice", "is not a prebuild"),
        ("claim regular", "is not a prebuild"),
        ("claim missing", "does not exist"),
        ("claim by prebuilds user", "is not a user who can claim"),
        ("complete twice", "is already succeeded"),
        ("build while running", "has a build in progress"),
        ("empty user", "must not be empty"),
        ("duplicate user", "already exists"),
    ],
)
async def test_misuse_raises_clear_message(sql: Sql, case: str, message: str) -> None:
    """Every SQL function refuses misuse with a clear RAISE message."""
    owner = await sql.user()
    agent = await sql.prebuild()
    with pytest.raises(asyncpg.PostgresError, match=message):
        await misuse(sql, case, owner, agent)


async def misuse(sql: Sql, case: str, owner: uuid.UUID, agent: Provisioned) -> None:
    """Perform one misuse of the SQL API, by name."""
    match case:
        case "claim twice":
            await sql.claim(agent.workspace_id, owner)
            await sql.claim(agent.workspace_id, owner)
        case "claim regular":
            regular = await sql.workspace(owner)
            await sql.claim(regular.workspace_id, owner)
        case "claim missing":
            await sql.claim(uuid.uuid4(), owner)
        case "claim by prebuilds user":
            await sql.claim(agent.workspace_id, PREBUILDS_USER_ID)
        case "complete twice":
            build = await sql.claim(agent.workspace_id, owner, complete=False)
            await sql.complete(build)
            await sql.complete(build)
        case "build while running":
            await sql.claim(agent.workspace_id, owner, complete=False)
            await sql.start_build(agent.workspace_id, owner)
        case "empty user":
            await sql.conn.fetchval("SELECT reinitd.create_user('  ')")
        case "duplicate user":
            await sql.conn.fetchval("SELECT reinitd.create_user('prebuilds')")


async def test_failed_claim_is_not_partially_applied(sql: Sql, conn: asyncpg.Connection) -> None:
    """A refused claim changes nothing: the workspace is still a prebuild."""
    agent = await sql.prebuild()
    with pytest.raises(asyncpg.PostgresError):
        await sql.claim(agent.workspace_id, uuid.uuid4())
    owner = await conn.fetchval(
        "SELECT owner_id FROM reinitd.workspaces WHERE id = $1", agent.workspace_id
    )
    assert owner == PREBUILDS_USER_ID


async def test_migrate_is_idempotent_and_safe_concurrently(postgres: Cluster) -> None:
    """Five replicas migrating a fresh database at once apply each migration exactly once."""
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin: asyncpg.Connection = await asyncpg.connect(postgres.dsn())
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = postgres.dsn(name)
        results = await asyncio.gather(*(migrate(dsn) for _ in range(5)))
        applied = [name for result in results for name in result]
        assert sorted(applied) == [m for m, _ in migrations()]
        assert await migrate(dsn) == []
        check: asyncpg.Connection = await asyncpg.connect(dsn)
        try:
            assert await check.fetchval("SELECT count(*) FROM reinitd.schema_migrations") == len(
                migrations()
            )
        finally:
            await check.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
