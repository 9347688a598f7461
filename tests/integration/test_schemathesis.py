"""Schemathesis against the OpenAPI document, with a real server on the real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import openapi
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.schemas import APIOperation

from reinitd.server.embedded import free_port
from reinitd.server.handler import OPENAPI

SCHEMA = openapi.from_dict(json.loads(OPENAPI))
OPERATIONS: list[APIOperation[Any, Any, Any, Any]] = []
for result in SCHEMA.get_all_operations():
    assert isinstance(result, Ok), result  # the document itself must be valid
    OPERATIONS.append(result.ok())
# Invalid requests only exist for operations that take parameters.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if list(op.iter_parameters())
]


@pytest.fixture(scope="module")
def server_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `reinitd serve` process, as deployed."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("schemathesis")) / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "reinitd", "serve", "--port", str(port), "--log-format", "json"],
            env={**os.environ, "DATABASE_URL": database_url},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


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
