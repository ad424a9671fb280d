"""The result tables: one explicit, versioned pyarrow schema per table, defined here only.

Every row carries `schema_version`, so a file says which schema wrote it. Schemas evolve by
*adding nullable columns* and bumping the version: readers fill a column that an older file
lacks with nulls (`ResultStore.read_table`, and the DuckDB views of `core.query`). Changing a
column's type or meaning needs a new column name, never an edit in place.

Every method table (all but `runs` and `units`) carries `run_id`, `model` (the `model_slug`),
`unit_id` and `params` (the method's parameters as JSON); those whose rows were produced under
a route mask also carry `scope` ("prompt" or "all"; docs/METHODS.md). JSON columns accept any
JSON-serialisable value in `build_table` and are stored as text with sorted keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa


class SchemaError(ValueError):
    """Rows that do not fit a table's schema, or a table name that does not exist."""


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    schema: pa.Schema
    description: str


RUNS_TABLE = "runs"
STORE_ANSWERS: tuple[str, ...] = ("full", "hash", "none")  # what generations keeps of each answer
UNITS_TABLE = "units"

# Field metadata marking a string column whose text is JSON (build_table serialises into it).
_JSON = {b"moesafe.format": b"json"}
_TS = pa.timestamp("us", tz="UTC")
_INTS = pa.list_(pa.int32())
# What pa.array raises for a value that does not fit a type.
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)


def _col(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


def _json_col(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False, metadata=_JSON)


_KEY = [_col("run_id", pa.string()), _col("model", pa.string()), _col("unit_id", pa.string())]
_SCOPE = _col("scope", pa.string())
_PARAMS = _json_col("params")
_SCHEMA_VERSION = _col("schema_version", pa.int32())

# One judge's decision on one answer (mirrors core.judges.Verdict; `settings` includes the
# judge model). `jailbroken`/`score` are null when the judge could not decide.
_VERDICT = pa.struct([
    _col("judge", pa.string()),
    _col("jailbroken", pa.bool_(), nullable=True),
    _col("score", pa.float64(), nullable=True),
    _col("reason", pa.string()),
    _json_col("settings"),
])

# One forced coordinate of an F-SOUR route: at MoE layer `layer`, prompt position `token`,
# exactly `experts` are allowed.
_ROUTE_STEP = pa.struct([
    _col("layer", pa.int32()), _col("token", pa.int32()), _col("experts", _INTS),
])


def _method_table(name: str, version: int, description: str, columns: list[pa.Field],
                  masked: bool) -> TableSchema:
    fields = [*_KEY, *columns, *([_SCOPE] if masked else []), _PARAMS, _SCHEMA_VERSION]
    return _table(name, version, description, fields)


def _table(name: str, version: int, description: str, fields: list[pa.Field]) -> TableSchema:
    metadata = {"moesafe.table": name, "moesafe.schema_version": str(version)}
    return TableSchema(name, version, pa.schema(fields, metadata=metadata), description)


# One start of a run's driver (the first, or a resume): when, where, and how it ended.
_RUN_ATTEMPT = pa.struct([
    _col("started_at", _TS), _col("ended_at", _TS, nullable=True), _col("status", pa.string()),
    _col("host", pa.string()), _col("pid", pa.int64()),
])

_ALL = [
    _table(RUNS_TABLE, 2, "one row per run; rewritten when an attempt starts and ends", [
        _col("run_id", pa.string()),
        _col("manifest", pa.string()),            # the manifest as YAML text, secrets never included
        _col("manifest_hash", pa.string()),       # sha256 hex of `manifest` unless given
        _json_col("versions"),                    # {"moesafe", "torch", "transformers", "ray"}
        _col("started_at", _TS),
        _col("ended_at", _TS, nullable=True),
        _col("status", pa.string()),              # running / finished / incomplete / failed / interrupted
        _col("attempts", pa.list_(_RUN_ATTEMPT), nullable=True),  # v2: each start, first to last
        _SCHEMA_VERSION,
    ]),
    _table(UNITS_TABLE, 1, "one row per finished unit; written last, it commits the unit's rows", [
        *_KEY,
        _col("method", pa.string()),
        _col("kind", pa.string()),                # e.g. rosais_scores, fsour_search
        _col("status", pa.string()),              # "ok" or "failed"
        _col("attempts", pa.int32()),
        _col("seconds", pa.float64()),
        _col("error", pa.string(), nullable=True),
        _col("finished_at", _TS),
        _col("reused_from", pa.string(), nullable=True),  # the run whose rows were copied, not recomputed
        _SCHEMA_VERSION,
    ]),
    _method_table("rosais_scores", 1, "RoSais per prompt x MoE layer", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("layer", pa.int32()),
        _col("score", pa.float64()),              # max_s p_s(Q, l) - p(Q)
        _col("baseline_logprob", pa.float64()),   # p(Q)
        _col("best_mask_experts", _INTS),         # the experts the best mask allowed
        _col("s1", pa.int32()),
        _col("seed", pa.int64()),
    ], masked=True),
    _method_table("rosais_attack", 1, "RoSais attack per prompt x L routers masked", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("L", pa.int32()),
        _col("layers_masked", _INTS),
        _col("jailbroken", pa.bool_(), nullable=True),
        _col("score", pa.float64(), nullable=True),
        _col("judge", pa.string()),               # the judge deciding `jailbroken`; all verdicts: generations
    ], masked=True),
    _method_table("safex_counts", 1, "SAFEx expert counts C_i per prompt", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("group", pa.string()),               # regular / jailbreak / benign
        _col("phase", pa.string()),               # decode / prefill / both
        _col("tokens", pa.int64()),               # T_i
        _col("n_layers", pa.int32()),
        _col("n_experts", pa.int32()),
        _col("moe_layers", _INTS),                # model layer index of each counts row
        _col("counts", _INTS),                    # C_i flattened row-major, shape (n_layers, n_experts)
    ], masked=False),
    # v2: an empty set is one row with layer and expert null (v1 wrote no row for it)
    _method_table("safex_experts", 2, "SAFEx expert sets and selection frequencies", [
        _col("expert_set", pa.string()),          # E_top_regular / E_top_jailbreak / HCDG / HRCG
        _col("phase", pa.string()),
        _col("layer", pa.int32(), nullable=True),
        _col("expert", pa.int32(), nullable=True),
        _col("frequency", pa.float64(), nullable=True),  # share of the S rounds selecting it
    ], masked=False),
    _method_table("safex_rounds", 1, "SAFEx bootstrap: rounds selecting each expert, per chunk of rounds", [
        _col("group", pa.string()),               # regular / jailbreak
        _col("phase", pa.string()),
        _col("first_round", pa.int32()),
        _col("rounds", pa.int32()),               # rounds in this chunk
        _col("layer", pa.int32()),
        _col("expert", pa.int32()),
        _col("selected_rounds", pa.int32()),      # rounds whose Top-N held the expert
    ], masked=False),
    _method_table("safex_validation", 1, "SAFEx refusal per prompt before/after disabling", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("group", pa.string()),
        _col("condition", pa.string()),           # before / after / random_<draw> (one per random control)
        _col("refused", pa.bool_(), nullable=True),
        _col("judge", pa.string()),
        _col("n_disabled", pa.int32()),
    ], masked=True),
    # One search per prompt x restart (F-SOUR's, and the routing monitor's adaptive attacker's); its
    # answer and verdict are in fsour_routes / route_monitor, written by the units that answer searches in batches.
    _method_table("fsour_searches", 1, "F-SOUR searches, one row per prompt x restart", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("restart", pa.int32()),              # 0..R-1, candidates drawn from seed + restart
        _col("route", pa.list_(_ROUTE_STEP)),
        _col("joint_logprob", pa.float64()),      # log Pr(target reply) under the route found
        _col("forwards", pa.int64()),
        _col("candidates", pa.int64()),
        _col("seconds", pa.float64()),            # the search's wall time
        _col("prompt_tokens", pa.int32()),        # P, the chat-templated prompt's length
        _col("natural_pool", pa.int32(), nullable=True),  # m: candidates among the router's top m; null: all
    ], masked=True),
    # v2: prompt_tokens, so that where a route changed can be read from the end of the prompt.
    # v3: search_seconds; restarts are searched (fsour_searches) and answered in batches by separate units
    _method_table("fsour_routes", 3, "F-SOUR one row per prompt x restart", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("restart", pa.int32()),              # 0..R-1; -1 = the unrouted pre-check (forwards = 0, route empty)
        _col("route", pa.list_(_ROUTE_STEP)),
        _col("joint_logprob", pa.float64(), nullable=True),
        _col("forwards", pa.int64()),
        _col("candidates", pa.int64()),
        _col("seconds", pa.float64()),
        _col("jailbroken", pa.bool_(), nullable=True),
        _col("score", pa.float64(), nullable=True),
        _col("judge", pa.string()),               # selection across restarts: metrics (fsour/asr)
        _col("prompt_tokens", pa.int32(), nullable=True),  # P, the chat-templated prompt's length; null: pre-check
        _col("search_seconds", pa.float64(), nullable=True),  # the search's part of `seconds`; null: pre-check
    ], masked=True),
    # src's F-SOUR route on prompt dst; control "none" (dst unrouted: src and alignment null), "route"
    # or "random_<d>" (random experts at the route's (position, layer) slots)
    _method_table("fsour_transfer", 1, "F-SOUR routes applied to other prompts, one row per generation", [
        _col("src", pa.string(), nullable=True),  # the prompt whose route is applied
        _col("dst", pa.string()),                 # the prompt answered
        _col("dataset", pa.string()),
        _col("alignment", pa.string(), nullable=True),  # end | start: how route positions map onto dst
        _col("control", pa.string()),
        _col("same_category", pa.bool_(), nullable=True),  # null: no categories, or no src
        _col("slots", pa.int32()),                # (position, layer) slots forced on dst
        _col("jailbroken", pa.bool_(), nullable=True),
        _col("score", pa.float64(), nullable=True),
        _col("judge", pa.string()),               # the deciding judge (every verdict: generations)
        _col("target_logprob", pa.float64()),     # joint log-prob of dst's target reply under this row's route
        _col("target_logprob_gain", pa.float64()),  # minus that of dst unrouted
    ], masked=True),
    # groups: benign and harmful (unrouted), fsour (F-SOUR's reported route), adaptive (F-SOUR
    # drawing among the router's natural top experts, one row per restart)
    _method_table("route_monitor", 1, "routing-monitor scores, one row per generation", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("group", pa.string()),
        _col("restart", pa.int32(), nullable=True),  # adaptive rows only
        _col("route", pa.list_(_ROUTE_STEP)),
        _col("off_natural", pa.int64()),          # selected experts outside the router's own top-k
        _col("decisions", pa.int64()),            # selections counted: tokens x MoE layers x k
        _col("monitor_score", pa.float64()),      # off_natural / decisions
        _col("joint_logprob", pa.float64(), nullable=True),  # adaptive rows: the search's final value
        _col("jailbroken", pa.bool_(), nullable=True),
        _col("score", pa.float64(), nullable=True),
        _col("judge", pa.string()),               # the deciding judge; "" for benign rows (not judged)
    ], masked=True),
    _method_table("universal_routes", 1, "universal route: one row per search (dataset x settings)", [
        _col("dataset", pa.string()),
        _col("route", pa.list_(_ROUTE_STEP)),     # token: position from the prompt's end (-1 = last)
        _col("slots_forced", pa.int32()),         # (position, layer) slots the route forces
        _col("trailing_tokens", pa.int32()),      # m: the template's tokens after the user's content
        _col("train_prompt_ids", pa.list_(pa.string())),    # the training split, in the order prompts are added
        _col("heldout_prompt_ids", pa.list_(pa.string())),  # the held-out split (disjoint from training)
        _col("prompts_used", pa.list_(pa.string())),        # training prompts active when the search ended
        _col("prompt_logprobs", pa.list_(pa.float64())),    # their joint log-probs under the route
        _col("objective", pa.float64()),          # their sum
        _col("step_objective", pa.list_(pa.float64())),     # the summed objective after each slot visit
        _col("step_active", pa.list_(pa.int32())),          # active training prompts at each visit
        _col("forwards", pa.int64()),
        _col("candidates", pa.int64()),
        _col("seconds", pa.float64()),
    ], masked=True),
    _method_table("steer_counts", 1, "SteerMoE expert counts per prompt and teacher-forced reply", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("behaviour", pa.string()),           # refusal (behaviour 1) / compliance (behaviour 2, the target)
        _col("tokens", pa.int64()),               # reply tokens counted
        _col("n_layers", pa.int32()),
        _col("n_experts", pa.int32()),
        _col("counts", _INTS),                    # reply tokens routed to each expert, row-major (n_layers, n_experts)
    ], masked=False),
    # v2: ranked by a driver unit from the stored `steer_counts` (v1: in one model unit), with the
    # reply tokens behind p1 and p2
    _method_table("steer_experts", 2, "SteerMoE risk-difference expert ranking", [
        _col("dataset", pa.string()),
        _col("layer", pa.int32()),
        _col("expert", pa.int32()),
        _col("p1", pa.float64()),
        _col("p2", pa.float64()),
        _col("delta", pa.float64()),              # p1 - p2
        _col("rank", pa.int32()),                 # by |delta|, 0 = largest
        _col("refusal_tokens", pa.int64(), nullable=True),     # p1's denominator, summed over the prompts
        _col("compliance_tokens", pa.int64(), nullable=True),  # p2's denominator
    ], masked=False),
    _method_table("generations", 1, "every generated answer and its verdicts", [
        _col("prompt_id", pa.string()),
        _col("dataset", pa.string()),
        _col("method", pa.string()),
        _col("condition", pa.string()),           # e.g. baseline, L=5, restart=2, after
        _col("prompt", pa.string()),
        _col("answer", pa.string(), nullable=True),  # null unless store_answers keeps the text
        _col("answer_sha256", pa.string()),
        _col("store_answers", pa.string()),       # a name in STORE_ANSWERS
        _col("verdicts", pa.list_(_VERDICT)),    # every judge of the method entry, the deciding one first
        _col("scope", pa.string(), nullable=True),   # null when no route mask was applied
    ], masked=False),
    # v2: `judge` and `params_hash`, one row per (method entry's settings, judge, metric);
    # v3: `model_path` and `revision`, the model behind the manifest's name
    _table("metrics", 3, "aggregate numbers, e.g. ASR or refusal rate, one row per judge", [
        *_KEY,
        _col("dataset", pa.string(), nullable=True),
        _col("method", pa.string()),
        _col("judge", pa.string()),               # the manifest's judge name whose verdicts were counted
        _col("params_hash", pa.string()),         # core.method.params_hash of the method's params
        _col("metric", pa.string()),
        _col("value", pa.float64()),
        _col("n", pa.int64()),
        _col("model_path", pa.string(), nullable=True),  # the manifest's path: local dir, hub id or s3://
        _col("revision", pa.string(), nullable=True),    # the hub revision pinned, null when none
        _SCHEMA_VERSION,
    ]),
]

TABLES: dict[str, TableSchema] = {t.name: t for t in _ALL}

# Tables written per unit by ResultStore.write_unit (everything but runs and the unit rows).
RESULT_TABLES: tuple[str, ...] = tuple(n for n in TABLES if n not in (RUNS_TABLE, UNITS_TABLE))


def table_schema(name: str) -> TableSchema:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; known tables: {', '.join(TABLES)}") from None


def build_table(name: str, data: Iterable[Mapping[str, Any]] | pa.Table, **fill: Any) -> pa.Table:
    """Rows (dicts, or an Arrow table) as a pa.Table of table `name`'s exact schema.

    `fill` gives columns every row shares (e.g. run_id, model, unit_id): rows may omit them,
    and a row holding a different value is an error. `schema_version` is always the table's
    current version. Raises SchemaError naming the table, the column and, for dict rows, the row.
    """
    ts = table_schema(name)
    for col in fill:
        _check_known(ts, col, "fill")
    fill["schema_version"] = ts.version  # rows are always written in the current version
    if isinstance(data, pa.Table):
        columns = _columns_from_arrow(ts, data, fill)
    else:
        columns = _columns_from_rows(ts, list(data), fill)
    for field, column in zip(ts.schema, columns):
        if not field.nullable and column.null_count:
            first = column.is_null().to_pylist().index(True)
            raise SchemaError(f"table {name!r} column {field.name!r} is required ({field.type}) but "
                              f"{column.null_count} row(s) have no value (first: row {first})")
    return pa.Table.from_arrays(columns, schema=ts.schema)


def _check_known(ts: TableSchema, col: str, where: str) -> None:
    if col not in ts.schema.names:
        raise SchemaError(f"table {ts.name!r} has no column {col!r} ({where}); "
                          f"its columns: {', '.join(ts.schema.names)}")


def _columns_from_rows(ts: TableSchema, rows: list[Mapping[str, Any]], fill: dict[str, Any]) -> list[pa.Array]:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SchemaError(f"table {ts.name!r}: row {i} is a {type(row).__name__}, expected a dict")
        for col in row:
            _check_known(ts, col, f"row {i}")
        for col, value in fill.items():
            if col in row and row[col] != value:
                raise SchemaError(f"table {ts.name!r} column {col!r}: row {i} has {row[col]!r} "
                                  f"but every row here must have {value!r}")
    columns = []
    for field in ts.schema:
        encode = _encoder(field)
        default = fill.get(field.name)
        values = []
        for i, row in enumerate(rows):
            try:
                values.append(encode(row.get(field.name, default)))
            except (TypeError, ValueError) as e:
                raise SchemaError(f"table {ts.name!r} column {field.name!r}: row {i}: {e}") from e
        try:
            columns.append(pa.array(values, type=field.type))
        except _ARROW_ERRORS as e:
            raise _name_bad_row(ts, field, values) or SchemaError(
                f"table {ts.name!r} column {field.name!r}: values do not fit {field.type}: {e}") from e
    return columns


def _name_bad_row(ts: TableSchema, field: pa.Field, values: list[Any]) -> SchemaError | None:
    """Re-run a failed conversion value by value, to name the row that broke it."""
    for i, value in enumerate(values):
        try:
            pa.array([value], type=field.type)
        except _ARROW_ERRORS as e:
            return SchemaError(f"table {ts.name!r} column {field.name!r}: row {i} value {value!r:.200} "
                               f"does not fit {field.type}: {e}")
    return None


def _columns_from_arrow(ts: TableSchema, data: pa.Table, fill: dict[str, Any]) -> list[pa.Array]:
    for col in data.column_names:
        _check_known(ts, col, "input table")
    columns = []
    for field in ts.schema:
        if field.name in data.column_names:
            try:
                column = data[field.name].cast(field.type).combine_chunks()
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise SchemaError(f"table {ts.name!r} column {field.name!r}: "
                                  f"{data.schema.field(field.name).type} does not fit {field.type}: {e}") from e
            if field.name in fill:
                mismatched = set(column.to_pylist()) - {fill[field.name]}
                if mismatched:
                    raise SchemaError(f"table {ts.name!r} column {field.name!r}: holds {sorted(map(str, mismatched))} "
                                      f"but every row here must have {fill[field.name]!r}")
        else:
            column = pa.array([fill.get(field.name)] * data.num_rows, type=field.type)
        columns.append(column)
    return columns


def _encoder(field: pa.Field):
    """A function turning one Python value into what pa.array expects for `field`: JSON text for
    JSON columns (also inside structs and lists) and dataclasses (e.g. judges.Verdict) as dicts."""
    if field.metadata == _JSON:
        return _to_json_text
    t = field.type
    if pa.types.is_struct(t) and _has_json(t):
        children = {t.field(i).name: _encoder(t.field(i)) for i in range(t.num_fields)}

        def encode_struct(value):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = dataclasses.asdict(value)
            if not isinstance(value, Mapping):
                return value
            return {k: children[k](v) if k in children else v for k, v in value.items()}
        return encode_struct
    if pa.types.is_list(t) and _has_json(t):
        item = _encoder(t.value_field)
        return lambda value: [item(v) for v in value] if isinstance(value, (list, tuple)) else value
    return lambda value: value


def _has_json(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(f.metadata == _JSON or _has_json(f.type) for f in t)
    if pa.types.is_list(t):
        return t.value_field.metadata == _JSON or _has_json(t.value_type)
    return False


def _to_json_text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"text {value!r:.200} is not valid JSON ({e}); pass a dict or JSON text") from None
        return value
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays, which method code produces all the time.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} value {value!r:.200} is not JSON serialisable")
