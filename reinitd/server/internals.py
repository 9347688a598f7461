"""The one door to aiohttp's and asyncpg's private names: checked at start, each with a fallback.

Two figures rest on library internals: an idle stream's memory (2.4 KB of heap instead of 16.2,
because the stream takes its connection over from aiohttp) and the cost of a NOTIFY flood
(asyncpg's per-NOTIFY `call_soon` skipped). The connection guard (budget, first-byte deadline,
admission gate, parser errors as JSON) has no public hook either. Every use of a private name
lives here; `check()` proves at start that each one is there with the shape relied on, and
`choose()` picks, per library, the private path or its public fallback, so that a release that
moves a name costs memory or speed, never correctness. The server logs the choice once:
`internals_checked aiohttp=takeover|fallback asyncpg=fast|public guard=on|off reason=...`.

The names, by what they buy (`REINITD_INTERNALS=public` forces every fallback but the guard's,
which has no public equivalent; a failed check turns it off):

guard (`reinitd.server.connection`: GuardedServer, GuardedHandler, Runner)
    `web.AppRunner._make_server()` overridden, and `server.__class__ = GuardedServer` on the
    Server it builds (AppRunner has no hook for the Server's class); `Server._loop`,
    `Server._kwargs` (to build a GuardedHandler as aiohttp builds its RequestHandler),
    `Server._connections` (counted on every connect); `RequestHandler._manager` (the server
    of a connection) and `RequestHandler._messages` (a pipelined request); the overridden
    hooks' signatures (`data_received`, `log_access`, `handle_error`, `log_exception`,
    `Server.connection_made/connection_lost/__call__`); and no name of ours shadowing one of
    aiohttp's on the two subclasses.
    Fallback: aiohttp's own Server and RequestHandler (no budget, no first-byte deadline, no
    gate, aiohttp's parser-error answers); streams then use the public path below.
takeover (`give_away`, used by `GuardedHandler.let_go`, `reinitd.server.stream.take_over`)
    `RequestHandler.transport = None` and `keep_alive(False)` (no header timer outlives the
    request), `RequestHandler._parser = None` (aiohttp breaks the handler <-> parser cycle only
    in connection_lost, which a given-away connection never reaches), `Server._connections`
    forgetting the connection, and `StreamWriter.write_eof` writing nothing once the protocol's
    transport is None (it raises ConnectionResetError, which aiohttp's finish_response takes as
    a client gone): the request then returns without touching the stream's connection. (An
    HTTP/1.1 stream writes its head itself and returns `handler.TAKEN_OVER`, whose `write_eof`
    raises the same ConnectionResetError: aiohttp then stops serving the connection at once,
    exactly as after the writer's.)
    Fallback: the handler task stays waiting on the subscription and writes each frame with
    the public `StreamResponse.write` (`reinitd.server.stream.stay`): the same bytes, pings,
    end and error frames, write timeouts and shutdown, at the memory of a live request.
notify (`ListenConnection`)
    `asyncpg.Connection._process_notification(pid, channel, payload)`, which asyncpg's
    protocol calls for every NotificationResponse: overridden to call the listener's callback
    at once instead of one `call_soon` handle per NOTIFY.
    Fallback: a plain `asyncpg.Connection` and the public `add_listener` callbacks.

Tests only (not the server's): `tests/integration/conftest.py` overrides aiohttp's
`BaseTestServer._make_runner` to serve through reinitd's runner (`tests/unit/test_internals.py`
checks it); `tests/integration/test_refusals.py` reads asyncpg's `Pool._holders` and their
`_con` to wait for a pool to empty.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import asyncpg
import structlog
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("reinitd.server.internals")

GUARD: Final = "guard"
TAKEOVER: Final = "takeover"
NOTIFY: Final = "notify"

Notify = Callable[[object, int, str, str], None]
_H = TypeVar("_H", bound=RequestHandler)
_S = TypeVar("_S", bound=web.Server)


# --- the private names, used -----------------------------------------------------------------


def manager(handler: RequestHandler) -> web.Server | None:
    """The Server a connection came in on; None once aiohttp let go of it."""
    server: web.Server | None = handler._manager
    return server


def pipelined(handler: RequestHandler) -> bool:
    """A next request already parsed on this connection (sent before this one's answer)."""
    return bool(handler._messages)


def server_loop(server: web.Server) -> asyncio.AbstractEventLoop:
    return server._loop


def connections(server: web.Server) -> dict[RequestHandler, asyncio.Transport]:
    """The Server's own registry of its connections (counted on every connect)."""
    registry: dict[RequestHandler, asyncio.Transport] = server._connections
    return registry


def new_handler(server: web.Server, cls: type[_H]) -> _H:
    """A connection's protocol, built as aiohttp's Server builds its RequestHandler."""
    return cls(server, loop=server._loop, **server._kwargs)


def adopt(server: web.Server, cls: type[_S]) -> _S:
    """Turn the Server aiohttp built into an instance of `cls` (a subclass adding no slots)."""
    server.__class__ = cls
    assert isinstance(server, cls)
    return server


def give_away(handler: RequestHandler) -> asyncio.Transport | None:
    """Take a connection's transport from aiohttp: it will neither write to it nor close it
    when the request returns, and keeps no timer or parser for it. None if the client is gone.
    The caller must then drop the connection from the Server's registry (`connections`)."""
    transport = handler.transport
    if transport is None or transport.is_closing():
        return None
    handler.keep_alive(False)  # no keep-alive (header) timer of aiohttp's outlives the request
    handler.transport = None
    # aiohttp breaks the handler <-> parser cycle in connection_lost, which a connection given
    # away never reaches: without this, every stream left a dozen objects for the cyclic
    # collector (a 300 ms pause after a storm of 10 000 connects).
    handler._parser = None
    return transport


class GuardingRunner(web.AppRunner):
    """aiohttp's AppRunner, whose Server may be replaced by `guard` (when `guarded`)."""

    def __init__(self, app: web.Application, *, guarded: bool, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guarded = guarded

    def guard(self, server: web.Server) -> web.Server:
        """The Server to serve with, given the one aiohttp built."""
        return server

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return self.guard(server) if self.guarded else server


class ListenConnection(asyncpg.Connection):
    """The LISTEN connection's class on the fast path: every NOTIFY reaches `on_notify`
    (synchronous, never raising) straight from the protocol, in order, instead of one
    `call_soon` handle each, which was the largest cost of a NOTIFY flood. `add_listener`
    still issues the LISTENs."""

    __slots__ = ("on_notify",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_notify: Notify | None = None

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        if self.on_notify is not None:
            self.on_notify(self, pid, channel, payload)


def listen_connection_class(fast: bool) -> type[asyncpg.Connection]:
    return ListenConnection if fast else asyncpg.Connection


def route_notifications(conn: asyncpg.Connection, callback: Notify) -> None:
    """On the fast path, hand every NOTIFY of `conn` to `callback` directly (call it before
    the first LISTEN); on the public path, `add_listener(channel, callback)` alone does."""
    # Not isinstance: asyncpg's metaclass makes any connection an instance of every subclass.
    if issubclass(type(conn), ListenConnection):
        conn.on_notify = callback  # type: ignore[attr-defined]


# The hooks GuardedHandler and GuardedServer override on purpose; any other name they define
# must not be one of aiohttp's.
_HANDLER_OVERRIDES: Final = frozenset(
    {"data_received", "log_access", "handle_error", "log_exception"}
)
_SERVER_OVERRIDES: Final = frozenset({"connection_made", "connection_lost"})

# --- the check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Paths:
    """Which path each library runs: `guard` (GuardedServer), `takeover` (streams own their
    connection), `fast_notify` (ListenConnection); `problems` says why any is off."""

    guard: bool
    takeover: bool
    fast_notify: bool
    problems: tuple[str, ...] = ()
    forced: bool = False

    @property
    def aiohttp(self) -> str:
        return "takeover" if self.takeover else "fallback"

    @property
    def asyncpg(self) -> str:
        return "fast" if self.fast_notify else "public"

    @property
    def reason(self) -> str:
        reasons = [*self.problems]
        if self.forced:
            reasons.insert(0, "forced by --internals public")
        return "; ".join(reasons) or "every private name checked"

    def log(self) -> None:
        """The start-up line: which path each library runs, and why."""
        (log.warning if self.problems else log.info)(
            "internals_checked",
            aiohttp=self.aiohttp,
            asyncpg=self.asyncpg,
            guard="on" if self.guard else "off",
            reason=self.reason,
        )


class _Recorder:
    """A transport that records what is written to it (for the write_eof probe)."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: Any) -> None:
        self.written += sum(len(chunk) for chunk in chunks)

    def is_closing(self) -> bool:
        return False


def _signature(function: object, expected: tuple[str, ...]) -> str | None:
    """None if `function` takes exactly these parameters (after self), else what it takes."""
    try:
        params = tuple(inspect.signature(function).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "has no signature"
    if params[1:] != expected:
        return f"takes ({', '.join(params[1:])}), expected ({', '.join(expected)})"
    return None


async def _no_app(_request: web.BaseRequest) -> web.StreamResponse:
    raise NotImplementedError  # the probes' Server never serves


class _Probes:
    """One probe per private name (or group): each returns None when the name is as relied
    on, else what is wrong. They share a throwaway Server and RequestHandler, built on a loop
    that never runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server: web.Server | None = None
        self.handler: RequestHandler | None = None

    def table(self) -> tuple[tuple[str, str, Callable[[], str | None]], ...]:
        """(feature, private name, probe), in the order they must run."""
        return (
            (GUARD, "aiohttp RequestHandler(Server, loop=...)", self.build),
            (GUARD, "aiohttp Server._loop, _kwargs, _connections", self.server_attrs),
            (GUARD, "aiohttp RequestHandler._manager, _messages", self.handler_attrs),
            (GUARD, "aiohttp AppRunner._make_server", self.make_server),
            (GUARD, "aiohttp Server.__class__ assignment", self.class_swap),
            (GUARD, "aiohttp hooks overridden", self.hooks),
            (GUARD, "reinitd names on aiohttp's classes", self.no_shadowing),
            (TAKEOVER, "aiohttp RequestHandler._parser, transport", self.parser),
            (TAKEOVER, "aiohttp StreamWriter.write_eof without a transport", self.write_eof),
            (NOTIFY, "asyncpg Connection._process_notification", self.process_notification),
        )

    def build(self) -> str | None:
        self.server = web.Server(_no_app, loop=self.loop)
        self.handler = RequestHandler(self.server, loop=self.loop)
        return None

    def server_attrs(self) -> str | None:
        server = self.server
        if getattr(server, "_loop", None) is not self.loop:
            return "Server._loop is not the loop it was given"
        if not isinstance(getattr(server, "_kwargs", None), dict):
            return "Server._kwargs is not a dict"
        if not isinstance(getattr(server, "_connections", None), dict):
            return "Server._connections is not a dict"
        return None

    def handler_attrs(self) -> str | None:
        assert self.handler is not None
        if getattr(self.handler, "_manager", None) is not self.server:
            return "RequestHandler._manager is not its Server"
        try:
            pipelined(self.handler)
        except (AttributeError, TypeError) as exc:
            return f"RequestHandler._messages: {exc}"
        return None

    @staticmethod
    def make_server() -> str | None:
        method = inspect.getattr_static(web.AppRunner, "_make_server", None)
        if not inspect.iscoroutinefunction(method) or getattr(
            method, "__isabstractmethod__", False
        ):
            return "AppRunner._make_server is not a coroutine method"
        if "self._make_server()" not in inspect.getsource(web.BaseRunner.setup):
            return "BaseRunner.setup no longer calls self._make_server()"
        return _signature(method, ())

    def class_swap(self) -> str | None:
        from reinitd.server.connection import GuardedServer  # noqa: PLC0415 (it imports us)

        try:
            adopt(web.Server(_no_app, loop=self.loop), GuardedServer)
        except TypeError as exc:
            return f"Server.__class__ cannot be a subclass: {exc}"
        return None

    @staticmethod
    def hooks() -> str | None:
        for owner, name, params in (
            (RequestHandler, "data_received", ("data",)),
            (RequestHandler, "log_access", ("request", "response", "time")),
            (RequestHandler, "handle_error", ("request", "status", "exc", "message")),
            (RequestHandler, "keep_alive", ("val",)),
            (web.Server, "connection_made", ("handler", "transport")),
            (web.Server, "connection_lost", ("handler", "exc")),
            (web.Server, "__call__", ()),
        ):
            wrong = _signature(getattr(owner, name, None), params)
            if wrong is not None:
                return f"{owner.__name__}.{name} {wrong}"
        return None

    def no_shadowing(self) -> str | None:
        from reinitd.server.connection import (  # noqa: PLC0415 (it imports us)
            GuardedHandler,
            GuardedServer,
        )

        theirs_server = {*dir(web.Server), *vars(self.server)}
        for ours, theirs, overrides in (
            (GuardedHandler, set(dir(RequestHandler)), _HANDLER_OVERRIDES),
            (GuardedServer, theirs_server, _SERVER_OVERRIDES),
        ):
            names = {*vars(ours), *ours.__annotations__} - overrides
            clash = sorted(name for name in names if not name.startswith("__") and name in theirs)
            if clash:
                return f"{ours.__mro__[1].__name__} now defines {', '.join(clash)} too"
        return None

    def parser(self) -> str | None:
        handler = self.handler
        assert handler is not None
        if getattr(handler, "_parser", None) is None:
            return "RequestHandler._parser is not set by __init__"
        handler._parser = None
        handler.transport = None
        return None

    def write_eof(self) -> str | None:
        handler, recorder = self.handler, _Recorder()
        assert handler is not None
        handler.transport = recorder  # type: ignore[assignment]
        writer = StreamWriter(handler, self.loop)
        writer.enable_chunking()
        handler.transport = None  # what give_away does once the headers are out
        step = writer.write_eof()
        try:
            step.send(None)
        except StopIteration:
            pass
        except ConnectionError:
            pass  # aiohttp's finish_response takes it as a client gone
        except Exception as exc:
            return f"StreamWriter.write_eof raises {type(exc).__name__} without a transport"
        else:
            step.close()
            return "StreamWriter.write_eof waits without a transport"
        if recorder.written:
            return "StreamWriter.write_eof writes to a transport given away"
        return None

    @staticmethod
    def process_notification() -> str | None:
        method = inspect.getattr_static(asyncpg.Connection, "_process_notification", None)
        if not inspect.isfunction(method):
            return "asyncpg.Connection._process_notification is gone"
        if "connection_class" not in inspect.signature(asyncpg.connect).parameters:
            return "asyncpg.connect takes no connection_class"
        wrong = _signature(method, ("pid", "channel", "payload"))
        return None if wrong is None else f"Connection._process_notification {wrong}"


def check() -> Paths:
    """Probe every private name on the installed aiohttp and asyncpg (a few milliseconds:
    signatures, and a throwaway Server and RequestHandler on a loop that never runs)."""
    failed: dict[str, list[str]] = {GUARD: [], TAKEOVER: [], NOTIFY: []}
    loop = asyncio.new_event_loop()
    try:
        for feature, name, probe in _Probes(loop).table():
            if failed[feature] or (feature == TAKEOVER and failed[GUARD]):
                continue  # one failure per feature is enough; later probes use what it built
            try:
                problem = probe()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                failed[feature].append(f"{name}: {problem}")
    finally:
        loop.close()
    return Paths(
        guard=not failed[GUARD],
        takeover=not failed[GUARD] and not failed[TAKEOVER],
        fast_notify=not failed[NOTIFY],
        problems=tuple(problem for problems in failed.values() for problem in problems),
    )


def choose(mode: str) -> Paths:
    """The paths to run with `--internals` (`auto`: each private path its check allows;
    `public`: the public fallbacks, the guard kept if its check allows)."""
    paths = check()
    if mode == "public":
        return Paths(
            guard=paths.guard,
            takeover=False,
            fast_notify=False,
            problems=paths.problems,
            forced=True,
        )
    return paths
