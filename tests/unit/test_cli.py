"""The command line: help that names every option's variable and default, and bad values that
stop a command at once with one line naming the flag or variable."""

from __future__ import annotations

import asyncio
import os

import pytest

from reinitd import cli
from tests.support import reinitd_process


def run(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`reinitd ARGS` in this process with exactly `env` (it must stop before any work, as
    --help and bad values do); its exit code."""
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    return int(exited.value.code or 0)


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
                "REINITD_EVENT_LOOP",
                "REINITD_QUERY_TIMEOUT",
                "default: 15]",
                "default: 8080",
            ],
        ),
        ("migrate", ["DATABASE_URL"]),
        ("agent", ["REINITD_URL", "REINITD_AGENT_TOKEN", "REINITD_EXEC", "Exit codes"]),
    ],
)
def test_help_explains_every_option(
    command: str,
    expected: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every command's --help names each option's variable and default."""
    code = run([command, "--help"], {"COLUMNS": "200"}, monkeypatch)
    assert code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in expected:
        assert needle in text


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--workers", "0"], {}, "--workers='0': expected a whole number of at least 1"),
        (["serve", "--workers", "999"], {}, "--workers='999': at most"),
        (["serve", "--ping-interval", "-1"], {}, "--ping-interval='-1': expected a number"),
        (["serve", "--port", "70000"], {}, "--port='70000': expected a TCP port number"),
        (["serve"], {"REINITD_QUERY_TIMEOUT": "0"}, "REINITD_QUERY_TIMEOUT='0': expected a number"),
        (["serve"], {"REINITD_PORT": "http"}, "REINITD_PORT='http': expected a TCP port"),
        (["serve"], {"DATABASE_URL": "notaurl"}, "DATABASE_URL='notaurl': expected a PostgreSQL"),
        (["serve"], {"DATABASE_URL": "mysql://db/x"}, "(got a mysql: address)"),
        (["serve"], {"REINITD_LOG_LEVEL": "verbose"}, "expected one of debug, info, warning"),
        (["serve"], {"REINITD_LOG_FORMAT": "xml"}, "expected one of auto, json, console"),
        (["serve"], {"REINITD_EVENT_LOOP": "trio"}, "expected one of auto, uvloop, asyncio"),
        (["agent", "--url", "notaurl"], {}, "--url='notaurl': expected the base URL"),
        (
            ["serve"],
            {"DATABASE_URL": "postgresql://[::1/db"},
            "DATABASE_URL: expected a PostgreSQL",
        ),
        # a secret is never shown: a token not at all, a URL without its password
        (["agent", "--token", "s3cret-token"], {}, "--token: expected the agent token"),
        (["agent"], {"REINITD_AGENT_TOKEN": "s3cret-token"}, "REINITD_AGENT_TOKEN: expected"),
        (
            ["serve"],
            {"DATABASE_URL": "postgresql+asyncpg://u:s3cret@db/x"},
            "DATABASE_URL='postgresql+asyncpg://u:***@db/x': expected a PostgreSQL URL",
        ),
        (
            ["migrate", "--database-url", "mysql://u@db/x?sslmode=require&password=s3cret"],
            {},
            "--database-url='mysql://u@db/x?sslmode=require&password=***': expected",
        ),
        (
            ["serve"],
            {"REINITD_LISTEN_DATABASE_URL": "postgresql://u:s3cret@[::1/x"},
            "REINITD_LISTEN_DATABASE_URL: expected a PostgreSQL URL",
        ),
        (["agent", "--url", "ftp://u:s3cret@host/"], {}, "--url='ftp://u:***@host/': expected"),
    ],
)
def test_bad_options_are_clear_errors(
    args: list[str],
    env: dict[str, str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Invalid flags or environment values stop the command at once, with exit code 2 and a
    one-line message naming the flag or variable, and no secret (stderr ends up in journals)."""
    code = run(args, env, monkeypatch)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert expected in captured.err
    assert len(captured.err.splitlines()) == 1, captured.err  # one line, no traceback
    assert captured.out == ""
    assert "s3cret" not in captured.err


async def test_a_command_reads_only_its_own_environment() -> None:
    """A bad value for one command's variable breaks neither --version nor another command
    (a real process: the environment is the whole point)."""
    env = dict(os.environ) | {"REINITD_PORT": "abc", "REINITD_MAX_STREAMS": "lots"}
    for args in (["--version"], ["agent", "--help"], ["migrate", "--help"]):
        process = await reinitd_process(*args, env=env, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, args
        assert stdout, args
