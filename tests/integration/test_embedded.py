"""`reinitd serve` without DATABASE_URL, as `make run` starts it: the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from reinitd.errors import EmbeddedError
from reinitd.server import embedded as postgres
from reinitd.server.embedded import free_port
from tests.support import reinitd_process, serve_args, stop_process, wait_ready

Starter = Callable[[Path, int], Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    """Start `reinitd serve` without DATABASE_URL in a folder; whatever a test leaves running
    is stopped afterwards (SIGTERM also stops its embedded PostgreSQL)."""
    started: list[asyncio.subprocess.Process] = []

    async def spawn(cwd: Path, port: int) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        process = await reinitd_process(
            *serve_args(port),
            cwd=cwd,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        return process

    yield spawn
    for process in started:
        await stop_process(process, timeout=30)


async def ready(port: int, process: asyncio.subprocess.Process) -> None:
    await wait_ready(f"http://127.0.0.1:{port}", process, timeout=60)


async def stop(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr
    return stdout, stderr


async def test_embedded_postgres_is_created_reused_and_stopped(
    tmp_path: Path, start: Starter
) -> None:
    """First start: initdb, DSN printed and written; a second serve is refused clearly;
    stop: PostgreSQL stops too; next start reuses the cluster and its data."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    port = free_port()
    first = await start(tmp_path, port)
    await ready(port, first)
    dsn = (tmp_path / ".reinitd" / "database_url").read_text().strip()
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    workspace = await conn.fetchval("SELECT workspace_id FROM reinitd.create_prebuild('keep')")
    await conn.close()

    second = await start(tmp_path, free_port())
    _, refused = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 1
    assert b"another `reinitd serve` is using the embedded PostgreSQL" in refused

    _, stderr = await stop(first)
    assert f"psql '{dsn}'".encode() in stderr
    assert not (tmp_path / ".reinitd" / "data" / "postmaster.pid").exists()

    again = await start(tmp_path, port)
    await ready(port, again)
    conn = await asyncpg.connect(dsn)
    assert (
        await conn.fetchval("SELECT count(*) FROM reinitd.workspaces WHERE id = $1", workspace) == 1
    )
    await conn.close()
    stdout, _ = await stop(again)
    assert b"postgres_initdb" not in stdout  # reused, not initialised again


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback is for root without user namespaces")
def test_root_fallback_to_an_unprivileged_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where user namespaces are refused (a default Docker container), root runs PostgreSQL
    as the unprivileged system user instead."""
    monkeypatch.setattr(postgres, "_userns_works", lambda: False)
    root = Path(tempfile.mkdtemp(prefix="reinitd-fallback-"))
    os.chmod(root, 0o755)  # noqa: S103 -- traversable by the unprivileged user
    try:
        try:
            postgres._check_traversable(postgres.find_bindir())
        except EmbeddedError as exc:
            pytest.skip(f"this checkout is not reachable by other users: {exc}")
        cluster = postgres.ensure_cluster(root, fsync=False)
        try:
            assert cluster.psql("SELECT current_setting('data_directory')").strip() == str(
                root / "data"
            )
            owner = (root / "data").stat().st_uid
            assert owner == pwd.getpwnam(postgres.FALLBACK_USER).pw_uid
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
