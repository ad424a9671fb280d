"""Prompt datasets: named benchmarks, the synthetic sandbox sets, and any CSV / JSONL /
Parquet file, local or remote (s3:// and other fsspec URLs), all as `PromptRecord`s.

    load_prompts("jbb", split="harmful")                     # JailbreakBench from the hub
    load_prompts("advbench50", path="/data/harmful_behaviors.csv")   # a local copy instead
    load_prompts("s3://bucket/prompts.parquet", columns={"prompt": "question"})
    load_prompts("sandbox", split="jailbreak")

Ids are stable: the named datasets number source rows (`advbench-0007` is row 7 of AdvBench,
in advbench and advbench50 alike); files use their `id` column when they have one (or the one
mapped by columns.id) and number rows otherwise.
"""
from __future__ import annotations

import csv
import importlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Mapping

DATASETS: tuple[str, ...] = ("jbb", "advbench", "advbench50", "sandbox")
FILE_TYPES: tuple[str, ...] = (".csv", ".jsonl", ".parquet")
FIELDS: tuple[str, ...] = ("prompt", "target", "category", "id")

# The F-SOUR paper's 50 prompts, 0-based rows of AdvBench's harmful_behaviors.csv.
ADVBENCH50_ROWS: tuple[int, ...] = (
    1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 25, 26, 27, 28, 29, 30, 32, 33, 34, 37, 39, 42,
    43, 45, 51, 52, 53, 55, 56, 57, 58, 70, 72, 73, 74, 75, 76, 81, 82, 86, 90, 93, 94, 96, 106,
    110, 115, 124,
)
ADVBENCH_ROWS = 520


# A table is (column names, rows as dicts), whatever it was read from.
Table = tuple[list[str], list[dict[str, Any]]]


class DatasetError(ValueError):
    """A dataset cannot be loaded as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    target: str | None
    category: str | None
    dataset: str


@dataclass(frozen=True)
class _HubDataset:
    repo: str
    config: str | None
    hub_split: str | None  # None: the caller's split is the hub split
    # Column names to look for per field, first match wins, case-insensitive; the first is the
    # one named in error messages.
    columns: Mapping[str, tuple[str, ...]]


_JBB = _HubDataset("JailbreakBench/JBB-Behaviors", "behaviors", None,
                   {"prompt": ("Goal",), "target": ("Target",), "category": ("Category",)})
# walledai/AdvBench is harmful_behaviors.csv in its original row order with goal renamed prompt.
_ADVBENCH = _HubDataset("walledai/AdvBench", None, "train",
                        {"prompt": ("goal", "prompt"), "target": ("target",),
                         "category": ("category",)})
_JBB_SPLITS = ("harmful", "benign")
_SANDBOX_SPLITS = ("regular", "jailbreak", "benign")
_FILE_COLUMNS = {"prompt": ("prompt",), "target": ("target",), "category": ("category",),
                 "id": ("id",)}


def load_prompts(source: str, *, split: str | None = None, path: str | None = None,
                 columns: Mapping[str, str | None] | None = None, limit: int | None = None,
                 sandbox_split: str | None = None) -> list[PromptRecord]:
    """Prompts of a named dataset (see DATASETS) or of a .csv / .jsonl / .parquet file or URL.

    split: jbb "harmful" (default) | "benign"; sandbox "regular" (default) | "jailbreak" |
    "benign". path: a local copy (any supported file) to read instead of the hub, for jbb,
    advbench and advbench50. columns: field -> column name for prompt, target, category, id
    (None: don't use that field). limit: keep the first `limit` records. sandbox_split: the
    sandbox's "train" | "heldout" (default) prompts.
    """
    if columns is not None:
        unknown = sorted(set(columns) - set(FIELDS))
        if unknown:
            raise DatasetError(f"columns has unknown field(s) {unknown}: the fields are "
                               f"{', '.join(FIELDS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer, got {limit!r}")
    if sandbox_split is not None and source != "sandbox":
        raise DatasetError("sandbox_split applies only to the sandbox dataset")
    if path is not None and source not in ("jbb", "advbench", "advbench50"):
        raise DatasetError("path replaces the hub download of jbb, advbench or advbench50; "
                           f"to read a file, give it as the dataset instead of {source!r}")
    if split is not None and source not in ("jbb", "sandbox"):
        raise DatasetError(f"{source} has no splits; split applies to jbb and sandbox")

    if source == "jbb":
        split = _choose(split or "harmful", _JBB_SPLITS, "jbb split")
        dataset = f"jbb-{split}"
        origin, table = _hub_or_path(_JBB, split, path)
        records = _to_records(table, _JBB.columns, columns, origin, dataset)
    elif source in ("advbench", "advbench50"):
        origin, table = _hub_or_path(_ADVBENCH, None, path)
        if source == "advbench50":
            rows = _advbench50_rows(table, origin)
        elif len(table[1]) == ADVBENCH_ROWS:
            rows = None
        else:  # ids number AdvBench rows, so anything but the full set would be misnumbered
            raise DatasetError(f"{origin} has {len(table[1])} rows, not AdvBench's "
                               f"{ADVBENCH_ROWS}: for the 50-row subset use advbench50; for "
                               f"another prompt file give its path as the dataset")
        records = _to_records(table, _ADVBENCH.columns, columns, origin, source,
                              id_prefix="advbench", rows=rows)
    elif source == "sandbox":
        split = _choose(split or "regular", _SANDBOX_SPLITS, "sandbox split")
        sandbox_split = _choose(sandbox_split or "heldout", ("heldout", "train"), "sandbox_split")
        dataset = f"sandbox-{sandbox_split}-{split}"
        table = _sandbox_table(split, sandbox_split)
        records = _to_records(table, _FILE_COLUMNS, columns, dataset, dataset)
    else:
        table = _read_file(source)
        stem = PurePosixPath(source).stem
        records = _to_records(table, _FILE_COLUMNS, columns, source, stem)
    return records[:limit]


def _choose(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise DatasetError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    return value


def _hub_or_path(hub: _HubDataset, split: str | None, path: str | None) -> tuple[str, Table]:
    if path is not None:
        return path, _read_file(path)
    return hub.repo, _download(hub, split)


def _download(hub: _HubDataset, split: str | None) -> Table:
    import datasets

    from core.hub import hub_offline, hub_unreachable

    optional = ", ".join(names[0] for field, names in hub.columns.items() if field != "prompt")
    advice = (f"download it elsewhere and set `path: /local/file.csv` (CSV, JSONL or Parquet "
              f"with a {hub.columns['prompt'][0]} column; {optional} used when present)")
    offline = datasets.config.HF_HUB_OFFLINE or hub_offline()
    endpoint = hub_unreachable()
    if endpoint:
        raise DatasetError(f"cannot download {hub.repo} ({endpoint} unreachable: no network?): {advice}; "
                           f"or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache")
    try:
        loaded = datasets.load_dataset(hub.repo, hub.config, split=hub.hub_split or split)
    except Exception as error:  # the hub client's errors share no base class worth naming
        why = "offline mode, and no cached copy" if offline else f"{type(error).__name__}: {error}"
        raise DatasetError(f"cannot download {hub.repo} ({why}): {advice}") from error
    return list(loaded.column_names), loaded.to_list()


def _read_file(urlpath: str) -> Table:
    """Columns and rows of a .csv, .jsonl or .parquet file, local or any fsspec URL (s3://...)."""
    suffix = PurePosixPath(urlpath).suffix.lower()
    if suffix not in FILE_TYPES:
        if not suffix and "/" not in urlpath:
            raise DatasetError(f"unknown dataset {urlpath!r}: known datasets are "
                               f"{', '.join(DATASETS)}, or give a path to a "
                               f"{', '.join(FILE_TYPES)} file")
        raise DatasetError(f"{urlpath}: unsupported file type {suffix or '(no extension)'!r}; "
                           f"use one of {', '.join(FILE_TYPES)}")
    import fsspec

    try:
        with fsspec.open(urlpath, "rb") as raw:
            if suffix == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(raw)
                return list(table.column_names), table.to_pylist()
            data = raw.read()
    except FileNotFoundError:
        raise DatasetError(f"{urlpath}: no such file") from None
    except OSError as error:
        raise DatasetError(f"cannot read {urlpath}: {error}") from error
    text = io.StringIO(_decode(data, urlpath), newline="")
    return _read_csv(text, urlpath) if suffix == ".csv" else _read_jsonl(text, urlpath)


def _decode(data: bytes, urlpath: str) -> str:
    """The file's text; DatasetError naming the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a byte-order mark
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{urlpath} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                           f"{error.start}); save the file as UTF-8") from None


def _read_csv(text: io.StringIO, urlpath: str) -> Table:
    reader = csv.DictReader(text)
    rows: list[dict[str, Any]] = []
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as error:
        # line_num counts the physical lines parsed before the failing one
        where = f"{urlpath} line {reader.line_num + 1} (data row {len(rows)}, 0-based)"
        if "field larger than field limit" in str(error):
            raise DatasetError(f"{where}: a field longer than {csv.field_size_limit():,} characters; no prompt is "
                               f"that long: is a quote left open, or is this not a prompt file?") from None
        raise DatasetError(f"{where}: not valid CSV ({error})") from None
    return list(reader.fieldnames or []), rows


def _read_jsonl(text: io.StringIO, urlpath: str) -> Table:
    columns: dict[str, None] = {}  # insertion-ordered union of keys
    rows = []
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{urlpath} line {number}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{urlpath} line {number}: expected a JSON object per line")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows


def _sandbox_table(split: str, sandbox_split: str) -> Table:
    try:
        # Imported here: the sandbox pulls in model-training code that other datasets never need.
        sandbox = importlib.import_module("core.sandbox")
    except ModuleNotFoundError as error:
        if error.name != "core.sandbox":
            raise
        raise DatasetError("the sandbox dataset needs core/sandbox.py, which is missing") from None
    items = sandbox.prompt_sets(sandbox_split)[split]
    columns = list(dict.fromkeys(key for item in items for key in item))
    return columns, list(items)


def _advbench50_rows(table: Table, origin: str) -> list[tuple[int, int]]:
    """(position in `table`, AdvBench row) of the F-SOUR paper's 50 rows, from the full set or from the
    published subset file, whose "Original index" column gives each row's AdvBench row."""
    columns, rows = table
    if len(rows) == ADVBENCH_ROWS:
        return [(index, index) for index in ADVBENCH50_ROWS]
    original = _find(columns, ("original index",))
    if original is None:
        raise DatasetError(f"{origin} has {len(rows)} rows: advbench50 selects rows of the full "
                           f"{ADVBENCH_ROWS}-row AdvBench (harmful_behaviors.csv), or reads a "
                           f"subset file with an 'Original index' column")
    try:
        indices = [int(row[original]) for row in rows]
    except (TypeError, ValueError):
        raise DatasetError(f"{origin}: column {original!r} must hold row numbers") from None
    if sorted(indices) != list(ADVBENCH50_ROWS):
        raise DatasetError(f"{origin}: its {original!r} column does not list the 50 AdvBench rows "
                           f"the F-SOUR paper used (core.datasets.ADVBENCH50_ROWS)")
    position = {index: i for i, index in enumerate(indices)}
    return [(position[index], index) for index in ADVBENCH50_ROWS]


def _find(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {c.lower(): c for c in reversed(columns)}  # reversed: the first spelling wins
    return next((by_lower[c.lower()] for c in candidates if c.lower() in by_lower), None)


def _resolve(columns: list[str], defaults: Mapping[str, tuple[str, ...]],
             overrides: Mapping[str, str | None] | None, origin: str) -> dict[str, str | None]:
    """field -> column to read (or None), checked against the columns the data has."""
    mapping: dict[str, str | None] = {}
    for field in FIELDS:
        if overrides and field in overrides:
            column = overrides[field]
            if column is not None and column not in columns:
                raise DatasetError(f"{origin} has no column {column!r} (set as columns.{field}); "
                                   f"its columns are {columns}")
            mapping[field] = column
        else:
            mapping[field] = _find(columns, defaults.get(field, ()))
    if mapping["prompt"] is None:
        if overrides and "prompt" in overrides:
            raise DatasetError("columns.prompt cannot be null: every record needs a prompt")
        looked_for = list(defaults["prompt"])
        raise DatasetError(f"{origin} has no prompt column (looked for {looked_for}); its columns "
                           f"are {columns}: set columns: {{prompt: <one of them>}}")
    return mapping


def _cell(row: dict[str, Any], column: str | None) -> str | None:
    """The row's text in `column`; None for no column, a missing cell or blank text."""
    # Checked first because csv.DictReader files a row's surplus cells under the key None.
    if column is None or row.get(column) is None:
        return None
    text = str(row[column])
    return text if text.strip() else None


def _to_records(table: Table, defaults: Mapping[str, tuple[str, ...]],
                overrides: Mapping[str, str | None] | None, origin: str, dataset: str, *,
                id_prefix: str | None = None,
                rows: list[tuple[int, int]] | None = None) -> list[PromptRecord]:
    """Records of `table`, with checked fields. `rows`: (position, source row) pairs to take,
    in order; by default every row, numbered by position."""
    columns, data = table
    if not data:
        raise DatasetError(f"{origin} has no rows")
    mapping = _resolve(columns, defaults, overrides, origin)
    id_prefix = id_prefix or dataset
    records = []
    for position, source_row in ([(i, i) for i in range(len(data))] if rows is None else rows):
        row = data[position]
        prompt = _cell(row, mapping["prompt"])
        if prompt is None:
            raise DatasetError(f"{origin}: data row {position} (0-based) has an empty prompt "
                               f"in column {mapping['prompt']!r}")
        if mapping["id"] is None:
            record_id = f"{id_prefix}-{source_row:04d}"
        else:
            record_id = _cell(row, mapping["id"])
            if record_id is None:
                raise DatasetError(f"{origin}: data row {position} (0-based) has an empty id in "
                                   f"column {mapping['id']!r}")
        records.append(PromptRecord(record_id, prompt, _cell(row, mapping["target"]),
                                    _cell(row, mapping["category"]), dataset))
    repeated = [(i, n) for i, n in Counter(r.id for r in records).items() if n > 1]
    if repeated:
        shown = ", ".join(f"{i!r} ×{n}" for i, n in repeated[:5])
        raise DatasetError(f"{origin}: ids repeat ({shown}{', ...' if len(repeated) > 5 else ''}); "
                           f"set columns.id to a column of unique values, or columns.id: null "
                           f"to number the rows")
    return records
