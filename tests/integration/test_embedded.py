"""`reinitd serve` without DATABASE_URL, as `make run` starts it: the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from reinitd.errors import EmbeddedError
from reinitd.server import embedded as postgres
from reinitd.server.embedded import free_port
from reinitd.server.query import QUERIES
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
    """Until /readyz answers 200; if it never does, fail with what the server printed so far."""
    try:
        await wait_ready(f"http://127.0.0.1:{port}", process, timeout=60)
    except (TimeoutError, RuntimeError) as exc:
        printed = []
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                with contextlib.suppress(TimeoutError):
                    printed.append((await asyncio.wait_for(pipe.read(1 << 16), 2)).decode())
        raise AssertionError(f"not ready ({exc!r}); it printed:\n" + "\n".join(printed)) from exc


async def stop(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr
    return stdout, stderr


async def test_embedded_postgres_is_created_reused_and_stopped(
    tmp_path: Path, start: Starter
) -> None:
    """First start: initdb, DSN printed and written; a second serve is refused clearly, naming
    the server role's URL to share the database with; stop: PostgreSQL stops too; next start
    reuses the cluster and its data."""
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
    # ... and says how to share its database, as the server role, never as the superuser.
    shared = refused.decode().split("DATABASE_URL='", 1)[1].split("'", 1)[0]
    conn = await asyncpg.connect(shared)
    try:
        role = await conn.fetchrow(
            "SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user"
        )
    finally:
        await conn.close()
    assert role is not None
    assert (role["name"], role["rolsuper"]) == ("reinitd_srv", False)

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


def postmaster_alive(root: Path) -> bool:
    pid_file = root / ".reinitd" / "data" / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


async def server_sessions(dsn: str) -> list[tuple[str, bool]]:
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT r.rolname, r.rolsuper FROM pg_stat_activity AS a "
            "JOIN pg_roles AS r ON r.oid = a.usesysid "
            "WHERE a.application_name LIKE 'reinitd%'"
        )
    finally:
        await conn.close()
    return [(row["rolname"], row["rolsuper"]) for row in rows]


async def test_the_embedded_cluster_is_private_and_served_without_superuser(
    tmp_path: Path, start: Starter
) -> None:
    """Another local account cannot log in to the embedded cluster by any route (no password
    to read, no Unix socket), and every session of the server is the non-superuser role."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    port = free_port()
    server = await start(tmp_path, port)
    await ready(port, server)
    root = tmp_path / ".reinitd"
    dsn = (root / "database_url").read_text().strip()
    sessions = await server_sessions(dsn)
    assert sessions
    assert set(sessions) == {(postgres.SERVER_ROLE, False)}
    assert (root / "pgpass").stat().st_mode & 0o077 == 0
    pg_port = int((root / "port").read_text())
    owner: asyncpg.Connection = await asyncpg.connect(dsn)
    try:  # no Unix socket anywhere, and TCP only on loopback
        assert await owner.fetchval("SHOW unix_socket_directories") == ""
        assert await owner.fetchval("SHOW listen_addresses") == "127.0.0.1"
    finally:
        await owner.close()
    passwordless = f"postgresql://postgres@127.0.0.1:{pg_port}/reinitd?sslmode=disable"
    empty = tmp_path / "empty-passfile"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(asyncpg.PostgresError):  # the password is required, even from here
        await asyncpg.connect(passwordless, passfile=str(empty))
    if os.geteuid() != 0:
        pytest.skip("the other-account half needs root (to act as nobody); it ran in CI")
    with psql_for_nobody() as psql:
        for argv in (
            [str(psql), "-w", "-d", passwordless, "-c", "SELECT 1"],
            [str(psql), "-w", "-d", dsn, "-c", "SELECT 1"],  # names a file nobody can read
            ["cat", str(root / "pgpass")],
        ):
            result = await asyncio.to_thread(as_nobody, argv)
            assert result.returncode != 0, argv


def as_nobody(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, user="nobody", capture_output=True, check=False, timeout=30)


def runs_for_nobody(psql: Path) -> bool:
    try:
        return as_nobody([str(psql), "--version"]).returncode == 0
    except PermissionError:  # a folder on its path is closed to nobody
        return False


@contextlib.contextmanager
def psql_for_nobody() -> Iterator[Path]:
    """A psql that `nobody` can run: the cluster's own, or, where it lies in a checkout other
    accounts cannot traverse (root's home is 0700), a copy of it and of the libraries its
    RPATH names ($ORIGIN/../../../embedded_postgres.libs) in a traversable temporary folder.
    Checked: nobody runs `psql --version`, so that its refusals below are the cluster's."""
    psql = postgres.find_bindir() / "psql"
    if runs_for_nobody(psql):
        yield psql
        return
    copy = Path(tempfile.mkdtemp(prefix="reinitd-psql-"))
    try:
        os.chmod(copy, 0o755)  # noqa: S103 -- traversable by nobody
        bindir = copy / "embedded_postgres" / "pginstall" / "bin"
        bindir.mkdir(parents=True)
        shutil.copy2(psql, bindir / "psql")
        libs = psql.parent.parent.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / "embedded_postgres.libs")
        for folder in [copy, *copy.rglob("*")]:
            if folder.is_dir():
                os.chmod(folder, 0o755)  # noqa: S103 -- traversable by nobody
        assert runs_for_nobody(bindir / "psql"), "nobody cannot run the copy of psql"
        yield bindir / "psql"
    finally:
        shutil.rmtree(copy, ignore_errors=True)


async def test_a_crash_keeps_the_port_and_sighup_stops_cleanly(
    tmp_path: Path, start: Starter
) -> None:
    """After a SIGKILL of serve (its PostgreSQL left running), the next start reuses the same
    port and URL; SIGHUP then stops it like SIGTERM, PostgreSQL included."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    port = free_port()
    first = await start(tmp_path, port)
    await ready(port, first)
    dsn = (tmp_path / ".reinitd" / "database_url").read_text()
    first.kill()
    await first.wait()
    assert postmaster_alive(tmp_path)  # the orphan holds the remembered port
    second = await start(tmp_path, port)
    await ready(port, second)
    assert (tmp_path / ".reinitd" / "database_url").read_text() == dsn
    second.send_signal(signal.SIGHUP)
    stdout, stderr = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, stderr
    assert b'"signal": "SIGHUP"' in stdout
    assert b"Traceback" not in stderr
    assert not postmaster_alive(tmp_path)


async def test_a_second_sigint_cuts_short_and_still_stops_postgres(
    tmp_path: Path, start: Starter
) -> None:
    """Ctrl-C twice: no traceback, and the embedded PostgreSQL is stopped all the same."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    port = free_port()
    server = await start(tmp_path, port)
    await ready(port, server)
    server.send_signal(signal.SIGINT)
    server.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(server.communicate(), 30)
    assert server.returncode in (0, 130), stderr
    assert b"Traceback" not in stderr
    assert not postmaster_alive(tmp_path)


async def test_an_interrupted_first_start_and_a_busy_port(tmp_path: Path, start: Starter) -> None:
    """A port in use is a one-line error before any work (no cluster made); the scratch folder
    of an initdb cut short is discarded and the next start works."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        refused = await start(tmp_path, port)
        _, stderr = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode == 1
    assert stderr.decode().strip().splitlines() == [
        f"reinitd serve: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another server is there: pick another port with --port or REINITD_PORT, "
        "e.g. make run REINITD_PORT=8081)"
    ]
    assert not (tmp_path / ".reinitd" / "data").exists()
    scratch = tmp_path / ".reinitd" / "data.initdb"
    scratch.mkdir(parents=True)
    (scratch / "PG_VERSION").write_text("18\n")  # what a Ctrl-C during initdb leaves
    server = await start(tmp_path, port)
    await ready(port, server)
    assert not scratch.exists()
    await stop(server)


def old_cluster(root: Path, superuser: str = "postgres") -> postgres.Cluster:
    """A cluster as reinitd 0.1 made it: trust authentication, and (as on PostgreSQL 13, its
    default) passwords stored as md5, which a scram-sha-256 pg_hba.conf rejects."""
    os.chmod(root, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    old = postgres.Cluster(root=root, bindir=postgres.find_bindir())
    result = old._run("initdb", "-D", str(old.datadir), "-U", superuser, "-A", "trust", "--no-sync")
    assert result.returncode == 0, result.stderr
    with (old.datadir / "postgresql.conf").open("a") as conf:
        conf.write("password_encryption = md5\n")
    return old


def assert_private(cluster: postgres.Cluster) -> None:
    """pg_hba.conf is reinitd's, the passfile logs in, and nothing logs in without it."""
    assert (cluster.datadir / "pg_hba.conf").read_text() == postgres.PG_HBA
    assert cluster.passfile.stat().st_mode & 0o077 == 0
    assert cluster.psql("SELECT 1").strip() == "1"
    naked = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres?sslmode=disable"
    empty = cluster.root / "empty-passfile"
    empty.write_text("")
    empty.chmod(0o600)
    with pytest.raises(asyncpg.PostgresError):
        asyncio.run(asyncpg.connect(naked, passfile=str(empty)))


def test_a_trust_cluster_of_an_older_reinitd_is_secured(tmp_path: Path) -> None:
    """A cluster made by reinitd 0.1 (trust authentication, no passfile) gets a password in
    single-user mode, stored as SCRAM whatever the cluster's default, and requires it, before
    it accepts any connection."""
    old_cluster(tmp_path)
    cluster = postgres.ensure_cluster(tmp_path, fsync=False)
    try:
        assert_private(cluster)
    finally:
        cluster.stop()


def test_a_securing_cut_short_is_done_again_at_the_next_start(tmp_path: Path) -> None:
    """The passfile is written before the single-user run: when that run fails, the next start
    still finds pg_hba.conf trusting everyone, and secures it with the password on file."""
    old = old_cluster(tmp_path)
    written = old._ensure_passwords()  # what a failed single-user run leaves behind
    cluster = postgres.ensure_cluster(tmp_path, fsync=False)
    try:
        assert_private(cluster)
        assert cluster._passwords() == written
    finally:
        cluster.stop()


def test_a_failed_securing_shows_no_password(tmp_path: Path) -> None:
    """When the single-user run fails (here: no role `postgres` to alter), start fails with the
    reason but without the password, and pg_hba.conf is left for the next start to fix."""
    old = old_cluster(tmp_path, superuser="someone")
    assert QUERIES["set_superuser_password"].count("$1") == 1
    with pytest.raises(EmbeddedError, match='role "postgres" does not exist') as failed:
        postgres.ensure_cluster(tmp_path, fsync=False)
    assert old._passwords()[postgres.SUPERUSER] not in str(failed.value)
    assert (old.datadir / "pg_hba.conf").read_text() != postgres.PG_HBA


@pytest.mark.parametrize("lost", [postgres.SERVER_ROLE, postgres.SUPERUSER])
def test_a_password_lost_from_the_passfile_is_made_again(tmp_path: Path, lost: str) -> None:
    """Only the missing password is generated: the server role's alone keeps the superuser's
    (which the cluster has), and a lost superuser's is set again in single-user mode."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    postgres.ensure_cluster(tmp_path, fsync=False).stop()
    first = postgres.Cluster(root=tmp_path, bindir=postgres.find_bindir())._passwords()
    kept = {user: password for user, password in first.items() if user != lost}
    (tmp_path / "pgpass").write_text("".join(f"127.0.0.1:*:*:{u}:{p}\n" for u, p in kept.items()))
    cluster = postgres.ensure_cluster(tmp_path, fsync=False)
    try:
        now = cluster._ensure_passwords()  # as ensure_server_role does
        assert_private(cluster)
        assert now.keys() == first.keys()
        assert {user: now[user] for user in kept} == kept
        assert now[lost] != first[lost]
    finally:
        cluster.stop()


async def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    text = await asyncio.to_thread(children.read_text)
    return [int(child) for child in text.split()]


async def test_workers_are_restarted_and_a_double_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    """With --workers 2: the port is held from the start, while the embedded PostgreSQL starts
    and before any worker listens (a plain bind is refused, and nothing connects to it yet);
    a worker killed with SIGKILL is reported at once and replaced, the port keeps answering;
    Ctrl-C twice to the whole process group (as a terminal sends it) ends the parent, its
    workers and the embedded PostgreSQL, without a traceback."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 -- traversable by an unprivileged PostgreSQL user
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    server = await reinitd_process(
        *serve_args(port, "--workers", "2"),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    printed = b""
    try:
        assert server.stderr is not None
        async with asyncio.timeout(30):
            while b"starting embedded PostgreSQL" not in printed:
                printed += await server.stderr.readline()  # the port is bound before this line
        with socket.socket() as other, pytest.raises(OSError, match="in use") as taken:
            other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))  # held, not listening: no connect is queued
        await ready(port, server)
        async with asyncio.timeout(30):
            while len(workers := await worker_pids(server.pid)) < 2:
                await asyncio.sleep(0.05)
        os.kill(workers[0], signal.SIGKILL)
        async with asyncio.timeout(30):  # a new worker replaces it
            while workers[0] in (now := await worker_pids(server.pid)) or len(now) < 2:
                await asyncio.sleep(0.05)
        await ready(port, server)
        os.killpg(server.pid, signal.SIGINT)
        os.killpg(server.pid, signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(server.communicate(), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    stderr = printed + stderr
    assert b"Traceback" not in stderr, stderr
    events = [json.loads(line)["event"] for line in stdout.splitlines() if line.startswith(b"{")]
    assert "worker_died" in events
    assert "worker_restarted" in events
    assert not postmaster_alive(tmp_path)
    gone = await asyncio.to_thread(lambda: [Path(f"/proc/{pid}").exists() for pid in now])
    assert not any(gone)
