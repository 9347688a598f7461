"""The documents say what the code does: options, file maps, released migrations, figures.

Each failure names the document, the place in it, and the line to add or remove."""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from reinitd import cli, settings
from reinitd.agent import client

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "protocol.md"
README = ROOT / "README.md"
MIGRATIONS = ROOT / "sql" / "migrations"

# Released migrations and their sha256: a migration never changes once released (merged into
# main), since a database may already have applied it. Releasing a new one means adding it here.
RELEASED = {
    "0001_schema.sql": "e1863b977660ddafd8af21956adde9889548be276b4739e2cd29e1293fc62daa",
    "0002_roles.sql": "5cb910891c15a2be8f07899437f27e3e407ed403d9873f62c6a45cf5bbb26297",
    "0003_doorbell.sql": "2c79fb8d3e9e48e4719a829fa710bdf4052875a90a25c913202c23f5a10c613a",
    "0004_claim_state.sql": "ef859997235c3ee412b2a9a08fc113ce75aeae911b5d2619a9b01a8189fcdb7f",
    "0005_presence.sql": "8ed809b907ec1b74913c6d33499226181b3603ac8d2d440b326924da94cccf72",
    "0006_no_presence_fk.sql": "ad079befcb30bbd795e0339aa0e2767ff73cd9c8ab2b91d4d097bfea59179db7",
}

_CODE = re.compile(r"`([^`]+)`")


def section(path: Path, heading: str) -> str:
    """The text under the Markdown heading `heading` (any level), up to the next heading of
    that level or above."""
    text = path.read_text()
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.MULTILINE)
    assert match, f"{path.name}: no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_rows(text: str, after: str = "") -> list[list[str]]:
    """The cells of the first Markdown table in `text` after the line containing `after`, header
    and rule excluded."""
    lines = text[text.index(after) :].splitlines() if after else text.splitlines()
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def shown(number: float) -> str:
    """A number as the documents write it: 15, not 15.0."""
    return str(int(number)) if float(number).is_integer() else str(number)


def codes(cell: str) -> list[str]:
    return _CODE.findall(cell)


def documented(rows: list[list[str]]) -> dict[str, tuple[str, str]]:
    """flag → (environment cell, default cell), one entry per flag of a row (a row may list
    several flags, variables and defaults, each separated by a comma)."""
    found: dict[str, tuple[str, str]] = {}
    for row in rows:
        flags, envs = codes(row[0]), codes(row[1])
        defaults = row[2].split(", ") if len(flags) > 1 else [row[2]]
        for index, flag in enumerate(flags):
            env = envs[index] if index < len(envs) else ""
            found[flag] = (env, defaults[index] if index < len(defaults) else "")
    return found


def cli_extras(command: str) -> set[str]:
    """Flags of `reinitd COMMAND` that are not settings (e.g. the agent's --once)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {flag for action in sub.choices[command]._actions for flag in action.option_strings}
    return flags - {"-h", "--help", "--version"} - {o.flag for o in cli.COMMANDS[command].options}


def option_problems(
    where: str, rows: list[list[str]], options: Sequence[settings.Option], extras: set[str]
) -> Iterator[str]:
    docs = documented(rows)
    for option in options:
        if option.flag not in docs:
            value = "unset: …" if option.default is None else f"`{option.shown}`"
            yield f"{where}: add a row `| `{option.flag}` | `{option.env}` | {value} | … |`"
            continue
        env, default = docs[option.flag]
        if env != option.env:
            yield f"{where}: {option.flag}'s variable is `{option.env}` (settings.py), not `{env}`"
        if option.default is None:
            if default.startswith("`"):
                yield (
                    f"{where}: {option.flag} has no default value in settings.py: write "
                    f"'unset: <what happens>' or 'required', not {default!r}"
                )
        elif codes(default)[:1] != [option.shown]:
            yield (
                f"{where}: {option.flag}'s default is `{option.shown}` "
                f"(settings.py), not {default!r}"
            )
    for flag in sorted(set(docs) - {o.flag for o in options} - extras):
        yield f"{where}: remove the row for {flag}: settings.py has no such option"


@pytest.mark.parametrize("command", ["serve", "agent"])
def test_the_protocol_options_tables_match_the_settings(command: str) -> None:
    """docs/protocol.md §6.2 lists every option of serve and agent with its variable and
    default exactly as reinitd/settings.py defines them, and nothing else."""
    text = section(PROTOCOL, "6.2 Options")
    rows = table_rows(text, f"**`reinitd {command}`**")
    options = cli.COMMANDS[command].options
    where = f"docs/protocol.md §6.2 `reinitd {command}` table"
    assert list(option_problems(where, rows, options, cli_extras(command))) == []


def test_the_protocol_names_every_migrate_option() -> None:
    """docs/protocol.md §6.2 names each option of `reinitd migrate` with its variable."""
    text = section(PROTOCOL, "6.2 Options")
    paragraph = text[text.index("**`reinitd migrate`**") :].split("\n\n", 1)[0]
    as_above = (settings.LOG_LEVEL, settings.LOG_FORMAT)  # their variables: the serve table's
    missing = [
        f"`{option.flag}` / `{option.env}`"
        for option in settings.MIGRATE
        if f"`{option.flag}`" not in paragraph
        or (option not in as_above and f"`{option.env}`" not in paragraph)
    ]
    assert missing == [], f"docs/protocol.md §6.2 `reinitd migrate`: name {missing}"


def test_the_readme_configuration_table_matches_the_settings() -> None:
    """README.md's Configuration table lists every serve option with its variable and
    default exactly as reinitd/settings.py defines them, and nothing else."""
    rows = table_rows(section(README, "Configuration"))
    where = "README.md Configuration table"
    assert list(option_problems(where, rows, settings.SERVE, set())) == []


def test_protocol_says_the_options_are_checked_not_generated() -> None:
    """docs/protocol.md §6.2 names the test that keeps its tables true."""
    assert "tests/unit/test_docs.py" in section(PROTOCOL, "6.2 Options")


_LISTED_NAME = re.compile(r"^[\w.*-]+\.(py|json|sql)$")
_PATH_ROOTS = ("reinitd/", "sql/", "docs/", "tests/", "bench/")


def listed_paths(rows: list[list[str]]) -> set[str]:
    """Paths a file map names: full ones (`reinitd/server/hub.py`), and bare file names after
    one in the same row (`workers.py` after `reinitd/server/serve.py`), globs expanded."""
    paths: set[str] = set()
    for row in rows:
        folder = ""
        for code in (code for cell in row for code in codes(cell)):
            for name in code.split("; "):
                if name.startswith(_PATH_ROOTS):
                    folder = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
                    paths.add(name)
                elif folder and _LISTED_NAME.match(name):
                    paths.add(folder + name)
    return paths


def modules() -> set[str]:
    """Every module of the package, by path (package markers aside)."""
    return {
        str(path.relative_to(ROOT))
        for path in (ROOT / "reinitd").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }


def existing(listed: str) -> bool:
    return any(ROOT.glob(listed.rstrip("/"))) if "*" in listed else (ROOT / listed).exists()


@pytest.mark.parametrize(
    ("document", "heading"),
    [(PROTOCOL, "Where things live"), (README, "Layout")],
    ids=["protocol", "readme"],
)
def test_the_file_maps_match_the_tree(document: Path, heading: str) -> None:
    """Each file map names every module under reinitd/ and nothing that is gone."""
    listed = listed_paths(table_rows(section(document, heading)))
    where = f"{document.name} '{heading}' table"
    unlisted = sorted(modules() - listed)
    assert unlisted == [], f"{where}: add a row (or a name in a row) for each of {unlisted}"
    gone = sorted(path for path in listed if not existing(path))
    assert gone == [], f"{where}: remove {gone}: no such file in the tree"


def test_released_migrations_never_change() -> None:
    """Each released migration still has the sha256 it was released with, and every file in
    sql/migrations/ is released: when a new migration is released, add its name and sha256
    to RELEASED in this file (a migration must never change after that)."""
    files = {path.name: path for path in MIGRATIONS.glob("*.sql")}
    changed = [
        name
        for name, digest in RELEASED.items()
        if name not in files or hashlib.sha256(files[name].read_bytes()).hexdigest() != digest
    ]
    assert changed == [], (
        f"released migrations changed or gone: {changed}; put the change in a new migration"
    )
    new = {
        name: hashlib.sha256(path.read_bytes()).hexdigest()
        for name, path in files.items()
        if name not in RELEASED
    }
    assert new == {}, f"add to RELEASED in tests/unit/test_docs.py: {new}"


def test_the_protocol_names_every_migration() -> None:
    """docs/protocol.md §2.5 names every migration file and what it does."""
    text = section(PROTOCOL, "2.5 Migrations")
    missing = sorted(p.name for p in MIGRATIONS.glob("*.sql") if f"`{p.name}`" not in text)
    assert missing == [], f"docs/protocol.md §2.5 'Today:' list: add {missing}"


def test_the_agent_backoff_is_documented_as_the_code_does_it() -> None:
    """The agent's backoff figures in the README and the protocol are the client's: the
    floor doubling to the ceiling, and the first retry after half to all of the floor."""
    floor_ms, ceiling = round(client.BACKOFF_FLOOR * 1000), shown(client.BACKOFF_CEILING)
    readme = section(README, "Running an agent")
    assert f"the first retry after {floor_ms // 2} to {floor_ms} ms" in readme
    assert f"{floor_ms} ms doubling to {ceiling} s" in readme
    protocol = section(PROTOCOL, "6.6 The agent")
    assert f"from {shown(client.BACKOFF_FLOOR)} s doubling to {ceiling} s" in protocol
    assert f"the first retry comes after {floor_ms // 2} to {floor_ms} ms" in protocol
    assert f"at most {client.MAX_REDIRECTS} in a row" in readme
    assert f"at most {client.MAX_REDIRECTS} in a row" in protocol


def test_the_agent_help_tells_where_logs_go() -> None:
    """`reinitd agent --help` says what the log format really is: console on a terminal, JSON
    lines otherwise."""
    assert "console lines on a terminal, JSON lines otherwise" in cli.AGENT.description


def test_the_readme_keeps_the_agent_token_off_the_command_line() -> None:
    """The README's agent examples pass the token in REINITD_AGENT_TOKEN, never as --token,
    which every local user can read in ps."""
    assert "--token" not in section(README, "Running an agent")
