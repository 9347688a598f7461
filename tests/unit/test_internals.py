"""The start-up check of reinitd.server.internals: every private name checks out on the installed
aiohttp and asyncpg, and one taken away turns its path off (never the server), saying why."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import BaseTestServer
from aiohttp.web_protocol import RequestHandler
from structlog.testing import capture_logs

from reinitd.server import internals
from reinitd.server.app import create_app
from reinitd.server.internals import ListenConnection, Paths
from reinitd.settings import serve_settings

pytestmark = pytest.mark.internals


def paths_on(paths: Paths) -> tuple[bool, bool, bool]:
    return paths.guard, paths.takeover, paths.fast_notify


def test_every_private_name_checks_out_on_the_installed_releases() -> None:
    """Today's aiohttp and asyncpg: the guard, the take-over and the fast NOTIFY path all on."""
    paths = internals.check()
    assert paths.problems == ()
    assert paths_on(paths) == (True, True, True)
    assert (paths.aiohttp, paths.asyncpg) == ("takeover", "fast")


# A release that moved a private name, simulated: each breaker changes one name the way a
# release might, and the check must turn off exactly the paths that rest on it.


def without_process_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg without `Connection._process_notification`."""
    monkeypatch.delattr(asyncpg.Connection, "_process_notification")


def process_notification_with_other_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook with another signature: the override would be called wrongly."""

    def changed(self: asyncpg.Connection, pid: int, channel: str) -> None: ...

    monkeypatch.setattr(asyncpg.Connection, "_process_notification", changed)


def handler_without_a_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp no longer keeping `RequestHandler._parser`."""
    original = RequestHandler.__init__

    def without_parser(self: RequestHandler, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._parser

    monkeypatch.setattr(RequestHandler, "__init__", without_parser)


def writer_that_keeps_its_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """A StreamWriter that would still write the last chunk to a connection given away."""
    original = StreamWriter.__init__

    def keeping(self: StreamWriter, protocol: Any, *args: Any, **kwargs: Any) -> None:
        original(self, protocol, *args, **kwargs)
        self.kept = protocol.transport  # type: ignore[attr-defined]

    def write(self: StreamWriter, chunk: bytes) -> None:
        self.kept.write(chunk)  # type: ignore[attr-defined]

    monkeypatch.setattr(StreamWriter, "__init__", keeping)
    monkeypatch.setattr(StreamWriter, "_write", write)


def runner_without_make_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `AppRunner._make_server` to override."""
    monkeypatch.delattr(web.AppRunner, "_make_server")


def handler_using_a_name_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """RequestHandler defining a name GuardedHandler uses for its own ends."""
    monkeypatch.setattr(RequestHandler, "spoke", False, raising=False)


@pytest.mark.parametrize(
    ("breaker", "on", "reason"),
    [
        (without_process_notification, (True, True, False), "_process_notification is gone"),
        (
            process_notification_with_other_parameters,
            (True, True, False),
            "takes (pid, channel), expected (pid, channel, payload)",
        ),
        (handler_without_a_parser, (True, False, True), "_parser is not set by __init__"),
        (writer_that_keeps_its_transport, (True, False, True), "writes to a transport given away"),
        (runner_without_make_server, (False, False, True), "AppRunner._make_server"),
        (handler_using_a_name_of_ours, (False, False, True), "RequestHandler now defines spoke"),
    ],
)
def test_a_private_name_broken_turns_off_the_paths_resting_on_it(
    monkeypatch: pytest.MonkeyPatch,
    breaker: Callable[[pytest.MonkeyPatch], None],
    on: tuple[bool, bool, bool],
    reason: str,
) -> None:
    """A private name moved by a release makes the check fail for it: the paths resting on it
    (guard, take-over, fast NOTIFY) are off, the others on, and the reason names it."""
    breaker(monkeypatch)
    paths = internals.check()
    assert paths_on(paths) == on
    assert reason in paths.reason


def test_forcing_the_public_paths_keeps_the_guard() -> None:
    """`--internals public`: both public fallbacks, the guard (which has none) kept."""
    paths = internals.choose("public")
    assert paths_on(paths) == (True, False, False)
    assert paths.reason == "forced by --internals public"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("auto", {"aiohttp": "takeover", "asyncpg": "fast", "guard": "on"}),
        ("public", {"aiohttp": "fallback", "asyncpg": "public", "guard": "on"}),
    ],
)
def test_the_start_up_line_says_which_path_each_library_runs(
    mode: str, expected: dict[str, str]
) -> None:
    """create_app logs `internals_checked` once, with the path of each library and why."""
    settings = serve_settings(database_url="postgresql://localhost/reinitd", internals=mode)
    with capture_logs() as logs:
        create_app(settings)
    (line,) = [entry for entry in logs if entry["event"] == "internals_checked"]
    assert {key: line[key] for key in expected} == expected
    assert line["log_level"] == "info"


def test_a_failed_check_is_a_warning_naming_the_private_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release that moved a name is logged at warning, with the name that moved."""
    monkeypatch.delattr(asyncpg.Connection, "_process_notification")
    with capture_logs() as logs:
        internals.choose("auto").log()
    (line,) = logs
    assert (line["log_level"], line["asyncpg"]) == ("warning", "public")
    assert "asyncpg Connection._process_notification" in line["reason"]


def test_the_fast_listen_connection_hands_every_notify_to_its_callback() -> None:
    """ListenConnection calls its callback at once, in order, for every channel."""

    class Unconnected(ListenConnection):
        __slots__ = ()

        def __del__(self) -> None:
            """Never connected: nothing to warn about."""

    heard: list[tuple[int, str, str]] = []
    conn = Unconnected.__new__(Unconnected)
    conn.on_notify = None
    conn._process_notification(1, "early", "dropped")  # before routing: nothing to call
    internals.route_notifications(
        conn, lambda _c, pid, ch, payload: heard.append((pid, ch, payload))
    )
    conn._process_notification(7, "prebuild_claimed", "a")
    conn._process_notification(7, "reinitd_probe", "b")
    assert heard == [(7, "prebuild_claimed", "a"), (7, "reinitd_probe", "b")]


def test_the_test_servers_runner_hook_is_still_there() -> None:
    """tests/integration/conftest.py serves through reinitd's runner by overriding aiohttp's
    private `BaseTestServer._make_runner`: it must still exist and be what start_server calls."""
    method = inspect.getattr_static(BaseTestServer, "_make_runner")
    assert inspect.iscoroutinefunction(method)
    assert "self._make_runner(" in inspect.getsource(BaseTestServer.start_server)
