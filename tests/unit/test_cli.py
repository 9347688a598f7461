"""What operators rely on: log events with request ids and no secrets, metrics, errors, help."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.support import reinitd_process

Client = TestClient[web.Request, web.Application]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "serve",
            [
                "REINITD_HOST",
                "REINITD_PORT",
                "DATABASE_URL",
                "REINITD_PING_INTERVAL",
                "REINITD_LISTEN_DATABASE_URL",
                "default: 15.0",
                "default: 8080",
            ],
        ),
        ("migrate", ["DATABASE_URL"]),
        ("agent", ["REINITD_URL", "REINITD_AGENT_TOKEN", "REINITD_EXEC", "Exit codes"]),
    ],
)
async def test_help_explains_every_option(command: str, expected: list[str]) -> None:
    """Every command's --help names each option's variable and default."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reinitd",
        command,
        "--help",
        stdout=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    text = " ".join(stdout.decode().split())
    for needle in expected:
        assert needle in text


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--workers", "0"], {}, b"--workers='0': expected a whole number of at least 1"),
        (["serve", "--workers", "999"], {}, b"--workers='999': at most"),
        (["serve", "--ping-interval", "-1"], {}, b"--ping-interval='-1': expected a number"),
        (["serve", "--port", "70000"], {}, b"--port='70000': expected a TCP port number"),
        (["serve"], {"REINITD_PORT": "http"}, b"REINITD_PORT='http': expected a TCP port"),
        (["serve"], {"DATABASE_URL": "notaurl"}, b"DATABASE_URL='notaurl': expected a PostgreSQL"),
        (["serve"], {"DATABASE_URL": "mysql://db/x"}, b"(got a mysql: address)"),
        (["serve"], {"REINITD_LOG_LEVEL": "verbose"}, b"expected one of debug, info, warning"),
        (["serve"], {"REINITD_LOG_FORMAT": "xml"}, b"expected one of auto, json, console"),
        (["migrate"], {}, b"--database-url (or DATABASE_URL) is required"),
        (["agent", "--url", "notaurl"], {}, b"--url='notaurl': expected the base URL"),
        (["agent", "--token", "nope"], {}, b"--token='nope': expected the agent token, a UUID"),
    ],
)
async def test_bad_options_are_clear_errors(
    args: list[str], env: dict[str, str], expected: bytes
) -> None:
    """Invalid flags or environment values stop the command at once, with exit code 2 (1 for
    a missing database URL) and a one-line message naming the flag or variable."""
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await reinitd_process(
        *args, env=clean | env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2, stderr
    assert expected in stderr
    assert len(stderr.splitlines()) == 1, stderr  # one line, no traceback
    assert stdout == b""


@pytest.mark.parametrize("args", [["--version"], ["agent", "--help"], ["migrate", "--help"]])
async def test_a_command_reads_only_its_own_environment(args: list[str]) -> None:
    """A bad value for one command's variable does not break another command."""
    env = dict(os.environ) | {"REINITD_PORT": "abc", "REINITD_MAX_STREAMS": "lots"}
    process = await reinitd_process(*args, env=env, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert stdout
