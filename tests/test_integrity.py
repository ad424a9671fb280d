"""Result integrity under concurrency and hostile input (issue 9): one driver per run id, read-only
queries, refused hostile manifests and datasets, honest summaries."""
from __future__ import annotations

import os
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from core.store import LeaseLostError, ResultStore, RunHeldError

# -- one driver per run id ---------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "results")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/results"


def test_a_run_id_is_held_by_one_driver_at_a_time(root):
    first = ResultStore(root).acquire_run("nightly")
    with pytest.raises(RunHeldError) as refused:
        ResultStore(root).acquire_run("nightly")
    message = str(refused.value)
    assert "run id 'nightly'" in message and f"{socket.gethostname()} pid {os.getpid()}" in message
    assert "lease expires at 20" in message and "use another --run-id" in message
    # Another run id is free; the first one is free again once released.
    ResultStore(root).acquire_run("other").release()
    first.release()
    ResultStore(root).acquire_run("nightly").release()


def test_a_dead_drivers_lease_is_taken_over_after_it_expires(root):
    dead = ResultStore(root).acquire_run("nightly", ttl_s=3)  # its driver "dies": never renews
    with pytest.raises(RunHeldError):
        ResultStore(root).acquire_run("nightly")
    time.sleep((dead.expires_at - datetime.now(timezone.utc)).total_seconds() + 0.1)
    successor = ResultStore(root).acquire_run("nightly")
    # The old holder, waking up, learns it lost the run and cannot take it back by renewing.
    with pytest.raises(LeaseLostError, match=f"now held by {socket.gethostname()} pid {os.getpid()}"):
        dead.renew()
    dead.release()  # releasing a lease taken over leaves the successor's in place
    with pytest.raises(RunHeldError):
        ResultStore(root).acquire_run("nightly")
    successor.renew()
    successor.release()


def test_the_holder_renews_its_lease_while_it_runs(root):
    lease = ResultStore(root).acquire_run("nightly", ttl_s=3)
    first_expiry = lease.expires_at
    with lease.kept_alive():
        time.sleep(4)  # past the first expiry: only the renewals (every second) keep it held
        assert lease.expires_at > first_expiry
        with pytest.raises(RunHeldError):
            ResultStore(root).acquire_run("nightly")
    assert lease.lost is None
    ResultStore(root).acquire_run("nightly").release()  # released at the end of the block


def test_a_second_run_of_a_held_run_id_is_refused_before_ray_and_writes_nothing(tmp_path, capsys):
    import ray

    from jobs.cli import EXIT_BAD_INPUT, main
    from tests.test_bad_input import SHORT, files_with_bytes

    root = tmp_path / "results"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(SHORT.format(top_n=4))
    held = ResultStore(str(root)).acquire_run("nightly")
    before = files_with_bytes(root)
    assert main(["run", str(manifest), "--out", str(root), "--run-id", "nightly"]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moesafe run: error: run id 'nightly' in ")
    assert f"being run by another driver: {socket.gethostname()} pid {os.getpid()}" in err
    assert "its lease expires at" in err and err.count("\n") == 1
    assert files_with_bytes(root) == before and not ray.is_initialized()
    held.release()


def test_a_resumed_run_keeps_its_first_start_records_each_attempt_and_says_what_was_skipped(
        local_ray, tmp_path, capsys):
    import yaml

    from jobs.cli import main
    from tests.test_bad_input import SHORT

    root, manifest = tmp_path / "results", tmp_path / "m.yaml"
    manifest.write_text(SHORT.format(top_n=4))
    assert main(["run", str(manifest), "--out", str(root), "--run-id", "again"]) == 0
    first = capsys.readouterr().out
    assert "run again: complete, 5 units ok, 0 skipped (done earlier), 0 failed, of 5" in first
    (row,) = ResultStore(str(root), read_only=True).read_table("runs", run_id="again").to_pylist()

    assert main(["run", str(manifest), "--out", str(root), "--run-id", "again"]) == 0
    again = capsys.readouterr().out
    assert "run again: already complete: all 5 units were done earlier, nothing ran" in again
    (rerun,) = ResultStore(str(root), read_only=True).read_table("runs", run_id="again").to_pylist()
    assert yaml.safe_load(rerun["manifest"])["run_id"] == "again"  # not the file's own m-<hash>
    assert rerun["started_at"] == row["started_at"] and rerun["status"] == "finished"
    attempts = rerun["attempts"]
    assert len(attempts) == 2 and attempts[0] == row["attempts"][0]
    assert attempts[0]["started_at"] == row["started_at"] < attempts[0]["ended_at"] <= attempts[1]["started_at"]
    assert attempts[1]["ended_at"] == rerun["ended_at"] and {a["status"] for a in attempts} == {"finished"}
    assert {a["pid"] for a in attempts} == {os.getpid()}


@pytest.fixture
def local_ray(sandbox_dir):
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# -- moesafe query is read-only over the result root ----------------------------------------------

WRITES = {
    "copy over a stored file": "COPY (SELECT 0.0 AS value) TO '{metrics_file}' (FORMAT parquet)",
    "copy outside the root": "COPY (SELECT * FROM metrics) TO '{outside}/stolen.csv'",
    "create table": "CREATE TABLE t AS SELECT * FROM metrics",
    "create view": "CREATE OR REPLACE VIEW metrics AS SELECT 1 AS asr",
    "attach": "ATTACH '{outside}/other.duckdb' AS other",
    "insert": "INSERT INTO metrics VALUES (1)",
    "install an extension": "INSTALL httpfs",
    "load an extension": "LOAD httpfs",
    "undo the lock": "SET enable_external_access = true",
    "a write after a read": "SELECT 1; COPY (SELECT 1) TO '{outside}/second.csv'",
    "explain analyze of a write": "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/explained.csv'",
}
OUTSIDE_READS = {
    "read_text of /etc/passwd": "SELECT * FROM read_text('/etc/passwd')",
    "read_csv of /etc/passwd": "SELECT * FROM read_csv('/etc/passwd', sep = ':')",
    "a sibling directory": "SELECT * FROM read_text('{outside}/secret.txt')",
    "a path climbing out of the root": "SELECT * FROM read_text('{root}/../outside/secret.txt')",
    "a prefix of the root's name": "SELECT * FROM read_text('{root}-sibling/secret.txt')",
}


@pytest.fixture
def query_root(tmp_path) -> dict[str, str]:
    from tests.test_cli import RUN

    root = tmp_path / "results"
    store = ResultStore(str(root))
    store.write_run(RUN, "models: []\n")  # `moesafe query` refuses a root that no run wrote
    store.write_unit(RUN, "sandbox", "fsour-0000", {"metrics": [
        dict(dataset="d", method="fsour", judge="refusal", params_hash="0" * 16, metric="asr", value=1.0, n=8)]},
        {"method": "fsour", "kind": "fsour_metrics", "status": "ok", "attempts": 1, "seconds": 1.0, "error": None})
    for outside in (tmp_path / "outside", tmp_path / "results-sibling"):
        outside.mkdir()
        (outside / "secret.txt").write_text("secret\n")
    metrics_file = next(root.glob("metrics/**/*.parquet"))
    return {"root": str(root), "outside": str(tmp_path / "outside"), "metrics_file": str(metrics_file)}


def tree(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sql", list(WRITES.values()), ids=list(WRITES))
def test_query_refuses_every_statement_that_is_not_a_read(query_root, capsys, sql):
    from jobs.cli import EXIT_BAD_INPUT, main

    base = Path(query_root["root"]).parent
    before = tree(base)
    assert main(["query", sql.format(**query_root), "--out", query_root["root"]]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("moesafe query: error: ")
    assert tree(base) == before, "nothing written, nothing changed"
    assert main(["query", "select value from metrics", "--out", query_root["root"], "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == '[{"value": 1.0}]'


def test_query_refusal_names_the_statement_kind(query_root, capsys):
    from jobs.cli import EXIT_BAD_INPUT, main

    assert main(["query", WRITES["copy over a stored file"].format(**query_root), "--out",
                 query_root["root"]]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("moesafe query: error: queries are read-only: COPY statements are "
                                              "refused")


@pytest.mark.parametrize("sql", list(OUTSIDE_READS.values()), ids=list(OUTSIDE_READS))
def test_query_reads_nothing_outside_the_root(query_root, capsys, sql):
    from jobs.cli import EXIT_BAD_INPUT, main

    code = main(["query", sql.format(**query_root), "--out", query_root["root"]])
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT and "secret" not in out and "root:" not in out
    assert "Permission Error" in err and "queries read only the tables under --out" in err


def test_query_still_reads_files_inside_the_root(query_root, capsys):
    from jobs.cli import main

    sql = f"select value from read_parquet('{query_root['root']}/metrics/**/*.parquet')"
    assert main(["query", sql, "--out", query_root["root"], "--format", "csv"]) == 0
    assert capsys.readouterr().out == "value\n1.0\n"


def test_query_over_s3_is_confined_to_its_prefix(s3_bucket):
    import duckdb
    import s3fs

    from core.query import ReadOnlyError, run_query

    root = f"s3://{s3_bucket}/results"
    ResultStore(root).write_unit("r1", "sandbox", "u1", {"metrics": [
        dict(dataset="d", method="fsour", judge="refusal", params_hash="0" * 16, metric="asr", value=0.5, n=2)]},
        {"method": "fsour", "kind": "fsour_metrics", "status": "ok", "attempts": 1, "seconds": 1.0, "error": None})
    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/private/secret.csv", b"a\n1\n")
    assert run_query("select value from metrics", root, "csv") == "value\n0.5\n"
    with pytest.raises(duckdb.PermissionException):
        run_query(f"select * from read_csv('s3://{s3_bucket}/private/secret.csv')", root)
    with pytest.raises(ReadOnlyError):
        run_query(f"copy (select 1) to '{root}/metrics/x.csv'", root)
    assert not s3fs.S3FileSystem().exists(f"{s3_bucket}/results/metrics/x.csv")


# -- hostile and careless input ------------------------------------------------------------------

def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\nmodels: *a{levels}\ndatasets: {{}}\nmethods: []\n"


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    from jobs.cli import EXIT_BAD_INPUT, main
    from jobs.manifest import ManifestError, load_manifest

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 700  # 9^10 values once expanded
    assert main(["validate", str(bomb)]) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()[1:]
    assert line.startswith("  invalid YAML at line ") and "aliases (*name) expand to more than 100,000 values" in line
    with pytest.raises(ManifestError, match="recursive structure"):
        load_manifest("a: &a [1, *a]\nmodels: *a\n")
    # Aliases as people write them still load.
    from tests.test_manifest import GOOD

    manifest = load_manifest(GOOD.replace("limit: 4}\n  jb:", "limit: 4, columns: &cols {prompt: prompt}}\n  jb:")
                             .replace("split: jailbreak, limit: 4}", "split: jailbreak, limit: 4, columns: *cols}"))
    assert manifest.datasets["jb"].columns == manifest.datasets["harmful"].columns == {"prompt": "prompt"}


def test_a_huge_bad_value_is_quoted_short():
    import yaml

    from jobs.manifest import ManifestError, load_manifest
    from tests.test_manifest import GOOD

    data = yaml.safe_load(GOOD)
    data["models"][0]["replicas"] = "x" * 1_000_000
    data["chunking"] = {"prompts_per_unit": list(range(50_000))}
    with pytest.raises(ManifestError) as refused:  # written by libyaml: the pure-Python dumper takes seconds
        load_manifest(yaml.dump(data, Dumper=yaml.CSafeDumper))
    assert refused.value.problems and all(len(line) < 300 for line in refused.value.problems)
    assert any(line.startswith("models[0].replicas: 'xxxx") for line in refused.value.problems)


def write_manifest(tmp_path, dataset: str, model: str = "{name: sandbox, path: sandbox, dtype: float32}") -> Path:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"models:\n  - {model}\ndatasets:\n  d: {{source: {dataset}}}\n"
                        f"methods:\n  - {{method: rosais, dataset: d}}\n")
    return manifest


@pytest.mark.parametrize("content, expected", [
    (b"id,prompt\na,hello\nb,caf\xe9 au lait\n",
     r"d\.csv line 3: not UTF-8 text \(byte 0xe9 at offset 23\); save the file as UTF-8"),
    (b"id,prompt\na,\"" + b"x" * 1_000_000 + b"\"\n",
     r"d\.csv line 2 \(data row 0, 0-based\): a field longer than 131,072 characters"),
], ids=["non-utf-8", "1 MB field"])
def test_unreadable_csv_is_named_with_its_line_and_exits_2(tmp_path, capsys, content, expected):
    from jobs.cli import EXIT_BAD_INPUT, main

    (tmp_path / "d.csv").write_bytes(content)
    code = main(["validate", str(write_manifest(tmp_path, str(tmp_path / "d.csv"))), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "Traceback" not in err
    assert re.search(r"^  datasets\.d: .*" + expected, err, re.MULTILINE), err


def test_a_prompt_longer_than_the_models_context_is_refused_at_validation(sandbox_dir, tmp_path, capsys):
    from jobs.cli import EXIT_BAD_INPUT, main

    prompts = tmp_path / "long.csv"
    prompts.write_text("prompt\nhow do I bake bread?\n" + "please " * 1000 + "\n")
    code = main(["validate", str(write_manifest(tmp_path, str(prompts))), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert re.search(r"^  datasets\.d: 1 prompt\(s\) longer than model 'sandbox' can read: 'long-0001' is 1,0\d\d "
                     r"tokens in its chat template, the model has 256 positions", err, re.MULTILINE), err


def test_an_overlong_run_id_is_refused_before_ray_and_writes_nothing(tmp_path, capsys):
    import ray

    from jobs.cli import EXIT_BAD_INPUT, main

    manifest = write_manifest(tmp_path, "sandbox")
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--run-id", "r" * 300]) == EXIT_BAD_INPUT
    assert "is too long (300 characters)" in capsys.readouterr().err
    manifest.write_text(manifest.read_text() + "run_id: " + "r" * 300 + "\n")
    assert main(["run", str(manifest), "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "  run_id: 'rrrr" in err and "is too long (300 characters)" in err
    assert not out.exists() and not ray.is_initialized()


TOKEN_CLUSTER = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it; ray.shutdown at exit stops the cluster's processes
"""


def test_a_cluster_that_needs_a_token_says_so_and_run_finds_it_where_ray_keeps_it(tmp_path):
    import secrets
    import subprocess
    import sys

    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    (tmp_path / "head-home").mkdir()
    (tmp_path / "client-home").mkdir()
    head = subprocess.Popen([sys.executable, "-c", TOKEN_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**env, "HOME": str(tmp_path / "head-home"), "RAY_AUTH_MODE": "token",
                                 "RAY_AUTH_TOKEN": token})
    try:
        address = head.stdout.readline().strip()
        assert address.rpartition(":")[2].isdigit(), "the cluster did not start"
        client = {**env, "HOME": str(tmp_path / "client-home")}
        out = tmp_path / "out"
        moesafe = Path(sys.executable).parent / "moesafe"  # the installed console script
        # A model that asks for a GPU this cluster lacks, and no wait: once connected, the run can only
        # say what the cluster has (nothing computes, the test stays short).
        manifest = write_manifest(tmp_path, "sandbox", model="{name: sandbox, path: sandbox, dtype: float32, num_gpus: 1}")
        command = [moesafe, "run", str(manifest), "--address", address, "--out", str(out), "--wait-timeout", "0"]
        run = subprocess.run(command, capture_output=True, text=True, env=client, timeout=120)
        assert run.returncode == 2, run.stderr
        assert run.stderr.splitlines()[-1] == (
            f"moesafe run: error: the Ray cluster at {address} requires its authentication token, and none it "
            f"accepts was found here: put the token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` "
            f"on the head prints it), and leave RAY_AUTH_MODE unset or set it to token")
        assert "unreachable" not in run.stderr and "Failed to get cluster ID" not in run.stderr
        # The token where Ray keeps it, nothing in the environment (as `ray get-auth-token > ~/.ray/auth_token`
        # leaves a user's machine): `moesafe run` sends it, joins the cluster and reads its resources.
        (tmp_path / "client-home" / ".ray").mkdir()
        (tmp_path / "client-home" / ".ray" / "auth_token").write_text(token)
        run = subprocess.run(command, capture_output=True, text=True, env=client, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "waited 0.0 min for 1 x {GPU: 1, CPU: 1} and the cluster has not placed one (its nodes have {CPU: 1} " \
               "in all)" in run.stderr.splitlines()[-1], run.stderr
        assert "authentication" not in run.stderr and "token" not in run.stderr.lower()
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


# -- honest progress -------------------------------------------------------------------------------

def test_progress_shows_stages_and_no_percentage_or_eta_until_the_total_is_final():
    from jobs.progress import RunProgress

    progress = RunProgress("nightly")
    progress.planned("sandbox/fsour", stage=1, units=8)
    progress.planned("sandbox/rosais", stage=1, units=16)
    for _ in range(20):
        progress.done()
    shown = str(progress.bar)
    assert shown.startswith("nightly: 20/24+ units planned so far [")
    assert "sandbox/fsour stage 1, sandbox/rosais stage 1" in shown and "%" not in shown and "<" not in shown
    progress.planned("sandbox/fsour", stage=2, units=3)
    progress.finished("sandbox/rosais")
    shown = str(progress.bar)
    assert "20/27+" in shown and "sandbox/fsour stage 2" in shown and "rosais" not in shown
    progress.finished("sandbox/fsour")
    progress.final()
    assert str(progress.bar).startswith("nightly:  74%|") and "20/27 [" in str(progress.bar)
    progress.close()


def test_a_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path):
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "results")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from core.store import ResultStore; "
                               f"ResultStore({root!r}).acquire_run('nightly'); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunHeldError, match=f"pid {holder.pid},"):
        ResultStore(root).acquire_run("nightly")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    ResultStore(root).acquire_run("nightly").release()  # well before its 60 s expiry


# -- entries that share params read only their own rows ------------------------------------------

TWO_JUDGINGS = """
run_id: judged-twice
models:
  - {name: sandbox, path: sandbox, dtype: float32}
datasets:
  harmful: {source: sandbox, split: regular, limit: 3}
judges:
  sandbox: {type: sandbox}
  refusal: {type: refusal}
methods:
  - {method: fsour, dataset: harmful, judges: [refusal], params: {candidates: 2, restarts: 2, max_new_tokens: 8}}
  - {method: fsour, dataset: harmful, judges: [sandbox], params: {candidates: 2, restarts: 2, max_new_tokens: 8}}
"""


def test_two_entries_differing_only_in_judges_plan_from_their_own_verdicts(tmp_path, sandbox_dir):
    """Two F-SOUR entries of one dataset and params, judged by other judges, write pre-check rows of
    the same prompts and params. Each plan must go on from its own judge's verdicts: before, both
    read every row of the params, so one entry searched by the other's verdicts (whichever was
    read last) and its metrics counted each prompt twice."""
    from core.fsour import _row
    from core.judges import Verdict
    from jobs.manifest import load_manifest
    from jobs.runner import Scheduler

    store = ResultStore(str(tmp_path / "results"))
    scheduler = Scheduler(load_manifest(TWO_JUDGINGS), store, "judged-twice", progress=False)
    refusal_plan, sandbox_plan = scheduler._model(scheduler.manifest.models[0]).plans
    # the refusal judge finds every prompt jailbroken unrouted, the sandbox judge none
    for plan, jailbroken in ((refusal_plan, True), (sandbox_plan, False)):
        [precheck] = next(plan.stages)
        plan.ctx.upstream.append(precheck.unit_id)
        items = plan.ctx.prompts["dataset"]
        rows = [_row(item, -1, Verdict(plan.ctx.judges[0], jailbroken, None), plan.ctx.params, None, 0.0)
                for item in items]
        store.write_unit("judged-twice", "sandbox", precheck.unit_id, {"fsour_routes": rows},
                         {"method": "fsour", "kind": "fsour_precheck", "status": "ok", "attempts": 1,
                          "seconds": 0.0, "error": None})
    assert next(refusal_plan.stages) == []  # nothing left to search
    searches = next(sandbox_plan.stages)
    assert sorted(u.payload["prompts"][0]["id"] for u in searches) == [p.id for p in sandbox_plan.ctx.prompts["dataset"]]
    assert len(refusal_plan.ctx.read("fsour_routes")) == len(sandbox_plan.ctx.read("fsour_routes")) == 3
