"""What an unexpected exception in a request becomes: 499, 503 or 500, each logged its way."""

from __future__ import annotations

from unittest import mock

import asyncpg
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from reinitd.server import database, middleware
from reinitd.server.connection import AcceptErrors
from reinitd.server.keys import REFUSALS, SETTINGS
from reinitd.server.refusal import Refusals
from reinitd.settings import serve_settings
from tests.support import sample


def application() -> web.Application:
    app = web.Application()
    app[REFUSALS] = Refusals()
    app[SETTINGS] = serve_settings(database_url="postgresql://db/reinitd")
    return app


def request(*, closing: bool, app: web.Application | None = None) -> web.Request:
    app = app or application()
    transport = mock.Mock()
    transport.is_closing.return_value = closing
    return make_mocked_request(
        "GET", "/api/v2/workspaceagents/me/reinit", app=app, transport=transport
    )


def test_a_client_gone_is_499_and_not_an_error() -> None:
    """A hang-up before the answer (the transport is closing) is a 499, counted, never ERROR."""
    before = sample("reinitd_client_gone_total")
    with structlog.testing.capture_logs() as logs:
        response = middleware._failure(request(closing=True), ConnectionResetError(), "r1")
    assert response.status == 499
    assert sample("reinitd_client_gone_total") == before + 1
    assert all(entry["log_level"] != "error" for entry in logs)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.ConnectionDoesNotExistError("gone"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
    ],
)
def test_the_database_away_is_503_with_retry_after_logged_once(exc: Exception) -> None:
    """While the database is unreachable, requests get 503 JSON with Retry-After, and the log
    says so once per interval, not once per request."""
    app = application()
    with structlog.testing.capture_logs() as logs:
        responses = [
            middleware._failure(request(closing=False, app=app), exc, "r") for _ in range(20)
        ]
    assert {r.status for r in responses} == {503}
    assert all(r.headers["Retry-After"] == "5" for r in responses)
    assert [entry["event"] for entry in logs].count("database_unavailable") == 1


def test_anything_else_is_a_500_with_its_traceback() -> None:
    """A bug is a 500 naming the request id, logged at ERROR with the traceback."""
    with structlog.testing.capture_logs() as logs:
        try:
            raise ValueError("a bug")
        except ValueError as exc:
            response = middleware._failure(request(closing=False), exc, "r42")
    assert response.status == 500
    assert b"r42" in response.body  # type: ignore[operator]
    assert [entry["event"] for entry in logs] == ["request_failed"]


def test_accept_errors_are_logged_once_per_interval() -> None:
    """Out of files, asyncio reports every accept retry: one line per interval, all counted."""
    handler = AcceptErrors()
    loop = mock.Mock()
    context = {"message": AcceptErrors.MESSAGE, "exception": OSError(24, "Too many open files")}
    before = sample("reinitd_accept_errors_total")
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            handler(loop, context)
        handler(loop, {"message": "something else"})
    assert sample("reinitd_accept_errors_total") == before + 1000
    assert [entry["event"] for entry in logs] == ["accept_failed"]
    loop.default_exception_handler.assert_called_once_with({"message": "something else"})


@pytest.mark.parametrize(
    ("exc", "connecting", "kind"),
    [
        (
            asyncpg.CannotConnectNowError("the database system is shutting down"),
            True,
            "starting_or_stopping",
        ),
        (
            asyncpg.CannotConnectNowError("the database system is starting up"),
            False,
            "starting_or_stopping",
        ),
        (asyncpg.TooManyConnectionsError("too many connections for role"), True, "overloaded"),
        (
            asyncpg.InvalidAuthorizationSpecificationError("not permitted to log in"),
            True,
            "not_allowed",
        ),
        (asyncpg.InvalidPasswordError("password authentication failed"), True, "not_allowed"),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), True, "not_allowed"),
        (
            asyncpg.ObjectNotInPrerequisiteStateError("not accepting connections"),
            True,
            "not_allowed",
        ),
        (asyncpg.InsufficientPrivilegeError("permission denied for database"), True, "not_allowed"),
        (asyncpg.AdminShutdownError("terminating connection"), False, "terminated"),
        (
            asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
            False,
            "timed_out",
        ),
        (
            asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
            False,
            "timed_out",
        ),
        (
            asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"),
            False,
            "terminated",
        ),
        (ConnectionRefusedError(111, "refused"), True, "unreachable"),
        (TimeoutError(), False, "timed_out"),
        # From a query, the same SQLSTATEs as a refused login are bugs: 500, not an outage.
        (asyncpg.ObjectNotInPrerequisiteStateError("currval is not yet defined"), False, None),
        (asyncpg.InsufficientPrivilegeError("permission denied for table"), False, None),
        (ValueError("a bug"), True, None),
    ],
)
def test_every_refusal_is_classified_by_what_it_is(
    exc: BaseException, connecting: bool, kind: str | None
) -> None:
    """Each SQLSTATE PostgreSQL turns a server away with (57P03 from a smart shutdown
    included, which the integration tier cannot cause without stopping its cluster) is an
    outage of a kind; from a query, a refusal-looking SQLSTATE stays a bug."""
    outage = database.classify(exc, connecting=connecting)
    assert (outage.kind if outage else None) == kind
    if outage is not None:
        assert outage.operator_must_fix == (kind == "not_allowed")
