"""The agent's client: SSE parsing from raw bytes, and the reconnect loop against fake servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import structlog
from aiohttp import web

from reinitd.agent.client import (
    MAX_LINE,
    MAX_REDIRECTS,
    SseParser,
    reinit_events,
    wait_for_reinit,
)
from reinitd.errors import RedirectRefused, StreamBroken
from reinitd.wire import REINIT_PATH, ReinitEvent
from tests.unit.conftest import (
    FakeServer,
    RawServerFactory,
    event_stream,
    redirect_to,
)

STREAM = ': hello\nretry: 1000\nevent: ping\n\nevent: data\ndata: {"a":\ndata: 1}\n\n'
FRAMES = [("ping", ""), ("data", '{"a":\n1}')]


def parse(chunks: list[bytes]) -> list[tuple[str, str]]:
    parser = SseParser()
    return [frame for chunk in chunks for frame in parser.feed(chunk)]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_parser_handles_every_line_ending(newline: str) -> None:
    """LF, CRLF and CR-only line ends, comments, retry: and multi-line data all parse alike."""
    raw = STREAM.replace("\n", newline).encode()
    assert parse([raw]) == FRAMES


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_parser_is_indifferent_to_how_bytes_are_split(newline: str) -> None:
    """Any split of the stream into reads, a CRLF cut in two included, gives the same frames."""
    raw = STREAM.replace("\n", newline).encode()
    assert parse([raw[i : i + 1] for i in range(len(raw))]) == FRAMES
    for cut in range(len(raw) + 1):
        assert parse([raw[:cut], raw[cut:]]) == FRAMES, cut


def test_parser_emits_a_cr_terminated_frame_without_waiting_for_more_bytes() -> None:
    """A frame whose last CR ends a read is complete at once: the next read may be a ping away."""
    parser = SseParser()
    assert parser.feed(b"event: data\rdata: x\r\r") == [("data", "x")]
    assert parser.feed(b"\nevent: ping\r\n\r\n") == [("ping", "")]


def test_parser_refuses_an_endless_line() -> None:
    """A line that never ends is a broken stream, not an unbounded buffer."""
    parser = SseParser()
    assert parser.feed(b"data: " + b"x" * (MAX_LINE - 6)) == []  # at the limit: still a line
    with pytest.raises(StreamBroken, match="longer than"):
        parser.feed(b"x")


def event_frame(workspace_id: uuid.UUID, newline: str = "\n") -> bytes:
    data = f'{{"workspace_id":"{workspace_id}","reason":"prebuild_claimed"}}'
    return f"event: data{newline}data: {data}{newline}{newline}".encode()


async def test_cr_only_stream_delivers_the_event(fake_server: FakeServer) -> None:
    """A server that ends its lines with CR only is understood; the stream stays open after."""
    ws = uuid.uuid4()
    url = await fake_server([b"event: ping\r\r" + event_frame(ws, "\r")])
    event = await asyncio.wait_for(wait_for_reinit(url, str(uuid.uuid4())), 10)
    assert event == ReinitEvent(ws)


async def test_malformed_frames_do_not_crash_the_client(fake_server: FakeServer) -> None:
    """Garbage data, bad JSON and an error frame cause reconnects; the good event arrives."""
    ws = uuid.uuid4()
    url = await fake_server(
        [
            b"event: data\ndata: not json\n\n",
            b'event: data\ndata: {"workspace_id": 5}\n\n',
            b'event: error\ndata: {"message":"x"}\n\n',
            b"\xff\xfe garbage without structure\n\n",
            b": comment\nretry: 10\n\n" + event_frame(ws, "\r\n"),
        ]
    )
    events = reinit_events(url, str(uuid.uuid4()), backoff_floor=0.01, backoff_ceiling=0.02)
    event = await asyncio.wait_for(anext(events), 10)
    assert event == ReinitEvent(ws)
    await events.aclose()


async def test_unknown_token_is_logged_as_a_warning_and_retried(fake_server: FakeServer) -> None:
    """A 401 is retried with backoff and logged at warning with the server's message and
    detail, and never with the token; once provisioned, the event arrives."""
    ws, token = uuid.uuid4(), str(uuid.uuid4())
    body = {"message": "Unauthorized.", "detail": "The agent token is not known."}
    refusal = [web.json_response(body, status=401) for _ in range(2)]
    url = await fake_server([*refusal, event_frame(ws)])
    with structlog.testing.capture_logs() as logs:
        events = reinit_events(url, token, backoff_floor=0.01, backoff_ceiling=0.02)
        assert await asyncio.wait_for(anext(events), 10) == ReinitEvent(ws)
        await events.aclose()
    refused = [entry for entry in logs if entry["event"] == "agent_refused"]
    assert [entry["attempt"] for entry in refused] == [1, 2]
    for entry in refused:
        assert entry["log_level"] == "warning"
        assert entry["status"] == 401
        assert entry["message"] == "Unauthorized."
        assert entry["detail"] == "The agent token is not known."
        assert entry["retry_in_s"] > 0
    assert "agent_stream_open" in [entry["event"] for entry in logs]
    assert token not in json.dumps(logs, default=str)


async def test_silent_stream_is_treated_as_dead(fake_server: FakeServer) -> None:
    """No frame for three ping intervals: the stream is abandoned."""
    url = await fake_server([b""])
    with pytest.raises(StreamBroken, match="no frame"):
        await asyncio.wait_for(wait_for_reinit(url, str(uuid.uuid4()), ping_interval=0.05), 5)


async def consume(events: AsyncIterator[ReinitEvent], into: list[ReinitEvent]) -> None:
    async for event in events:
        into.append(event)


@contextlib.asynccontextmanager
async def looping(
    url: str, token: str, floor: float, ceiling: float = 10.0
) -> AsyncIterator[list[ReinitEvent]]:
    """Run the agent's reconnect loop against `url` for the block; yields the events it got."""
    got: list[ReinitEvent] = []
    events = reinit_events(url, token, backoff_floor=floor, backoff_ceiling=ceiling)
    task = asyncio.create_task(consume(events, got))
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("elsewhere", ["other host", "other port", "other scheme"])
async def test_a_redirect_to_another_origin_is_refused_and_the_token_stays_home(
    raw_server: RawServerFactory, elsewhere: str
) -> None:
    """A redirect that changes host, port or scheme is not followed: the token reaches only
    the configured origin, no event from elsewhere is taken, and each refusal is an
    agent_redirect_refused error followed by a growing backoff."""
    token, claim = str(uuid.uuid4()), event_frame(uuid.uuid4())
    lure = await raw_server(
        lambda _: event_stream(claim), "127.0.0.2" if elsewhere == "other host" else "127.0.0.1"
    )
    target = f"{lure.url}{REINIT_PATH}?wait=true"
    home = await raw_server(lambda _: redirect_to(target))
    if elsewhere == "other scheme":  # the same host and port, over TLS: a hello would show
        home.answer = lambda _: redirect_to(f"https://{home.url.removeprefix('http://')}/x")
    with structlog.testing.capture_logs() as logs:
        async with looping(home.url, token, 0.01, 0.05) as got:
            await home.requests(3)
    assert got == []
    assert lure.heads == []
    assert all(head.startswith(b"GET " + REINIT_PATH.encode()) for head in home.heads)
    assert all(token.encode() in head for head in home.heads)
    refused = [entry for entry in logs if entry["event"] == "agent_redirect_refused"]
    assert len(refused) >= 2
    assert [entry["attempt"] for entry in refused[:2]] == [1, 2]
    for entry in refused:
        assert entry["log_level"] == "error"
        assert entry["status"] == 302
        assert entry["reason"] == "another origin (scheme, host or port)"
    assert token not in json.dumps(logs, default=str)


async def test_a_redirect_within_the_origin_is_followed_a_few_times(
    raw_server: RawServerFactory,
) -> None:
    """A redirect to another path of the same origin is followed with the token; an endless
    chain of them is refused after MAX_REDIRECTS hops."""
    ws = uuid.uuid4()

    def moved(head: bytes) -> bytes:
        if head.startswith(b"GET /moved "):
            return event_stream(event_frame(ws))
        return redirect_to("/moved", 307)

    home = await raw_server(moved)
    token = str(uuid.uuid4())
    assert await asyncio.wait_for(wait_for_reinit(home.url, token), 10) == ReinitEvent(ws)
    assert [head.split(b" ")[1] for head in home.heads] == [
        REINIT_PATH.encode() + b"?wait=true",
        b"/moved",
    ]
    assert token.encode() in home.heads[1]

    loop = await raw_server(lambda _: redirect_to("/again"))
    with pytest.raises(RedirectRefused, match="too many redirects"):
        await asyncio.wait_for(wait_for_reinit(loop.url, token), 10)
    assert len(loop.heads) == MAX_REDIRECTS + 1


async def test_a_stream_of_garbage_does_not_reset_the_backoff(
    raw_server: RawServerFactory,
) -> None:
    """A server that answers 200 text/event-stream and then garbage is retried with a growing
    backoff, as after any error: no hot loop of requests."""
    garbage = await raw_server(lambda _: event_stream(b"\xff\xfe not sse at all\n\n"))
    floor = 0.02
    with structlog.testing.capture_logs() as logs:
        async with looping(garbage.url, str(uuid.uuid4()), floor):
            await garbage.requests(6)
    reconnects = [entry for entry in logs if entry["event"] == "agent_reconnecting"]
    assert [entry["attempt"] for entry in reconnects[:5]] == [1, 2, 3, 4, 5]
    # five pauses of at least half of 1, 2, 4, 8 and 16 floors lie between the six requests
    assert garbage.times[5] - garbage.times[0] >= 0.5 * floor * (1 + 2 + 4 + 8 + 16)


async def test_a_stream_that_proved_itself_resets_the_backoff(
    raw_server: RawServerFactory,
) -> None:
    """A stream that delivered a ping before it broke was healthy: the next retry starts from
    the first backoff step again."""
    pinging = await raw_server(lambda _: event_stream(b"event: ping\n\n"))
    with structlog.testing.capture_logs() as logs:
        async with looping(pinging.url, str(uuid.uuid4()), 0.01):
            await pinging.requests(4)
    reconnects = [entry for entry in logs if entry["event"] == "agent_reconnecting"]
    assert [entry["attempt"] for entry in reconnects[:3]] == [1, 1, 1]
