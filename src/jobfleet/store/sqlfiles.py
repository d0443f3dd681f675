"""SQL kept in files beside the code: versioned migrations, and queries looked up by name."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_MIGRATION = re.compile(r"(?P<dialect>[a-z]+)_(?P<version>\d+)_\w+\.sql\Z")
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, script) of every `DIALECT_NNNN_what.sql` file, oldest first."""
    found = []
    for entry in resources.files("jobfleet.store").joinpath("sql").iterdir():
        m = _MIGRATION.match(entry.name)
        if m and m["dialect"] == dialect:
            found.append((int(m["version"]), entry.read_text()))
    return sorted(found)


@cache
def queries(dialect: str) -> dict[str, str]:
    """The queries of `DIALECT_queries.sql`, each headed by a `-- name: NAME` line."""
    text = resources.files("jobfleet.store").joinpath("sql", f"{dialect}_queries.sql").read_text()
    parts = _NAME.split(text)[1:]
    return {name: body.strip() for name, body in zip(parts[::2], parts[1::2], strict=True)}
