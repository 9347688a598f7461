"""The `reinitd` command: its parser, built from reinitd.settings, and the dispatch to each
side. A command imports its side only once chosen, so `reinitd agent` never loads the server."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from reinitd import __version__, agent, settings
from reinitd.errors import SettingError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    options: tuple[settings.Option, ...]
    epilog: str = ""


SERVE = Command(
    "serve",
    "serve the reinit endpoint",
    "Serve GET /api/v2/workspaceagents/me/reinit, /healthz, /readyz and /metrics. Applies "
    "missing migrations first. Without a database URL, starts an embedded PostgreSQL under "
    "./.reinitd/ (reachable only by this account) and prints its URL for psql. SIGINT, SIGTERM "
    "and SIGHUP stop it cleanly, closing open streams; a second SIGINT cuts the wait short.",
    settings.SERVE,
)
MIGRATE = Command(
    "migrate",
    "apply missing schema migrations",
    "Apply the migrations under sql/migrations that the database is missing. Idempotent; safe "
    "when several replicas run it at once. Run it as the schema's owner.",
    settings.MIGRATE,
)
AGENT = Command(
    "agent",
    "the agent side: wait for the claim and run a command",
    "Wait on the reinit endpoint with wait=true and run CMD once per claim, with "
    "REINITD_WORKSPACE_ID, REINITD_OWNER_ID and REINITD_REASON in its environment. Reconnects "
    "with capped exponential backoff on any error; a 401 (a token the server does not know, "
    "perhaps not provisioned yet) is logged at warning and retried too. A claim counts as "
    "handled once CMD exits 0, and handled claims are recorded in a state file so that a "
    "restarted agent never runs CMD twice for one claim. It never follows a redirect to "
    "another scheme, host or port, so the token goes nowhere else. Logs go to stderr: console "
    "lines on a terminal, JSON lines otherwise (--log-format).",
    settings.AGENT,
    epilog=f"Exit codes: {agent.EXIT_OK} --once printed an event, or a signal stopped the agent; "
    f"{agent.EXIT_USAGE} bad usage (a missing or invalid option, an unwritable or corrupt state "
    f"file); {agent.EXIT_NOT_WAITING} the server answered 409 (the workspace is not, or no "
    f"longer, a prebuild waiting to be claimed); {agent.EXIT_COMMAND_FAILED} CMD failed on "
    "every attempt.",
)
COMMANDS = {command.name: command for command in (SERVE, MIGRATE, AGENT)}
# The module behind each command, the packages it needs, and the install that brings them.
_SERVER_NEEDS = ("asyncpg", "prometheus_client")
ENTRY = {
    "serve": ("reinitd.server.serve", _SERVER_NEEDS, "reinitd[server]"),
    "migrate": ("reinitd.server.serve", _SERVER_NEEDS, "reinitd[server]"),
    "agent": ("reinitd.agent.command", ("aiohttp", "structlog"), "reinitd"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reinitd",
        description="Tells the agent of a prebuilt workspace the moment a user claims it.",
        epilog="Every option can also be set from the environment variable named in brackets.",
    )
    parser.add_argument("--version", action="version", version=f"reinitd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog or None,
        )
        for option in command.options:
            choices = f" ({'|'.join(option.choices)})" if option.choices else ""
            sub.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.metavar or option.name.upper(),
                # argparse formats help with %: a literal one must be doubled
                help=f"{option.help}{choices} [env {option.env}; default: {option.shown}]".replace(
                    "%", "%%"
                ),
            )
        if command is AGENT:
            sub.add_argument(
                "--once",
                action="store_true",
                help="print the first event as JSON on stdout and exit 0",
            )
            sub.add_argument("--version", action="version", version=f"reinitd {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        values = settings.resolve(command.options, vars(args), os.environ)
    except SettingError as exc:
        parser.exit(2, f"reinitd {command.name}: {exc}\n")
    values["once"] = getattr(args, "once", False)
    module, needs, install = ENTRY[command.name]
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        parser.exit(
            1,
            f"reinitd {command.name}: this install lacks {', '.join(missing)}; "
            f"install it with: pip install '{install}'\n",
        )
    runner = importlib.import_module(module)
    code: int = runner.main(command.name, values)
    return code


if __name__ == "__main__":
    sys.exit(main())
