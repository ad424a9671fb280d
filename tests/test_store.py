"""The Parquet result store (core.store), its schemas (core.schemas) and SQL views (core.query)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from core import store as store_module
from core.judges import Verdict
from core.query import connect, run_query
from core.schemas import RESULT_TABLES, TABLES, SchemaError, TableSchema, build_table
from core.store import ResultStore, StoreError, model_slug
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

RUN = "run-1"
MODEL = "Org/Model-A"
SLUG = "Org--Model-A"

# One realistic row set per result table , nested columns and nulls included.
SAMPLE_ROWS: dict[str, list[dict]] = {
    "rosais_scores": [
        dict(prompt_id="jbb-0", dataset="jbb", layer=3, score=1.25, baseline_logprob=-4.5,
             best_mask_experts=[1, 5], s1=16, seed=42, scope="prompt", params={"s1": 16, "allowed": "k"}),
        dict(prompt_id="jbb-0", dataset="jbb", layer=4, score=-0.5, baseline_logprob=-4.5,
             best_mask_experts=[0, 2], s1=16, seed=42, scope="prompt", params={"s1": 16, "allowed": "k"}),
    ],
    "rosais_attack": [
        dict(prompt_id="jbb-0", dataset="jbb", L=2, layers_masked=[3, 7], jailbroken=True, score=None,
             judge="refusal", scope="prompt", params={"l_max": 8}),
        dict(prompt_id="jbb-1", dataset="jbb", L=0, layers_masked=[], jailbroken=None, score=None,
             judge="strongreject", scope="prompt", params={"l_max": 8}),
    ],
    "safex_counts": [
        dict(prompt_id="adv-1", dataset="advbench", group="regular", phase="decode", tokens=12, n_layers=2,
             n_experts=4, moe_layers=[1, 2], counts=[3, 0, 9, 0, 0, 6, 6, 0], params={"max_new_tokens": 128}),
    ],
    "safex_experts": [
        dict(expert_set="E_top_regular", phase="decode", layer=1, expert=2, frequency=0.97, params={"S": 100}),
        dict(expert_set="HRCG", phase="decode", layer=1, expert=2, frequency=None, params={"S": 100}),
    ],
    "safex_rounds": [
        dict(group="regular", phase="decode", first_round=50, rounds=50, layer=1, expert=2, selected_rounds=49,
             params={"S": 100}),
    ],
    "safex_validation": [
        dict(prompt_id="adv-1", dataset="advbench", group="jailbreak", condition="after", refused=False,
             judge="refusal", n_disabled=5, scope="all", params={"experts": 5}),
    ],
    "fsour_routes": [
        dict(prompt_id="adv-1", dataset="advbench", restart=-1, route=[], joint_logprob=None, forwards=1,
             candidates=0, seconds=0.2, jailbroken=False, score=0.0, judge="refusal",
             scope="prompt", params={"n": 100, "restarts": 5}),
        dict(prompt_id="adv-1", dataset="advbench", restart=0,
             route=[{"layer": 0, "token": 3, "experts": [1, 2]}, {"layer": 1, "token": 3, "experts": [0, 7]}],
             joint_logprob=-0.2, forwards=101, candidates=100, seconds=2.5, search_seconds=2.25, jailbroken=True,
             score=1.0, judge="refusal", scope="prompt", params={"n": 100, "restarts": 5}),
    ],
    "fsour_searches": [
        dict(prompt_id="adv-1", dataset="advbench", restart=0,
             route=[{"layer": 0, "token": 3, "experts": [1, 2]}, {"layer": 1, "token": 3, "experts": [0, 7]}],
             joint_logprob=-0.2, forwards=101, candidates=100, seconds=2.25, prompt_tokens=12, natural_pool=None,
             scope="prompt", params={"n": 100, "restarts": 5}),
        dict(prompt_id="adv-1", dataset="advbench", restart=1, route=[], joint_logprob=-0.1, forwards=1,
             candidates=0, seconds=0.01, prompt_tokens=12, natural_pool=4, scope="prompt", params={"fpr": 0.01}),
    ],
    "fsour_transfer": [
        dict(src=None, dst="adv-2", dataset="advbench", alignment=None, control="none", same_category=None, slots=0,
             jailbroken=False, score=0.0, judge="refusal", target_logprob=-9.5, target_logprob_gain=0.0,
             scope="prompt", params={"candidates": 100}),
        dict(src="adv-1", dst="adv-2", dataset="advbench", alignment="end", control="random_0", same_category=True,
             slots=2, jailbroken=None, score=None, judge="refusal", target_logprob=-7.25, target_logprob_gain=2.25,
             scope="prompt", params={"candidates": 100}),
    ],
    "route_monitor": [
        dict(prompt_id="b-1", dataset="benign", group="benign", restart=None, route=[], off_natural=0, decisions=960,
             monitor_score=0.0, joint_logprob=None, jailbroken=None, score=None, judge="", scope="prompt",
             params={"fpr": 0.01}),
        dict(prompt_id="adv-1", dataset="advbench", group="adaptive", restart=1,
             route=[{"layer": 0, "token": 3, "experts": [1, 2]}], off_natural=1, decisions=800, monitor_score=0.00125,
             joint_logprob=-0.1, jailbroken=True, score=1.0, judge="refusal", scope="prompt", params={"fpr": 0.01}),
    ],
    "universal_routes": [
        dict(dataset="harmful", route=[{"layer": 0, "token": -1, "experts": [1, 7]}], slots_forced=1,
             trailing_tokens=2, train_prompt_ids=["h-3", "h-1"], heldout_prompt_ids=["h-2"], prompts_used=["h-3"],
             prompt_logprobs=[-0.5], objective=-0.5, step_objective=[-2.0, -0.5], step_active=[1, 1], forwards=12,
             candidates=200, seconds=1.5, scope="prompt", params={"train_prompts": 2}),
    ],
    "steer_counts": [
        dict(prompt_id="adv-1", dataset="advbench", behaviour="refusal", tokens=11, n_layers=2, n_experts=4,
             counts=[11, 0, 11, 0, 0, 11, 11, 0], params={"top_n": 10}),
    ],
    "steer_experts": [
        dict(dataset="pairs", layer=1, expert=6, p1=0.3, p2=0.1, delta=0.2, rank=0, params={"epsilon": 0.01}),
        dict(dataset="pairs", layer=0, expert=2, p1=0.1, p2=0.2, delta=-0.1, rank=1, refusal_tokens=110,
             compliance_tokens=240, params={"epsilon": 0.01}),
    ],
    "generations": [
        dict(prompt_id="adv-1", dataset="advbench", method="fsour", condition="restart=0", prompt="How do I…?",
             answer="Sure, here is", answer_sha256=hashlib.sha256(b"Sure, here is").hexdigest(),
             store_answers="full", verdicts=[Verdict("refusal", True, 1.0, "", {"phrases": 26})],
             scope="prompt", params={"max_new_tokens": 512}),
        dict(prompt_id="adv-2", dataset="advbench", method="baseline", condition="baseline", prompt="Tell me",
             answer=None, answer_sha256=hashlib.sha256(b"I cannot").hexdigest(), store_answers="hash",
             verdicts=[{"judge": "rubric", "jailbroken": None, "score": None, "reason": "timeout",
                        "settings": {"model": "judge-7b"}}],
             scope=None, params={"max_new_tokens": 512}),
    ],
    "metrics": [
        dict(dataset="advbench", method="fsour", judge="refusal", params_hash="0123abcd", metric="asr",
             value=0.9, n=50),
        dict(dataset=None, method="fsour", judge="refusal", params_hash="0123abcd", metric="forwards_mean",
             value=1234.5, n=50),
    ],
}


def ok_unit(kind: str = "test", **over) -> dict:
    return {"method": "test", "kind": kind, "status": "ok", "attempts": 1, "seconds": 0.5, "error": None, **over}


def failed_unit(error: str = "CUDA OOM") -> dict:
    return ok_unit(status="failed", error=error)


def rows_in(root: str, table: str) -> list[dict]:
    return json.loads(run_query(f"SELECT * FROM {table}", root, "json"))


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "results")


@pytest.fixture
def store(root) -> ResultStore:
    return ResultStore(root)


class SimulatedCrash(Exception):
    pass


# -- schemas ---------------------------------------------------------------------------------


def test_every_table_has_an_explicit_versioned_schema():
    assert set(SAMPLE_ROWS) == set(RESULT_TABLES), "each result table needs sample rows here"
    for name, ts in TABLES.items():
        assert ts.name == name and isinstance(ts.version, int) and ts.schema.names[-1] == "schema_version"
        if name in RESULT_TABLES:
            assert ts.schema.names[:3] == ["run_id", "model", "unit_id"]
    assert TABLES["metrics"].schema.names == [
        "run_id", "model", "unit_id", "dataset", "method", "judge", "params_hash", "metric", "value", "n",
        "model_path", "revision", "schema_version"]
    assert TABLES["metrics"].schema.field("value").type == pa.float64()
    assert TABLES["metrics"].schema.field("n").type == pa.int64()
    for name in RESULT_TABLES:
        if name != "metrics":
            assert "params" in TABLES[name].schema.names, name
    assert TABLES["fsour_routes"].schema.field("route").type == pa.list_(pa.struct([
        pa.field("layer", pa.int32(), nullable=False), pa.field("token", pa.int32(), nullable=False),
        pa.field("experts", pa.list_(pa.int32()), nullable=False)]))


def test_build_table_errors_name_table_column_and_row():
    key = dict(run_id=RUN, model=SLUG, unit_id="u")
    good = SAMPLE_ROWS["steer_experts"][0]
    with pytest.raises(SchemaError, match=r"unknown table 'nope'.*known tables: runs, units"):
        build_table("nope", [])
    with pytest.raises(SchemaError, match=r"table 'steer_experts' has no column 'bogus' \(row 1\)"):
        build_table("steer_experts", [good, {**good, "bogus": 1}], **key)
    with pytest.raises(SchemaError, match=r"table 'steer_experts' column 'layer': row 1 value 'x' does not fit int32"):
        build_table("steer_experts", [good, {**good, "layer": "x"}], **key)
    with pytest.raises(SchemaError, match=r"table 'steer_experts' column 'p1' is required .* \(first: row 0\)"):
        build_table("steer_experts", [{k: v for k, v in good.items() if k != "p1"}], **key)
    with pytest.raises(SchemaError, match=r"table 'steer_experts' column 'params': row 0: text '\{oops' is not valid JSON"):
        build_table("steer_experts", [{**good, "params": "{oops"}], **key)
    with pytest.raises(SchemaError, match=r"table 'steer_experts' column 'run_id': row 0 has 'other'"):
        build_table("steer_experts", [{**good, "run_id": "other"}], **key)
    arrow = pa.table({"dataset": ["d"], "method": ["m"], "metric": ["asr"], "value": ["high"], "n": [3]})
    with pytest.raises(SchemaError, match=r"table 'metrics' column 'value': string does not fit double"):
        build_table("metrics", arrow, **key)


def test_build_table_accepts_arrow_tables_and_fills_shared_columns():
    arrow = pa.table({"dataset": ["d"], "method": ["m"], "judge": ["refusal"], "params_hash": ["0123abcd"],
                      "metric": ["asr"], "value": [1], "n": [3]})
    table = build_table("metrics", arrow, run_id=RUN, model=SLUG, unit_id="u")
    assert table.schema == TABLES["metrics"].schema
    assert table.to_pylist() == [dict(run_id=RUN, model=SLUG, unit_id="u", dataset="d", method="m", judge="refusal",
                                      params_hash="0123abcd", metric="asr", value=1.0, n=3, model_path=None,
                                      revision=None, schema_version=TABLES["metrics"].version)]


def test_model_slug_is_path_safe_and_stable():
    assert model_slug("Qwen/Qwen3-30B-A3B") == "Qwen--Qwen3-30B-A3B"
    assert model_slug("Qwen--Qwen3-30B-A3B") == "Qwen--Qwen3-30B-A3B"
    assert model_slug("/models/my model:v2/") == "models--my-model-v2"
    assert model_slug("./ckpt") == "ckpt"
    with pytest.raises(StoreError):
        model_slug("/")


# -- local store -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESULT_TABLES)
def test_local_round_trip_per_table(store, root, name):
    rows = SAMPLE_ROWS[name]
    store.write_unit(RUN, MODEL, "u1", {name: rows}, ok_unit(name))

    expected = build_table(name, rows, run_id=RUN, model=SLUG, unit_id="u1")
    assert store.read_table(name).to_pylist() == expected.to_pylist()
    assert store.read_table(name, run_id=RUN, model=MODEL).num_rows == len(rows)
    assert store.read_table(name, run_id="run-2").num_rows == 0
    assert os.path.isfile(os.path.join(root, name, f"model={SLUG}", f"run={RUN}", "u1.parquet"))
    # The same rows through DuckDB, nested columns included.
    assert sorted(rows_in(root, name), key=json.dumps) == sorted(expected.to_pylist(), key=json.dumps)


def test_runs_row_is_written_then_rewritten_when_the_run_ends(store, root):
    manifest = "models: [Org/Model-A]\nmethods: [rosais]\n"
    store.write_run(RUN, manifest, versions={"moesafe": "0.1.0", "torch": "2.13.0"})
    (row,) = store.read_table("runs").to_pylist()
    assert row["status"] == "running" and row["ended_at"] is None and row["manifest"] == manifest
    assert row["manifest_hash"] == hashlib.sha256(manifest.encode()).hexdigest()
    assert json.loads(row["versions"]) == {"moesafe": "0.1.0", "torch": "2.13.0"}
    assert str(row["started_at"].tzinfo) == "UTC"

    store.finish_run(RUN, status="finished")
    (row,) = rows_in(root, "runs")
    assert row["status"] == "finished" and row["ended_at"] > row["started_at"]
    assert files_under(root) == [f"runs/run={RUN}/{RUN}.parquet"]
    with pytest.raises(StoreError, match="run 'run-9' has no row .* call write_run first"):
        store.finish_run("run-9")


def test_default_versions_name_the_runtime_packages(store):
    store.write_run(RUN, "a: 1\n")
    versions = json.loads(store.read_table("runs")["versions"][0].as_py())
    assert set(versions) == {"moesafe", "torch", "transformers", "ray"}


def test_manifest_holding_a_secret_value_is_refused(store, root, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-not-for-disk-123")
    with pytest.raises(StoreError, match="JUDGE_API_KEY") as error:
        store.write_run(RUN, "judge:\n  api_key: sk-not-for-disk-123\n")
    assert "sk-not-for-disk" not in str(error.value)
    assert files_under(root) == []
    store.write_run(RUN, "judge:\n  api_key_env: JUDGE_API_KEY\n")  # naming the variable is fine


def test_crash_between_table_writes_commits_nothing_and_retry_keeps_one_copy(store, root, monkeypatch):
    tables = {"fsour_routes": SAMPLE_ROWS["fsour_routes"], "generations": SAMPLE_ROWS["generations"]}
    real_put = ResultStore._put
    written = []

    def put_then_crash(self, path, table):
        if written:
            raise SimulatedCrash(path)
        real_put(self, path, table)
        written.append(path)

    monkeypatch.setattr(ResultStore, "_put", put_then_crash)
    with pytest.raises(SimulatedCrash):
        store.write_unit(RUN, MODEL, "u1", tables, ok_unit())
    assert len(written) == 1 and os.path.exists(written[0])  # a file landed ...
    assert not os.path.exists(os.path.join(root, "units"))   # ... but no commit marker
    assert store.done_units(RUN) == set()
    for name in tables:  # ... so no reader sees the unit's rows
        assert store.read_table(name).num_rows == 0
        assert rows_in(root, name) == []

    monkeypatch.setattr(ResultStore, "_put", real_put)
    store.write_unit(RUN, MODEL, "u1", tables, ok_unit(attempts=2))
    assert store.done_units(RUN) == {"u1"}
    for name, rows in tables.items():
        assert len(rows_in(root, name)) == len(rows)
        assert store.read_table(name).num_rows == len(rows)
    assert not [f for f in files_under(root) if not f.endswith(".parquet")], "temp files left behind"


def test_crash_while_rewriting_a_committed_unit_uncommits_it(store, root, monkeypatch):
    store.write_unit(RUN, MODEL, "u1", {"metrics": SAMPLE_ROWS["metrics"]}, ok_unit())
    assert store.done_units(RUN) == {"u1"}

    def crash(*args):
        raise SimulatedCrash()

    monkeypatch.setattr(store_module.os, "replace", crash)  # dies after writing the temp file
    with pytest.raises(SimulatedCrash):
        store.write_unit(RUN, MODEL, "u1", {"metrics": [SAMPLE_ROWS["metrics"][0]]}, ok_unit())
    # Neither the old rows nor half of the new ones: the unit is simply not done.
    assert store.done_units(RUN) == set() and rows_in(root, "metrics") == []
    assert files_under(root) == [f"metrics/model={SLUG}/run={RUN}/u1.parquet"]  # old file intact, no temp


def test_done_and_failed_units_drive_resume(store):
    store.write_unit(RUN, MODEL, "a", {"metrics": SAMPLE_ROWS["metrics"]}, ok_unit())
    store.write_unit(RUN, MODEL, "b", {}, failed_unit())
    store.write_unit(RUN, "Org/Model-B", "c", {"steer_experts": SAMPLE_ROWS["steer_experts"]}, ok_unit())
    store.write_unit("run-2", MODEL, "d", {}, ok_unit())
    assert store.done_units(RUN) == {"a", "c"}
    assert store.done_units(RUN, model=MODEL) == {"a"}
    assert store.failed_units(RUN) == {"b"}
    assert store.done_units("run-2") == {"d"} and store.done_units("run-3") == set()

    store.write_unit(RUN, MODEL, "b", {"metrics": SAMPLE_ROWS["metrics"]}, ok_unit(attempts=2))  # the retry
    assert store.done_units(RUN) == {"a", "b", "c"} and store.failed_units(RUN) == set()
    units = {u["unit_id"]: u for u in rows_in(store.root, "units")}
    assert units["b"]["attempts"] == 2 and len(units) == 4


def test_rewriting_a_unit_replaces_its_rows(store, root):
    first = [dict(SAMPLE_ROWS["metrics"][0], value=0.1)]
    store.write_unit(RUN, MODEL, "u1", {"metrics": first, "steer_experts": SAMPLE_ROWS["steer_experts"]}, ok_unit())
    store.write_unit(RUN, MODEL, "u2", {"metrics": first}, ok_unit())
    store.write_unit(RUN, MODEL, "u1", {"metrics": [dict(first[0], value=0.7)]}, ok_unit())

    got = json.loads(run_query("SELECT unit_id, value FROM metrics ORDER BY unit_id", root, "json"))
    assert got == [{"unit_id": "u1", "value": 0.7}, {"unit_id": "u2", "value": 0.1}]
    assert rows_in(root, "steer_experts") == []  # the rewrite no longer writes that table
    assert store.read_table("metrics").num_rows == 2
    assert json.loads(run_query("SELECT count(*) AS n FROM units", root, "json")) == [{"n": 2}]


def test_schema_evolution_reads_old_and_new_files_together(store, root, monkeypatch):
    v1 = TABLES["metrics"]  # the current version; the test adds the next one
    store.write_unit(RUN, MODEL, "old", {"metrics": [SAMPLE_ROWS["metrics"][0]]}, ok_unit())
    # The next version adds a nullable column, the only kind of change schemas allow.
    v2 = TableSchema("metrics", v1.version + 1,
                     v1.schema.insert(len(v1.schema) - 1, pa.field("stderr", pa.float64())), v1.description)
    monkeypatch.setitem(TABLES, "metrics", v2)
    store.write_unit(RUN, MODEL, "new", {"metrics": [dict(SAMPLE_ROWS["metrics"][0], stderr=0.05)]}, ok_unit())

    sql = "SELECT unit_id, stderr, schema_version FROM metrics ORDER BY unit_id"
    assert json.loads(run_query(sql, root, "json")) == [
        {"unit_id": "new", "stderr": 0.05, "schema_version": v1.version + 1},
        {"unit_id": "old", "stderr": None, "schema_version": v1.version}]
    by_unit = {r["unit_id"]: r for r in store.read_table("metrics").to_pylist()}
    assert by_unit["old"]["stderr"] is None and by_unit["new"]["stderr"] == 0.05
    old_file = os.path.join(root, "metrics", f"model={SLUG}", f"run={RUN}", "old.parquet")
    assert "stderr" not in pq.read_schema(old_file).names

    monkeypatch.setitem(TABLES, "metrics", v1)  # code of the older version reads the newer file too
    assert store.read_table("metrics").num_rows == 2
    assert len(rows_in(root, "metrics")) == 2


# -- queries ---------------------------------------------------------------------------------


def test_query_formats(store, root):
    store.write_unit(RUN, MODEL, "u1", {"metrics": SAMPLE_ROWS["metrics"],
                                        "fsour_routes": SAMPLE_ROWS["fsour_routes"]}, ok_unit())
    sql = "SELECT metric, value, n, dataset FROM metrics ORDER BY metric"

    rows = json.loads(run_query(sql, root, "json"))
    assert rows == [{"metric": "asr", "value": 0.9, "n": 50, "dataset": "advbench"},
                    {"metric": "forwards_mean", "value": 1234.5, "n": 50, "dataset": None}]

    parsed = list(csv.DictReader(io.StringIO(run_query(sql, root, "csv"))))
    assert parsed == [{"metric": "asr", "value": "0.9", "n": "50", "dataset": "advbench"},
                      {"metric": "forwards_mean", "value": "1234.5", "n": "50", "dataset": ""}]

    text = run_query(sql, root, "table").splitlines()
    assert text[0].split() == ["metric", "value", "n", "dataset"]
    assert set(text[1]) <= {"-", " "}
    assert text[2].split() == ["asr", "0.9", "50", "advbench"]
    assert text[3].split() == ["forwards_mean", "1234.5", "50", "NULL"]
    assert text[-1] == "(2 rows)"
    # Columns line up: text left-aligned, numbers right-aligned.
    assert text[0].index("dataset") == text[2].index("advbench") == text[3].index("NULL")
    assert text[0].index("value") + len("value") == text[3].index("1234.5") + len("1234.5")

    nested = run_query("SELECT route FROM fsour_routes WHERE restart = 0", root, "csv").splitlines()
    assert json.loads(next(csv.reader(nested[1:]))[0])[1] == {"layer": 1, "token": 3, "experts": [0, 7]}
    started = json.loads(run_query("SELECT finished_at FROM units", root, "json"))[0]["finished_at"]
    assert started.endswith("+00:00")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        run_query(sql, root, "xml")


def test_views_exist_typed_before_any_file(root):
    con = connect(root)
    for name, ts in TABLES.items():
        assert [c[0] for c in con.sql(f"DESCRIBE {name}").fetchall()] == ts.schema.names
        assert con.sql(f"SELECT count(*) FROM {name}").fetchall() == [(0,)]
    assert run_query("SELECT * FROM metrics", root, "json") == "[]"


def test_partition_keys_do_not_add_or_retype_columns(store, root):
    store.write_run("20250101", "a: 1\n")
    store.write_unit("20250101", "7", "u1", {"metrics": SAMPLE_ROWS["metrics"]}, ok_unit())
    con = connect(root)
    for name in ("runs", "units", "metrics"):
        assert [c[0] for c in con.sql(f"DESCRIBE {name}").fetchall()] == TABLES[name].schema.names
    assert con.sql("SELECT DISTINCT run_id, model FROM metrics").fetchall() == [("20250101", "7")]
    assert con.sql("SELECT count(*) FROM metrics WHERE run_id = '20250101' AND model = '7'").fetchall() == [(2,)]
    assert con.sql("SELECT run_id FROM runs").fetchall() == [("20250101",)]


def test_unknown_table_and_column_errors(store, root):
    with pytest.raises(SchemaError, match=r"write_unit writes the result tables .* not \['units'\]"):
        store.write_unit(RUN, MODEL, "u1", {"units": []}, ok_unit())
    with pytest.raises(SchemaError, match=r"table 'metrics' has no column 'score'"):
        store.write_unit(RUN, MODEL, "u1", {"metrics": [dict(SAMPLE_ROWS["metrics"][0], score=1)]}, ok_unit())
    with pytest.raises(SchemaError, match=r"table 'units' column 'status': 'done' is not one of"):
        store.write_unit(RUN, MODEL, "u1", {}, ok_unit(status="done"))
    with pytest.raises(SchemaError, match=r"table 'units' column 'attempts': row 0 value 'two'"):
        store.write_unit(RUN, MODEL, "u1", {}, ok_unit(attempts="two"))
    with pytest.raises(SchemaError, match="a failed unit writes none"):
        store.write_unit(RUN, MODEL, "u1", {"metrics": SAMPLE_ROWS["metrics"]}, failed_unit())
    with pytest.raises(StoreError, match=r"unit_id '\.\./x' cannot name a file"):
        store.write_unit(RUN, MODEL, "../x", {}, ok_unit())
    with pytest.raises(SchemaError, match="unknown table 'metric'"):
        store.read_table("metric")
    assert files_under(root) == []  # every bad call was refused before writing anything
    with pytest.raises(Exception, match="metric"):
        run_query("SELECT * FROM metric", root)


def test_unwritable_root_fails_at_construction_naming_it(tmp_path):
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    root = str(not_a_dir / "results")  # unwritable even for root
    with pytest.raises(StoreError, match=rf"result root '{root}' is not writable .* Fix: point the results root"):
        ResultStore(root)
    ResultStore(root, read_only=True)  # reading needs no probe
    with pytest.raises(StoreError, match="opened read_only"):
        ResultStore(root, read_only=True).write_run(RUN, "a: 1\n")
    with pytest.raises(StoreError, match="only local directories and s3://"):
        ResultStore("gs://bucket/results")


# -- S3 --------------------------------------------------------------------------------------

def test_s3_round_trip_and_query(s3_bucket):
    root = f"s3://{s3_bucket}/nightly/results"
    store = ResultStore(root)
    store.write_run(RUN, "models: [Org/Model-A]\n")
    store.write_unit(RUN, MODEL, "u1", {"fsour_routes": SAMPLE_ROWS["fsour_routes"],
                                        "metrics": SAMPLE_ROWS["metrics"]}, ok_unit())
    store.write_unit(RUN, MODEL, "u1", {"fsour_routes": SAMPLE_ROWS["fsour_routes"],
                                        "metrics": SAMPLE_ROWS["metrics"]}, ok_unit(attempts=2))
    store.write_unit(RUN, MODEL, "u2", {}, failed_unit())
    store.finish_run(RUN)

    assert store.done_units(RUN) == {"u1"} and store.failed_units(RUN) == {"u2"}
    expected = build_table("fsour_routes", SAMPLE_ROWS["fsour_routes"], run_id=RUN, model=SLUG, unit_id="u1")
    assert store.read_table("fsour_routes", run_id=RUN).to_pylist() == expected.to_pylist()
    assert sorted(rows_in(root, "fsour_routes"), key=json.dumps) == sorted(expected.to_pylist(), key=json.dumps)
    got = json.loads(run_query("SELECT r.status, count(*) AS n FROM runs r JOIN metrics m USING (run_id) "
                               "GROUP BY r.status", root, "json"))
    assert got == [{"status": "finished", "n": 2}]

    fs = s3fs.S3FileSystem()
    keys = fs.find(f"{s3_bucket}/nightly/results")
    assert f"{s3_bucket}/nightly/results/fsour_routes/model={SLUG}/run={RUN}/u1.parquet" in keys
    for key in keys:  # credentials never reach the store
        data = fs.cat_file(key)
        assert S3_ACCESS_KEY.encode() not in data and S3_SECRET_KEY.encode() not in data


def test_s3_root_without_bucket_fails_at_construction(s3_bucket):
    with pytest.raises(StoreError, match=r"result root 's3://no-such-bucket-x/r' is not writable .* bucket exists"):
        ResultStore("s3://no-such-bucket-x/r")
