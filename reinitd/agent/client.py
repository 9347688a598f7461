"""The agent's side of the wire: wait for a reinit event, and loop doing so without gaps."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import structlog
from yarl import URL

from reinitd.backoff import backoff_delay
from reinitd.errors import RedirectRefused, ReinitError, StreamBroken
from reinitd.wire import REASONS, REINIT_PATH, TOKEN_HEADER, ReinitEvent

log = structlog.get_logger("reinitd.agent.client")


BACKOFF_FLOOR = 0.1
BACKOFF_CEILING = 10.0
# A stream silent for this many ping intervals is treated as dead.
SILENT_PINGS = 3
# Redirects within the configured origin (same scheme, host and port) are followed, at most
# this many in a row; one to another origin is never followed, so the token goes nowhere else.
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


# A line longer than this is not SSE from reinitd: the stream is dropped, not buffered.
MAX_LINE = 64 * 1024
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass
class SseParser:
    """Server-Sent Events from a byte stream read in chunks of any size. Lines end in CRLF, CR
    or LF (a CRLF split across two chunks counts once); comments, `retry:`, multi-line data."""

    _partial: bytes = b""
    _after_cr: bool = False  # the last chunk ended in CR: a LF opening the next one is its pair
    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        """Feed bytes as they arrive; returns the (event, data) frames they complete."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        if not chunk:
            return []
        buffer, start, frames = self._partial + chunk, 0, []
        for end in _LINE_END.finditer(buffer):
            frame = self._line(buffer[start : end.start()].decode("utf-8", errors="replace"))
            if frame is not None:
                frames.append(frame)
            start = end.end()
        self._partial = buffer[start:]
        self._after_cr = buffer.endswith(b"\r")
        if len(self._partial) > MAX_LINE:
            raise StreamBroken(f"a line longer than {MAX_LINE} bytes")
        return frames

    def _line(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self._event and not self._data:
                return None
            frame = (self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return frame
        if line.startswith(":"):
            return None  # a comment: some proxies and servers send them as keep-alives
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None  # id, retry and unknown fields do not concern us


def parse_event(data: str) -> ReinitEvent:
    try:
        body = json.loads(data)
        reason = body.get("reason", "prebuild_claimed")
        owner = body.get("owner_id")
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        return ReinitEvent(
            uuid.UUID(body["workspace_id"]), reason, None if owner is None else uuid.UUID(owner)
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StreamBroken(f"unparseable event data {data[:200]!r}: {exc}") from None


async def _refusal(response: aiohttp.ClientResponse) -> ReinitError:
    text = await response.text(errors="replace")
    try:
        body = json.loads(text)
        return ReinitError(response.status, str(body["message"]), str(body.get("detail", "")))
    except (ValueError, TypeError, KeyError):
        return ReinitError(response.status, response.reason or "error", text[:500])


class _Stream:
    """One open reinit stream, read frame by frame."""

    def __init__(self, response: aiohttp.ClientResponse, silence_limit: float) -> None:
        self._response = response
        self._silence_limit = silence_limit
        self._parser = SseParser()
        self._frames: deque[tuple[str, str]] = deque()
        # A ping or an event parsed: the stream is reinitd's, and worth a reset of the backoff.
        self.proved = False

    def close(self) -> None:
        self._response.close()

    async def _next_frame(self) -> tuple[str, str]:
        while not self._frames:
            try:
                chunk = await asyncio.wait_for(
                    self._response.content.readany(), self._silence_limit
                )
            except TimeoutError:
                raise StreamBroken(f"no frame for {self._silence_limit:g} s") from None
            if not chunk:
                raise StreamBroken("the server closed the stream")
            self._frames.extend(self._parser.feed(chunk))
        return self._frames.popleft()

    async def next_event(self) -> ReinitEvent:
        while True:
            kind, data = await self._next_frame()
            if kind == "data":
                event = parse_event(data)
                self.proved = True
                return event
            if kind == "error":
                try:
                    body = json.loads(data)
                    message, detail = str(body["message"]), str(body.get("detail", ""))
                except (ValueError, TypeError, KeyError):
                    message, detail = "stream error", data[:500]
                raise StreamBroken(f"{message} {detail}".strip())
            if kind == "ping":
                self.proved = True
            # ping and anything else keeps the stream alive


def _url(base_url: str) -> str:
    return base_url.rstrip("/") + REINIT_PATH


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme.lower(), (url.host or "").lower(), url.port


def _redirect(response: aiohttp.ClientResponse, origin: tuple[str, str, int | None]) -> URL:
    """Where a redirect points, if the agent may follow it: within the configured origin."""
    location = response.headers.get("Location", "")
    try:
        target = response.url.join(URL(location))
    except ValueError:
        raise RedirectRefused(response.status, "(unparseable)", "not a URL") from None
    if _origin(target) != origin:
        shown = f"{target.scheme}://{target.host}:{target.port}"
        raise RedirectRefused(response.status, shown, "another origin (scheme, host or port)")
    return target


async def _open(
    session: aiohttp.ClientSession, base_url: str, token: str, wait: bool, silence_limit: float
) -> _Stream:
    url = URL(_url(base_url))
    if wait:
        url = url.with_query(wait="true")
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        response = await session.get(
            url,
            headers={TOKEN_HEADER: token, "Accept": "text/event-stream"},
            # aiohttp would follow a redirect anywhere with the token header: decide here
            allow_redirects=False,
            # no total timeout: the server's pings keep the stream alive; silence is checked
            # per read
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10),
        )
        if response.status not in REDIRECT_STATUSES:
            break
        response.release()
        url = _redirect(response, origin)
    else:
        raise RedirectRefused(
            response.status, f"{url.scheme}://{url.host}:{url.port}", "too many redirects"
        )
    if response.status != 200:
        try:
            raise await _refusal(response)
        finally:
            response.release()
    return _Stream(response, silence_limit)


async def wait_for_reinit(
    base_url: str,
    token: str,
    *,
    wait: bool = True,
    ping_interval: float = 15.0,
    session: aiohttp.ClientSession | None = None,
) -> ReinitEvent:
    """One request: the first event, or `ReinitError` (status, message, detail), or
    `StreamBroken` when the stream ends or goes silent for three ping intervals, or
    `RedirectRefused` when the server redirects to another origin."""
    async with _session(session) as http:
        stream = await _open(http, base_url, token, wait, SILENT_PINGS * ping_interval)
        try:
            return await stream.next_event()
        finally:
            stream.close()


@asynccontextmanager
async def _session(given: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    """Use the caller's session, or a private one closed afterwards."""
    if given is not None:
        yield given
        return
    async with aiohttp.ClientSession() as own:
        yield own


async def reinit_events(
    base_url: str,
    token: str,
    *,
    ping_interval: float = 15.0,
    backoff_floor: float = BACKOFF_FLOOR,
    backoff_ceiling: float = BACKOFF_CEILING,
    session: aiohttp.ClientSession | None = None,
) -> AsyncGenerator[ReinitEvent, None]:
    """Every distinct reinit event, forever: reconnects on any error or refusal (401 too) with
    capped, jittered exponential backoff (reset only after a stream that proved itself with a
    ping or an event, so that a server answering 200 and then garbage gets no hot loop);
    raises `ReinitError` with status 409 when the workspace is not, or no longer, waiting to
    be claimed."""
    seen: set[tuple[uuid.UUID, str, uuid.UUID | None]] = set()
    attempt = 0
    async with _session(session) as http:
        while True:
            try:
                stream = await _open(http, base_url, token, True, SILENT_PINGS * ping_interval)
            except ReinitError as exc:
                if exc.terminal:
                    raise
                error: Exception = exc
            except (RedirectRefused, aiohttp.ClientError, OSError, TimeoutError) as exc:
                error = exc
            else:
                log.info("agent_stream_open", url=_url(base_url))
                try:
                    while True:
                        event = await stream.next_event()
                        if event.key in seen:
                            continue
                        seen.add(event.key)
                        yield event
                except (StreamBroken, aiohttp.ClientError, OSError) as exc:
                    error = exc
                finally:
                    stream.close()
                if stream.proved:
                    attempt = 0
            attempt += 1
            delay = backoff_delay(attempt, backoff_floor, backoff_ceiling)
            _log_retry(error, attempt, delay)
            await asyncio.sleep(delay)


def _log_retry(error: Exception, attempt: int, delay: float) -> None:
    retry = {"attempt": attempt, "retry_in_s": round(delay, 3)}
    if isinstance(error, ReinitError):
        # Retried, 401 included: a token the server does not know may not be provisioned yet.
        # The server's words say which refusal it was.
        log.warning(
            "agent_refused",
            status=error.status,
            message=error.message,
            detail=error.detail,
            **retry,
        )
    elif isinstance(error, RedirectRefused):
        # A misconfigured proxy, or a server luring the token away: someone must look.
        log.error(
            "agent_redirect_refused",
            status=error.status,
            location=error.location,
            reason=error.reason,
            **retry,
        )
    else:
        log.warning("agent_reconnecting", error=str(error) or type(error).__name__, **retry)
