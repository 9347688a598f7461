"""Every option of every command, defined once: flag, environment variable, default, check.

The command line is built from these definitions (reinitd.cli), and a flag and its
environment variable go through the same check, so both fail with the same clear message.
A command reads only its own options' variables.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reinitd.errors import SettingError
from reinitd.wire import is_token

Parse = Callable[[str], Any]


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError("expected a number of seconds, like 15 or 0.5") from None
    if not (value > 0 and math.isfinite(value)):
        raise SettingError("expected a number greater than 0")
    return value


def positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingError("expected a whole number, like 8") from None
    if value < 1:
        raise SettingError("expected a whole number of at least 1")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds, or a number with a unit: 90s, 15m, 12h, 7d."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", text)
    if match is None:
        raise SettingError("expected a duration, like 7d, 12h, 15m or 3600 (seconds)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if value < 60:
        raise SettingError("expected a duration of at least a minute")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingError("expected a TCP port number from 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise SettingError("expected a TCP port number from 1 to 65535")
    return value


def workers(text: str) -> int:
    value = positive_integer(text)
    limit = max_workers()
    if value > limit:
        raise SettingError(
            f"at most {limit} on this machine (4 per core): each worker holds its own "
            "database connections, and more would only compete for the same cores"
        )
    return value


def max_workers() -> int:
    return 4 * (os.cpu_count() or 1)


def database_url(text: str) -> str:
    expected = "expected a PostgreSQL URL, like postgresql://user@host:5432/reinitd"
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # unbalanced brackets around an IPv6 address
        raise SettingError(f"{expected} (not a valid URL: {exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        scheme = parts.scheme + ":" if parts.scheme else "scheme-less"
        raise SettingError(f"{expected} (got a {scheme} address)")
    return text


def http_url(text: str) -> str:
    expected = "expected the base URL of reinitd, like http://reinitd.internal:8080"
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError:
        raise SettingError(expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(expected)
    return text


def agent_token(text: str) -> str:
    if not is_token(text.strip()):
        raise SettingError("expected the agent token, a UUID")
    return text.strip()


def yes_no(text: str) -> bool:
    return text == "yes"


def text(value: str) -> str:
    if not value.strip():
        raise SettingError("expected a value")
    return value


@dataclass(frozen=True)
class Option:
    """One option: `--name-with-dashes`, or the environment variable `env`."""

    name: str
    env: str
    default: Any
    help: str
    parse: Parse = text
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    # A value never to be printed, even when it fails its check.
    secret: bool = False
    # How help and documents write the default, when not as `shown` derives it (7d, not 604800).
    display: str | None = None

    @property
    def shown(self) -> str:
        """The default as help and documents write it: 15, not 15.0; yes or no; unset."""
        default = self.default
        if self.display is not None:
            return self.display
        if isinstance(default, bool):
            return "yes" if default else "no"
        if default is None:
            return "unset"
        if isinstance(default, float) and default.is_integer():
            return str(int(default))
        return str(default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, raw: str) -> Any:
        if self.choices and raw not in self.choices:
            raise SettingError(f"expected one of {', '.join(self.choices)}")
        return self.parse(raw)


LOG_LEVEL = Option(
    "log_level",
    "REINITD_LOG_LEVEL",
    "info",
    "log level",
    choices=("debug", "info", "warning", "error"),
)
LOG_FORMAT = Option(
    "log_format",
    "REINITD_LOG_FORMAT",
    "auto",
    "log format; auto is console on a terminal, JSON lines otherwise",
    choices=("auto", "json", "console"),
)
PING_INTERVAL = Option(
    "ping_interval",
    "REINITD_PING_INTERVAL",
    15.0,
    "seconds between keep-alive frames on open streams (keep it under any proxy's read timeout)",
    positive_number,
    metavar="SECONDS",
)

SERVE: tuple[Option, ...] = (
    Option("host", "REINITD_HOST", "127.0.0.1", "address to listen on"),
    Option("port", "REINITD_PORT", 8080, "TCP port to listen on", port),
    Option(
        "database_url",
        "DATABASE_URL",
        None,
        "libpq URL of PostgreSQL; unset: an embedded PostgreSQL under ./.reinitd/ (unless "
        "--embedded never)",
        database_url,
        metavar="URL",
    ),
    Option(
        "embedded",
        "REINITD_EMBEDDED",
        "auto",
        "auto starts an embedded PostgreSQL when no database URL is given; never makes a "
        "missing database URL an error (containers and services, whose PostgreSQL is "
        "elsewhere)",
        choices=("auto", "never"),
        metavar="MODE",
    ),
    Option(
        "listen_database_url",
        "REINITD_LISTEN_DATABASE_URL",
        None,
        "separate URL for the LISTEN connection (straight to PostgreSQL when queries go "
        "through a transaction-pooling PgBouncer); unset: the database URL",
        database_url,
        metavar="URL",
    ),
    Option(
        "database_pooler",
        "REINITD_DATABASE_POOLER",
        "none",
        "transaction when the database URL goes through a transaction-pooling PgBouncer "
        "(queries then use no named prepared statements); none for PostgreSQL itself or a "
        "session pooler",
        choices=("none", "transaction"),
        metavar="MODE",
    ),
    PING_INTERVAL,
    Option(
        "write_timeout",
        "REINITD_WRITE_TIMEOUT",
        10.0,
        "seconds a client may stall a write before it is disconnected",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "resync_interval",
        "REINITD_RESYNC_INTERVAL",
        30.0,
        "seconds between safety-net re-reads of the builds waited on (each wait drawn within "
        "20 % of it, so that processes started together drift apart)",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "probe_interval",
        "REINITD_PROBE_INTERVAL",
        2.0,
        "seconds of silence on the LISTEN connection before it is probed",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "max_streams",
        "REINITD_MAX_STREAMS",
        None,
        "open streams per process before new requests get 503 with Retry-After; unset: the "
        "connection budget less 2 %",
        positive_integer,
        metavar="N",
    ),
    Option(
        "max_streams_per_agent",
        "REINITD_MAX_STREAMS_PER_AGENT",
        8,
        "open streams per agent token before new requests get 429",
        positive_integer,
        metavar="N",
    ),
    Option(
        "max_connections",
        "REINITD_MAX_CONNECTIONS",
        None,
        "client connections per process; beyond it the one idle the longest is closed to make "
        "room (or, with none idle, the new one); unset: the open-file limit minus room for "
        "the database connections and one accept burst",
        positive_integer,
        metavar="N",
    ),
    Option(
        "header_timeout",
        "REINITD_HEADER_TIMEOUT",
        30.0,
        "seconds a client has to finish its request headers (slowloris), and the idle "
        "keep-alive limit",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "workers",
        "REINITD_WORKERS",
        1,
        "server processes sharing the port (SO_REUSEPORT), each with its own listener and "
        "connections; a dead one is restarted",
        workers,
        metavar="N",
    ),
    Option(
        "event_loop",
        "REINITD_EVENT_LOOP",
        "auto",
        "the event loop; auto is uvloop when it is installed (the server extra brings it), "
        "else asyncio's own",
        choices=("auto", "uvloop", "asyncio"),
    ),
    Option(
        "connect_timeout",
        "REINITD_CONNECT_TIMEOUT",
        10.0,
        "seconds a connection to PostgreSQL may take (a server that accepts TCP but never "
        "answers must not hold a start or a reconnect)",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "query_timeout",
        "REINITD_QUERY_TIMEOUT",
        10.0,
        "seconds a query may wait for a pooled connection, and then for its answer, before the "
        "database counts as unavailable (a request gets 503, a read is retried): a host that "
        "drops packets must not hold them until TCP gives up",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "presence",
        "REINITD_PRESENCE",
        "on",
        "tell the database who is waiting here (reinitd.agent_presence) and what was delivered "
        "(reinitd.deliveries); off writes neither",
        choices=("on", "off"),
    ),
    Option(
        "presence_ttl",
        "REINITD_PRESENCE_TTL",
        30.0,
        "seconds a replica's presence rows outlive its last report (renewed every third of "
        "it): a replica that dies without a word leaves reinitd.agent_presence after this",
        positive_number,
        metavar="SECONDS",
    ),
    Option(
        "delivery_retention",
        "REINITD_DELIVERY_RETENTION",
        7 * 86400.0,
        "how long delivery receipts are kept, e.g. 7d, 12h, 90m (at least a minute)",
        duration,
        metavar="DURATION",
        display="7d",
    ),
    Option(
        "trust_request_id",
        "REINITD_TRUST_REQUEST_ID",
        False,
        "yes behind a proxy that sets X-Request-ID itself: a request's X-Request-ID is then "
        "its request id in the logs; no (the default): the server makes its own, and logs a "
        "client's as client_request_id",
        yes_no,
        choices=("yes", "no"),
    ),
    Option(
        "internals",
        "REINITD_INTERNALS",
        "auto",
        "auto uses aiohttp's and asyncpg's private names where the start-up check finds them "
        "as expected (an idle stream costs a few KB, a NOTIFY no scheduled callback); public "
        "runs their public fallbacks (the same behaviour, more memory per stream)",
        choices=("auto", "public"),
        metavar="MODE",
    ),
    Option(
        "shutdown_timeout",
        "REINITD_SHUTDOWN_TIMEOUT",
        5.0,
        "seconds to wait for requests to finish on shutdown",
        positive_number,
        metavar="SECONDS",
    ),
    LOG_LEVEL,
    LOG_FORMAT,
)

MIGRATE: tuple[Option, ...] = (
    Option(
        "database_url",
        "DATABASE_URL",
        None,
        "libpq URL of PostgreSQL, as the schema's owner (required)",
        database_url,
        metavar="URL",
    ),
    LOG_LEVEL,
    LOG_FORMAT,
)

AGENT: tuple[Option, ...] = (
    Option(
        "url",
        "REINITD_URL",
        None,
        "base URL of reinitd, e.g. http://reinitd.internal:8080 (required)",
        http_url,
    ),
    Option(
        "token",
        "REINITD_AGENT_TOKEN",
        None,
        "the agent token, a UUID (required); prefer the environment variable: a command line "
        "is visible to every local user in ps",
        agent_token,
        secret=True,
    ),
    Option(
        "exec",
        "REINITD_EXEC",
        None,
        "shell command to run on each claim (required unless --once)",
        metavar="CMD",
    ),
    Option(
        "state_file",
        "REINITD_AGENT_STATE_FILE",
        None,
        "where handled claims are recorded, checked writable at start; unset: "
        "$XDG_STATE_HOME (or ~/.local/state)/reinitd/agent-<token digest>.json",
        Path,
        metavar="PATH",
    ),
    Option(
        "max_attempts",
        "REINITD_AGENT_MAX_ATTEMPTS",
        5,
        "runs of a failing CMD before giving up",
        positive_integer,
        metavar="N",
    ),
    # The same setting as the server's, read from the agent's side.
    replace(
        PING_INTERVAL,
        help="the server's ping interval; three silent intervals mean a dead stream",
    ),
    LOG_LEVEL,
    LOG_FORMAT,
)


def resolve(
    options: Sequence[Option], given: Mapping[str, str | None], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Each option's value: the flag if given, else its environment variable (when set and
    not empty), else its default. Raises SettingError naming the flag or the variable."""
    values: dict[str, Any] = {}
    for option in options:
        raw, source = given.get(option.name), option.flag
        if raw is None:
            raw, source = environ.get(option.env) or None, option.env
        if raw is None:
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.check(raw)
        except SettingError as exc:
            shown = None if option.secret else without_password(raw)
            named = source if shown is None else f"{source}={shown!r}"
            raise SettingError(f"{named}: {exc}") from None
    return values


def without_password(raw: str) -> str | None:
    """`raw` as an error message may show it: a URL's password (in its user part or as a
    `password=` parameter) replaced by ***; None when it cannot be told apart (an unparseable
    URL)."""
    try:
        parts = urllib.parse.urlsplit(raw)
        password = parts.password
    except ValueError:
        return None
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = re.sub(r"(password=)[^&]*", r"\1***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return raw
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def defaults(options: Sequence[Option]) -> dict[str, Any]:
    return {option.name: option.default for option in options}


@dataclass(frozen=True, slots=True)
class Settings:
    """What `reinitd serve` runs with: the SERVE options, plus tuning that is not an option.
    Build it with `serve_settings`, whose defaults are the options' own."""

    database_url: str | None
    embedded: str
    listen_database_url: str | None
    database_pooler: str
    host: str
    port: int
    ping_interval: float
    write_timeout: float
    resync_interval: float
    probe_interval: float
    max_streams: int | None
    max_streams_per_agent: int
    header_timeout: float
    max_connections: int | None
    workers: int
    event_loop: str
    connect_timeout: float
    query_timeout: float
    trust_request_id: bool
    shutdown_timeout: float
    presence: str
    presence_ttl: float
    delivery_retention: float
    log_level: str
    log_format: str
    internals: str
    probe_timeout: float = 2.0
    # Presence reports carry what changed at most every this many seconds.
    presence_interval: float = 0.5
    # A connection that sends nothing at all for this long is closed (an idle-socket flood).
    first_byte_timeout: float = 10.0
    queue_limit: int = 16
    pool_min_size: int = 2
    pool_max_size: int = 10
    backlog: int = 4096
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    # Set when serve runs migrations as another role than it serves under (the embedded
    # cluster: the owner migrates, reinitd_server serves).
    migrate_database_url: str | None = field(default=None)

    @property
    def dsn(self) -> str:
        """The database URL: None only until serve has started the embedded cluster."""
        assert self.database_url is not None, "the embedded cluster's URL is set first"
        return self.database_url

    @property
    def listen_dsn(self) -> str:
        return self.listen_database_url or self.dsn


def serve_settings(**values: Any) -> Settings:
    """Settings with every option at its default unless given."""
    return Settings(**{**defaults(SERVE), **values})
