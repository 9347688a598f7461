"""Hostile input and least privilege: limits, the OpenAPI contract, database roles, fuzzing."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reinitd.errors import ApiError
from reinitd.server.handler import parse_bool, parse_timeout, token_hash
from tests.support import REINIT

# --- fuzzing: every input has a defined outcome ------------------------------------------------


@given(st.one_of(st.none(), st.text(max_size=20)))
def test_wait_parsing_is_total(value: str | None) -> None:
    """Any wait value is true or false; only Go's six spellings are true."""
    assert parse_bool(value) is (value in {"1", "t", "T", "TRUE", "true", "True"})


@given(st.one_of(st.none(), st.text(max_size=30), st.floats().map(str)))
def test_timeout_parsing_is_total(value: str | None) -> None:
    """Any timeout is a number of seconds in 0..300, or a 400 ApiError."""
    try:
        seconds = parse_timeout(value)
    except ApiError as exc:
        assert exc.status == 400
        return
    assert 0 <= seconds <= 300


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(
        st.none(), st.text(max_size=60).filter(lambda t: "\n" not in t and "\r" not in t)
    ),
    query=st.one_of(st.none(), st.text(max_size=60)),
    cookie=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9-]{0,40}", fullmatch=True)),
)
def test_token_extraction_is_total(
    header: str | None, query: str | None, cookie: str | None
) -> None:
    """Whatever the header, query or cookie hold: a 32-byte hash, or a 401 ApiError."""
    headers = {}
    if header is not None:
        headers["Coder-Session-Token"] = header.encode("utf-8", "replace").decode("latin-1")
    if cookie is not None:
        headers["Cookie"] = f"coder_session_token={cookie}"
    path = REINIT
    if query is not None:
        path += f"?coder_session_token={quote(query)}"
    request = make_mocked_request("GET", path, headers=headers)
    try:
        digest = token_hash(request)
    except ApiError as exc:
        assert exc.status == 401
        return
    assert len(digest) == 32
