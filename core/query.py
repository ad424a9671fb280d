"""SQL over the result store: every table is a DuckDB view under its own name.

    run_query("SELECT model, metric, value FROM metrics WHERE run_id = 'nightly-1'", "s3://b/results")

Each view reads `<root>/<table>/**/*.parquet` with union_by_name, so files of older schema
versions (fewer columns) read alongside newer ones, and always has every column of the current
schema (a typed empty row set is unioned in), even before the table has any file. Hive partition
keys come from the path: `model=` merges with the row's `model` column, and `run=` is served
as `run_id`, so filters on model and run_id skip whole directories. Result tables show only rows
of committed units (see core.store). A view reflects the files present at connect().

Queries are read-only over the root: only SELECT statements run (also WITH, DESCRIBE, SHOW,
SUMMARIZE, which DuckDB parses as SELECT), and DuckDB itself is locked to the root before the
user's SQL runs: no file outside it can be read (enable_external_access off, allowed_directories
the root), no extension installed or loaded, and lock_configuration keeps a query from undoing it.
"""
from __future__ import annotations

import csv
import io
import json
import math
from datetime import date, datetime, time
from typing import Any

import duckdb
import pyarrow as pa

from core.schemas import RESULT_TABLES, RUNS_TABLE, TABLES, UNITS_TABLE
from core.store import ResultStore

FORMATS = ("table", "csv", "json")
# Longest cell in the text table; csv and json carry full values.
_MAX_CELL = 60
# Statement kinds a query may contain: reads only (COPY, CREATE, INSERT, ATTACH, INSTALL, LOAD,
# SET, PRAGMA, EXPLAIN ANALYZE of a write... are refused).
_READ_ONLY = {duckdb.StatementType.SELECT}


class ReadOnlyError(ValueError):
    """A query that would do something other than read the result tables."""


def connect(root: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table of the store at `root`."""
    store = ResultStore(root, read_only=True)
    # No extension is ever fetched or loaded: everything needed is built in.
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                 "allow_community_extensions": False})
    con.execute("SET TimeZone = 'UTC'")  # timestamps are stored in UTC; show them so
    if not store.is_local:
        # DuckDB's own s3 support needs the httpfs extension (a download); s3fs reads instead,
        # with the standard AWS credential chain.
        con.register_filesystem(store.fs)
    for name in TABLES:  # `units` comes before the result tables, whose views join it
        con.execute(f"CREATE VIEW {name} AS {_view_sql(con, store, name)}")
    # Only files under the root from here on (the trailing slash keeps out `<root>-other/`).
    con.execute(f"SET allowed_directories = [{_literal(store.root + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """ReadOnlyError naming the first statement of `sql` that is not a read."""
    for statement in con.extract_statements(sql):
        if statement.type not in _READ_ONLY:
            kind = statement.type.name.replace("_STATEMENT", "")
            raise ReadOnlyError(f"queries are read-only: {kind} statements are refused "
                                f"({' '.join(statement.query.split())[:80]!r}); use SELECT (or WITH, DESCRIBE, "
                                f"SHOW, SUMMARIZE) over the tables")


def run_query(sql: str, root: str, fmt: str = "table") -> str:
    """Run `sql` against the store at `root`; the result as an aligned text table, CSV, or one
    JSON array of objects."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    con = connect(root)
    try:
        check_read_only(con, sql)
        relation = con.sql(sql)
        # Arrow, not fetchall(): DuckDB's Python conversion of TIMESTAMPTZ needs pytz.
        result = pa.table(relation) if relation is not None else None
    finally:
        con.close()
    if result is None:  # a statement without a result set
        return ""
    if fmt == "json":
        return json.dumps(result.to_pylist(), default=_json_value, ensure_ascii=False)
    # Tuples, not dicts: a query may return two columns of the same name.
    rows = list(zip(*(column.to_pylist() for column in result.columns)))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.column_names)
        writer.writerows([_csv_cell(v) for v in row] for row in rows)
        return out.getvalue()
    return _text_table(result.column_names, rows)


def _view_sql(con: duckdb.DuckDBPyConnection, store: ResultStore, name: str) -> str:
    schema = TABLES[name].schema
    types = con.from_arrow(schema.empty_table()).types
    typed_empty = ("SELECT " + ", ".join(f"NULL::{t} AS {_ident(f.name)}" for f, t in zip(schema, types))
                   + " WHERE false")
    if not store.has_files(name):
        return typed_empty
    partitions = {"run": "VARCHAR"} if name == RUNS_TABLE else {"model": "VARCHAR", "run": "VARCHAR"}
    # hive_types: without them DuckDB guesses partition types, and run=20250101 would be a number.
    files = (f"read_parquet({_literal(store.table_glob(name))}, hive_partitioning = true, "
             f"union_by_name = true, hive_types = {_struct_literal(partitions)})")
    rows = f"{typed_empty} UNION ALL BY NAME SELECT * EXCLUDE (run) REPLACE (run AS run_id) FROM {files}"
    if name not in RESULT_TABLES:
        return rows
    # Only committed units. An inner join (a unit has one `units` row, so no duplicates), not a
    # semi join: DuckDB carries filters on run_id/model across it, pruning the units files too.
    return (f"SELECT r.* FROM ({rows}) AS r JOIN {UNITS_TABLE} AS u "
            f"ON r.run_id = u.run_id AND r.model = u.model AND r.unit_id = u.unit_id AND u.status = 'ok'")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _struct_literal(items: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in items.items()) + "}"


def _json_value(value: Any) -> Any:
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)  # Decimal, timedelta, ...


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    return value


def _text_cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    text = str(_csv_cell(value)).replace("\n", "\\n")
    return text if len(text) <= _MAX_CELL else text[:_MAX_CELL - 1] + "…"


def _text_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [[_text_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    # Numbers align right, everything else left.
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
