"""Every reinitd exception, under one base."""

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
