"""Doorbell payload parsing and frame encoding, without a database."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reinitd.errors import PayloadError
from reinitd.server.doorbell import workspace_of
from reinitd.wire import ReinitEvent, error_frame
from tests.support import parse_frame

WS = uuid.UUID("7d3e5c1c-1111-4a4a-8b8b-000000000001")
OWNER = uuid.UUID("7d3e5c1c-1111-4a4a-8b8b-000000000002")


def test_json_payload_names_its_workspace_and_nothing_else_counts() -> None:
    """A JSON payload names a workspace; owner and reason are ignored (never trusted)."""
    for payload in (
        f'{{"workspace_id":"{WS}","reason":"prebuild_claimed","owner_id":"{OWNER}"}}',
        f'{{"workspace_id":"{WS}","reason":"claim_failed"}}',
        f'{{"workspace_id":"{WS}","reason":"party","owner_id":"not a uuid"}}',
    ):
        assert workspace_of(payload) == WS


def test_bare_uuid_payload_names_its_workspace() -> None:
    """A DBA's bare UUID (any case, padded) names the workspace."""
    assert workspace_of(f"  {str(WS).upper()} \n") == WS


def test_frame_is_byte_exact() -> None:
    """The data frame is exactly what Coder's client expects."""
    assert ReinitEvent(WS, owner_id=OWNER).frame() == (
        b'event: data\ndata: {"workspace_id":"7d3e5c1c-1111-4a4a-8b8b-000000000001",'
        b'"reason":"prebuild_claimed","owner_id":"7d3e5c1c-1111-4a4a-8b8b-000000000002"}\n\n'
    )


def test_error_frame_keeps_multiline_detail_on_one_line() -> None:
    """An error with newlines still makes a single data line."""
    frame = parse_frame(error_frame("Claim build failed permanently.", "line 1\nline 2"))
    assert frame.data == {"message": "Claim build failed permanently.", "detail": "line 1\nline 2"}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ("x" * 2000, "too_long"),
        (f'{{"workspace_id":"{WS}","pad":"{"x" * 1100}"}}', "too_long"),
        ("nope", "bad_uuid"),
        ("", "bad_uuid"),
        ("{", "bad_json"),
        ("{}", "bad_uuid"),
        ('{"workspace_id": 42}', "bad_uuid"),
        ("[]", "bad_uuid"),
        ('"' + str(WS) + '"', "bad_uuid"),
    ],
)
def test_invalid_payload_kinds(payload: str, kind: str) -> None:
    """Each kind of garbage is rejected with a stable label."""
    with pytest.raises(PayloadError) as info:
        workspace_of(payload)
    assert info.value.kind == kind


def _names(payload: str) -> uuid.UUID | None:
    try:
        return workspace_of(payload)
    except PayloadError:
        return None


@given(st.text(max_size=300))
def test_parser_is_total_on_text(payload: str) -> None:
    """Any text names a workspace exactly when it is a UUID or a JSON object holding one, and
    fails with PayloadError otherwise: nothing else can escape into the listener."""
    text = payload.strip()
    try:
        expected: uuid.UUID | None = uuid.UUID(text) if not text.startswith("{") else None
    except ValueError:
        expected = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
            expected = uuid.UUID(data["workspace_id"]) if isinstance(data, dict) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            expected = None
    assert _names(payload) == expected


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
    """A JSON object names WS exactly when its workspace_id is WS's text; otherwise
    PayloadError with a stable kind."""
    expected = WS if data.get("workspace_id") == str(WS) else None
    assert _names(json.dumps(data)) == expected
