"""Schemathesis against the OpenAPI document, with a real server on the real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import openapi
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation

from reinitd.server.handler import OPENAPI
from tests.support import server_process

SCHEMA = openapi.from_dict(json.loads(OPENAPI))
OPERATIONS: list[APIOperation[Any, Any, Any, Any]] = []
for result in SCHEMA.get_all_operations():
    assert isinstance(result, Ok), result  # the document itself must be valid
    OPERATIONS.append(result.ok())
# Invalid requests only exist for operations that take parameters.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if list(op.iter_parameters())
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server_url(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A `reinitd serve` process, as deployed."""
    async with server_process(database_url, tmp_path_factory.mktemp("schemathesis")) as server:
        yield server.url


@pytest.mark.parametrize(
    ("operation", "mode"), CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES]
)
def test_api_conforms_to_its_document(
    server_url: str, operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode
) -> None:
    """Generated requests, valid and invalid: no 5xx, and every response matches the document."""
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy)
        response = case.call(base_url=server_url, timeout=10)
        assert response.status_code < 500, response.text
        case.validate_response(response)

    run()
