"""docs/METHODS.md says what the code does: every parameter with its default, every table column."""
from __future__ import annotations

import re
from pathlib import Path

from core.schemas import TABLES
from jobs.cli import method_params_classes, params_table

REPO = Path(__file__).resolve().parents[1]
METHODS = (REPO / "docs" / "METHODS.md").read_text(encoding="utf-8")


def test_each_methods_parameter_table_is_the_one_the_code_prints():
    blocks = dict(re.findall(r"<!-- params: (\w+) -->\n(.*?)\n<!-- /params -->", METHODS, re.S))
    assert sorted(blocks) == sorted(method_params_classes())
    for method, block in blocks.items():
        assert block == params_table(method, markdown=True), (
            f"docs/METHODS.md's {method} parameters differ from the code; paste the output of "
            f"`moesafe params {method} --markdown` (without its heading) between its markers")


def test_every_column_of_every_table_is_explained():
    documented = set(re.findall(r"`(\w+)`", METHODS))
    for name, table in TABLES.items():
        missing = [column for column in table.schema.names if column not in documented]
        assert not missing, f"docs/METHODS.md does not explain {name}.{', '.join(missing)}"


def test_the_judges_table_has_every_judge_type():
    from core.judges import JUDGES

    section = METHODS.split("## Judges")[1].split("\n## ")[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == list(JUDGES)


def _documented_columns() -> dict[str, set[str]]:
    """table -> the columns docs/METHODS.md's "Result tables" gives it: its own rows, and the shared
    columns whose "tables" cell names it ("every table", "every table but `a`, `b`", or a list)."""
    section = METHODS.split("## Result tables")[1].split("The metrics:")[0]
    shared, own = section.split("Each table's own columns:")
    columns: dict[str, set[str]] = {name: set() for name in TABLES}
    for column, tables in re.findall(r"^\| `(\w+)` \| .* \| ([^|]+) \|$", shared, re.M):
        named = set(re.findall(r"`(\w+)`", tables))
        for name in (set(TABLES) - named if tables.startswith("every table") else named):
            columns[name].add(column)
    for table, cells in re.findall(r"^\| `(\w+)` \| ([^|]*) \|", own, re.M):
        assert table in TABLES, f"docs/METHODS.md describes a table {table!r} that core/schemas.py does not define"
        columns[table] |= set(re.findall(r"`(\w+)`", cells))
    return columns


def test_each_tables_documented_columns_are_exactly_its_schemas():
    """A column the docs give a table must be one it has, and each of its columns must be given it:
    not merely named somewhere else in the file."""
    for name, documented in _documented_columns().items():
        schema = set(TABLES[name].schema.names)
        assert not schema - documented, f"docs/METHODS.md does not give {name} its columns {sorted(schema - documented)}"
        assert not documented - schema, f"docs/METHODS.md gives {name} columns it does not have: {sorted(documented - schema)}"


def test_the_project_never_points_at_developer_files_outside_it():
    tracked = [p for p in REPO.rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".toml", "")
               and not any(part.startswith(".") or part in ("results", "__pycache__") or part.endswith(".egg-info")
                           for part in
                           p.relative_to(REPO).parts)]
    # the developers' folder beside the checkout (its spec and data), however it is reached, and its
    # spec's sections ("SPEC §3"), which a reader of the project does not have
    developer_files = re.compile(r"\.\./shared\b|/work/shared\b|shared/(?:SPEC|data)\b|\bSPEC\b")
    offenders = [str(p.relative_to(REPO)) for p in tracked
                 if developer_files.search(p.read_text(errors="ignore")) and p.name != "test_docs.py"]
    assert offenders == []
