"""The README's table of security limits states each default once, from its named constant: a
constant changed without the table (or the table without the constant) fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (?P<limit>[^|]+?) \| (?P<default>[^|]+?) \| `(?P<constant>[\w.]+)` \|")


def rows() -> list[re.Match]:
    return [match for line in README.read_text().splitlines() if (match := ROW.match(line))]


def value_of(dotted: str) -> object:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def shown(value: object) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,}"


def test_each_limit_in_the_readme_is_its_constants_value():
    found = rows()
    assert len(found) >= 30, "the README's security limits table is missing or cut"
    wrong = [f"{row['limit']}: README {row['default']}, {row['constant']} = {shown(value_of(row['constant']))}"
             for row in found if row["default"] != shown(value_of(row["constant"]))]
    assert not wrong, wrong


def test_the_table_checks_what_it_claims_to():
    row = next(row for row in rows() if row["constant"] == "studio.gate.MAX_EDITOR_LAYERS")
    assert row["default"] == "4" and shown(4.0) == "4" and shown(5_783_936) == "5,783,936"
