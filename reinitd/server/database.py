"""Connections to PostgreSQL: bounded connect times, and one-line descriptions of failures
that name the server (never the password)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import asyncpg

from reinitd.errors import DatabaseUnavailableError, ReinitdError

# Failures a dead, unreachable or restarting database shows up as: a request gets 503, a read
# is retried quietly. Any other error (a missing grant, a broken query) is a bug or a
# misconfiguration: a 500, or a retry, each with its traceback.
CONNECTION_ERRORS: Final = (
    OSError,
    TimeoutError,  # no answer within the connect or query timeout
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
    asyncpg.InterfaceError,  # the connection closed under us
    # A multi-host URL whose hosts all answer, none of them what target_session_attrs asks
    # for (no writable primary yet, mid-failover).
    asyncpg.TargetServerAttributeNotMatched,
)
# What connecting (or starting) may fail with: those, or PostgreSQL refusing us (the login,
# the database name).
CONNECT_ERRORS: Final = (*CONNECTION_ERRORS, asyncpg.PostgresError)

# What an outage is, whatever shape it takes. `not_allowed` is for an operator to fix (the
# login, the password, the database); the others pass by themselves.
OUTAGE_KINDS: Final = (
    "unreachable",
    "not_allowed",
    "overloaded",
    "terminated",
    "timed_out",
    "starting_or_stopping",
)
# SQLSTATEs (exact, then by class) that mean an outage whenever they come. 57014 is a
# statement_timeout, 55P03 a lock_timeout: a query timeout set on the role or the database.
_QUERY_SQLSTATES: Final = {
    "57014": "timed_out",
    "55P03": "timed_out",
    "57P03": "starting_or_stopping",
    "08003": "terminated",  # asyncpg: the connection closed in the middle of an operation
    "08": "unreachable",
    "53": "overloaded",
    "57": "terminated",  # 57P01 terminated by an administrator, 57P02 crash, 57P04 dropped
}


@dataclass(frozen=True)
class Outage:
    """What kind of outage a failure is, and whether an operator must act (ERROR) or it
    passes by itself (WARNING)."""

    kind: str
    sqlstate: str | None = None

    @property
    def operator_must_fix(self) -> bool:
        return self.kind == "not_allowed"


def classify(exc: BaseException, *, connecting: bool = False) -> Outage | None:
    """The outage `exc` is, or None for a bug in reinitd (or a query PostgreSQL refuses, like
    a missing grant). With `connecting`, `exc` came from opening a connection: there, whatever
    PostgreSQL answers is a refusal of the login (55000 `ALLOW_CONNECTIONS false`, 28000
    NOLOGIN, 28P01, 3D000, a missing CONNECT grant), while from a query the same SQLSTATE
    (55000, 42501) would be a bug."""
    if isinstance(exc, DatabaseUnavailableError):
        return Outage(exc.kind, exc.sqlstate)
    if isinstance(exc, TimeoutError):
        return Outage("timed_out")
    if isinstance(exc, OSError | asyncpg.TargetServerAttributeNotMatched):
        return Outage("unreachable")
    if isinstance(exc, asyncpg.InterfaceError):  # the connection closed under us
        return Outage("terminated")
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError) and isinstance(
        cause, asyncpg.PostgresError
    ):
        return classify(cause)  # asyncpg's "closed in the middle of operation", and why
    sqlstate = str(exc.sqlstate)
    kind = _QUERY_SQLSTATES.get(sqlstate) or _QUERY_SQLSTATES.get(sqlstate[:2])
    if kind is None and connecting:
        kind = "not_allowed"
    return None if kind is None else Outage(kind, sqlstate)


# A server that accepts TCP but never answers must not hold a start or a reconnect for long.
CONNECT_TIMEOUT: Final = 10.0
# asyncpg's default: each connection prepares a statement once, by name, and reuses it.
STATEMENT_CACHE_SIZE: Final = 100


def statement_cache_size(pooler: str) -> int:
    """Named prepared statements outlive a transaction only on a connection of one's own.
    Behind a transaction-pooling PgBouncer (before 1.21) the next transaction may run on
    another server connection, where the name is missing (`prepared statement
    "__asyncpg_stmt_7__" does not exist`) or belongs to another client. Without a cache,
    asyncpg sends each query's Parse again with its Bind, Execute and Sync (asyncpg >= 0.29),
    so every query is complete on whichever server connection runs it."""
    return 0 if pooler == "transaction" else STATEMENT_CACHE_SIZE


def where(dsn: str) -> str:
    """`user@host:port/database` of a URL, without its password or parameters."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        user = f"{parts.username}@" if parts.username else ""
        return f"{user}{parts.netloc.rpartition('@')[2] or 'localhost'}{parts.path or '/'}"
    except ValueError:
        return "the configured database"


def describe(exc: BaseException, dsn: str | None = None, timeout: float = CONNECT_TIMEOUT) -> str:
    """One line for an operator: what failed, and where."""
    at = f" at {where(dsn)}" if dsn else ""
    if isinstance(exc, ReinitdError):
        return str(exc)
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return f"PostgreSQL{at} has no connection to spare: {exc}"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"PostgreSQL{at} is starting up or shutting down: {exc}"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"PostgreSQL{at} has no such database: {exc}"
    if isinstance(exc, TimeoutError):
        return f"PostgreSQL{at} did not answer within {timeout:g} s"
    if isinstance(exc, OSError):
        return f"cannot reach PostgreSQL{at}: {exc.strerror or exc}"
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return f"PostgreSQL{at} refused the login: {exc}"
    if isinstance(exc, asyncpg.ObjectNotInPrerequisiteStateError) and "accepting" in str(exc):
        return f"PostgreSQL{at} refused the connection: {exc}"
    return f"PostgreSQL{at}: {type(exc).__name__}: {exc}".rstrip(": ")


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect with a bounded wait; failures become DatabaseUnavailableError.

    Without a statement cache unless asked: such one-off connections (migrations) gain
    nothing from one, and through a transaction pooler a cached `__asyncpg_stmt_1__` collides
    with the one a previous process left on a pooled server connection
    (DuplicatePreparedStatementError on every restart)."""
    kwargs.setdefault("statement_cache_size", 0)
    timeout = kwargs.pop("timeout", CONNECT_TIMEOUT)
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, **kwargs)
    except ValueError as exc:  # asyncpg's word for a URL it cannot parse
        raise DatabaseUnavailableError(f"invalid database URL {where(dsn)}: {exc}") from None
    except CONNECT_ERRORS as exc:
        outage = classify(exc, connecting=True) or Outage("unreachable")
        raise DatabaseUnavailableError(
            describe(exc, dsn, timeout), outage.kind, outage.sqlstate
        ) from None
    return conn


@contextlib.asynccontextmanager
async def pooled(
    pool: asyncpg.Pool, within: float
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A pooled connection, waited for at most `within` seconds (its queries are bounded by
    the pool's `command_timeout`). One whose query timed out is closed, not given back: before
    it could be reused, asyncpg would wait for its cancel request, which a host that drops
    packets holds as long again.

    A failure to get a connection (the pool opening a new one, which PostgreSQL may refuse)
    is raised as DatabaseUnavailableError with its outage: the same SQLSTATE from a query
    would be a bug."""
    try:
        conn = await pool.acquire(timeout=within)
    except Exception as exc:
        outage = classify(exc, connecting=True)
        if outage is None:
            raise
        raise DatabaseUnavailableError(
            describe(exc, timeout=within), outage.kind, outage.sqlstate
        ) from exc
    try:
        yield conn
    except TimeoutError:
        conn.terminate()
        raise
    finally:
        await pool.release(conn)


T = TypeVar("T")


async def uncancelled(call: Awaitable[T]) -> T:
    """Let a query finish even if the request awaiting it is cancelled (its client hung up):
    cancelling a query mid-flight makes asyncpg open a new connection to send PostgreSQL a
    cancel request (a fork in the postmaster), so a storm of hang-ups would become a storm of
    those, and the pooled connection would come back in doubt. The cancellation is delivered
    once the query is done."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


class AsyncpgNoise(logging.Filter):
    """asyncpg's TLS probe (`sslmode=prefer`, its default) leaves a future nobody reads when
    a connection attempt is cancelled, and asyncio reports it at ERROR when it is collected:
    `Future exception was never retrieved ... unexpected connection_lost() call`. It is no
    failure of ours and says nothing an operator can act on: drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unexpected connection_lost() call" not in record.getMessage()


def quiet_asyncpg_noise() -> None:
    logging.getLogger("asyncio").addFilter(AsyncpgNoise())
