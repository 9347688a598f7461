"""Every exception reinitd raises on purpose, under one base; the agent side uses only the
ones marked as wire errors, so this module imports nothing."""

from __future__ import annotations


class ReinitdError(Exception):
    """The base of every error reinitd raises on purpose."""


class ApiError(ReinitdError):
    """Answered as JSON `{"message", "detail"}` with `status`; `reason` labels the metric."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: str = "",
        *,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.reason = reason
        self.headers = headers or {}


class PayloadError(ReinitdError, ValueError):
    """A NOTIFY payload that names no workspace; `kind` is a stable label for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SettingError(ReinitdError, ValueError):
    """A flag or environment variable whose value does not pass its check; the message says
    which, and what is expected."""


class DatabaseUnavailableError(ReinitdError):
    """PostgreSQL could not be reached, or refused us; the message names where, `kind` (one
    of reinitd.server.database.OUTAGE_KINDS) and `sqlstate` say what it was."""

    def __init__(
        self, message: str, kind: str = "unreachable", sqlstate: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.sqlstate = sqlstate


class EmbeddedError(ReinitdError):
    """The embedded PostgreSQL could not be found, initialised, started or stopped."""


class EchoFailed(ReinitdError):  # noqa: N818 -- a condition with its reason, like TimeoutError
    """An echo round trip failed; the message says where. `sent` is true when the NOTIFY went
    out and only the echo is missing (the listener may be deaf)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class ReinitError(ReinitdError):
    """Wire error: the server refused the request (`status`), or the stream ended with an error
    frame."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(f"{status} {message}" + (f": {detail}" if detail else ""))
        self.status = status
        self.message = message
        self.detail = detail

    @property
    def terminal(self) -> bool:
        """409: the workspace is not, or no longer, a prebuild waiting to be claimed."""
        return self.status == 409


class StreamBroken(ReinitdError):  # noqa: N818 -- a condition, like ConnectionReset
    """Wire error: the stream ended, went silent, or carried something unparseable: reconnect."""


class RedirectRefused(ReinitdError):  # noqa: N818 -- a condition, like StreamBroken
    """Wire error: the server answered with a redirect the agent does not follow (to another
    origin, or one too many); the token is never sent there."""

    def __init__(self, status: int, location: str, reason: str) -> None:
        super().__init__(f"{status} redirect to {location} refused: {reason}")
        self.status = status
        self.location = location  # the target's origin only: a path or query is not logged
        self.reason = reason
