"""SQL text loaded by name from the package's `.sql` files."""

import re
from importlib import resources
from importlib.resources.abc import Traversable

_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def _sql_root() -> Traversable:
    return resources.files("reinitd.sql")


def parse_blocks(text: str) -> dict[str, str]:
    """Split a file of `-- name --` blocks into {name: sql}."""
    parts = _BLOCK.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def migrations() -> list[tuple[str, str]]:
    """Every migration file as (name, sql), in the order they apply."""
    folder = _sql_root() / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


QUERIES: dict[str, str] = parse_blocks((_sql_root() / "queries.sql").read_text(encoding="utf-8"))
