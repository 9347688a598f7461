"""Payload parsing and frame encoding, without a database."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reinitd.event import PayloadError, ReinitEvent, error_frame, parse_payload
from tests.support import parse_frame

WS = uuid.UUID("7d3e5c1c-1111-4a4a-8b8b-000000000001")
OWNER = uuid.UUID("7d3e5c1c-1111-4a4a-8b8b-000000000002")


def test_json_payload_parses() -> None:
    """The payload claim_prebuild sends parses to the event."""
    event = parse_payload(
        f'{{"workspace_id":"{WS}","reason":"prebuild_claimed","owner_id":"{OWNER}"}}'
    )
    assert event == ReinitEvent(WS, "prebuild_claimed", OWNER)


def test_bare_uuid_payload_is_a_kick_without_owner() -> None:
    """A DBA's bare UUID (any case, padded) is a claim with owner unknown."""
    assert parse_payload(f"  {str(WS).upper()} \n") == ReinitEvent(WS)


def test_frame_is_byte_exact() -> None:
    """The data frame is exactly what Coder's client expects."""
    assert ReinitEvent(WS, owner_id=OWNER).frame() == (
        b'event: data\ndata: {"workspace_id":"7d3e5c1c-1111-4a4a-8b8b-000000000001",'
        b'"reason":"prebuild_claimed","owner_id":"7d3e5c1c-1111-4a4a-8b8b-000000000002"}\n\n'
    )
    assert ReinitEvent(WS).frame().endswith(b'"reason":"prebuild_claimed"}\n\n')


def test_error_frame_keeps_multiline_detail_on_one_line() -> None:
    """An error with newlines still makes a single data line."""
    frame = parse_frame(error_frame("Claim build failed permanently.", "line 1\nline 2"))
    assert frame.data == {"message": "Claim build failed permanently.", "detail": "line 1\nline 2"}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ("x" * 2000, "too_long"),
        ("nope", "bad_uuid"),
        ("{", "bad_json"),
        ("{}", "bad_uuid"),
        ('{"workspace_id":"' + str(WS) + '","reason":"other"}', "unknown_reason"),
        ("[]", "bad_uuid"),
    ],
)
def test_invalid_payload_kinds(payload: str, kind: str) -> None:
    """Each kind of garbage is rejected with a stable label."""
    with pytest.raises(PayloadError) as info:
        parse_payload(payload)
    assert info.value.kind == kind


@given(st.text(max_size=300))
def test_parser_never_raises_anything_else(payload: str) -> None:
    """Any text either parses or raises PayloadError: the listener cannot be broken."""
    try:
        event = parse_payload(payload)
    except PayloadError:
        return
    assert isinstance(event.workspace_id, uuid.UUID)


@given(
    st.dictionaries(
        st.sampled_from(["workspace_id", "reason", "owner_id", "x"]),
        st.one_of(
            st.text(max_size=40),
            st.integers(),
            st.none(),
            st.just(str(WS)),
            st.just("prebuild_claimed"),
        ),
    )
)
def test_parser_handles_any_json_object(data: dict[str, object]) -> None:
    """JSON objects of any shape parse or raise PayloadError."""
    with contextlib.suppress(PayloadError):
        parse_payload(json.dumps(data))
