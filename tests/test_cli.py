"""The `moesafe` command line, in-process through main([...]) and once as the installed script."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from core.families import FAMILIES
from core.store import ResultStore
from jobs.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED, main

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "manifests" / "quickstart.yaml"
RUN = "nightly-1"


def moesafe(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def store_root(tmp_path) -> str:
    """A store with one run: two ok units with metrics, and one failed unit."""
    root = str(tmp_path / "results")
    store = ResultStore(root)
    store.write_run(RUN, "models: []\n", versions={"moesafe": "0.1.0"})
    unit = {"method": "fsour", "kind": "fsour_search", "status": "ok", "attempts": 1, "seconds": 1.5, "error": None}
    store.write_unit(RUN, "sandbox", "fsour-0000", {"metrics": [
        dict(dataset="sandbox-heldout-regular", method="fsour", judge="refusal", params_hash="0" * 16, metric="asr",
             value=0.75, n=8)]}, unit)
    store.write_unit(RUN, "tiny", "fsour-0000", {"metrics": [
        dict(dataset="sandbox-heldout-regular", method="fsour", judge="refusal", params_hash="0" * 16, metric="asr",
             value=0.5, n=8)]}, unit)
    store.write_unit(RUN, "sandbox", "fsour-0001", {},
                     {**unit, "status": "failed", "attempts": 3, "error": "RuntimeError: CUDA out of memory"})
    return root


def test_models_lists_every_family_with_router_and_rule(capsys):
    code, out, _ = moesafe(capsys, "models")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + len(FAMILIES)
    assert lines[0].split()[:2] == ["family", "(model_type)"]
    by_family = {line.split()[0]: line for line in lines[1:]}
    assert set(by_family) == set(FAMILIES)
    assert "MixtralTopKRouter" in by_family["mixtral"] and "softmax -> top-k -> renormalise" in by_family["mixtral"]
    assert "sigmoid + e_score_correction_bias" in by_family["deepseek_v3"]
    assert "PhimoeTopKRouter" in by_family["phimoe"] and "sparsemixer" in by_family["phimoe"]


def test_methods_lists_the_registry(capsys):
    from core.methods import METHODS

    code, out, _ = moesafe(capsys, "methods")
    lines = out.splitlines()
    assert code == 0 and [line.split(":")[0] for line in lines[::2]] == list(METHODS)
    assert lines[0] == ("fsour: dataset: <name>; every prompt needs a target; writes fsour_routes, fsour_searches, "
                        "generations, metrics")
    assert lines[1].startswith("  params: candidates=100, restarts=5, threshold=0.8, seed=42")
    assert "safex: datasets: regular, jailbreak, benign (optional); writes safex_counts" in out
    assert "route_monitor: datasets: harmful, benign; every harmful prompt needs a target; writes" in out


def test_validate_accepts_the_quickstart(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESAFE_CACHE", str(tmp_path / "cache"))  # validating builds no sandbox
    code, out, err = moesafe(capsys, "validate", str(QUICKSTART), "--out", str(tmp_path / "out"))
    assert (code, err) == (0, "")
    assert out.startswith(f"OK {QUICKSTART}: run quickstart-") and "4 method(s)" in out
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists(), "validating writes nothing, not even the (writable) output root"


def test_validate_reports_every_problem_and_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("dtype: float32", "dtype: fp8\n    modle: x")
                   .replace("dataset: harmful", "dataset: harmfull", 1))
    code, out, err = moesafe(capsys, "validate", str(bad))
    assert (code, out) == (EXIT_BAD_INPUT, "")
    lines = err.splitlines()
    assert lines[0] == "moesafe validate: 1 problem in the manifest:"
    assert lines[1].startswith("  unknown key 'modle' in models[0]; allowed: name, path, dtype")
    # once the schema holds, names are resolved, every problem reported at once
    bad.write_text(QUICKSTART.read_text().replace("dataset: harmful", "dataset: harmfull", 2))
    code, _, err = moesafe(capsys, "validate", str(bad))
    assert code == EXIT_BAD_INPUT
    assert err.splitlines()[1:] == [
        "  methods[0].dataset: 'harmfull' is not a dataset in this manifest; defined: harmful, jailbreak, benign",
        "  methods[1].dataset: 'harmfull' is not a dataset in this manifest; defined: harmful, jailbreak, benign"]


def test_validate_checks_the_output_root(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, _, err = moesafe(capsys, "validate", str(QUICKSTART), "--out", str(tmp_path / "a-file" / "out"))
    assert code == EXIT_BAD_INPUT and "  --out: result root " in err and "is not writable" in err


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_formats(capsys, store_root, fmt):
    sql = "select model, metric, value, n from metrics order by model"
    code, out, err = moesafe(capsys, "query", sql, "--out", store_root, "--format", fmt)
    assert (code, err) == (0, "")
    if fmt == "json":
        assert json.loads(out) == [{"model": "sandbox", "metric": "asr", "value": 0.75, "n": 8},
                                   {"model": "tiny", "metric": "asr", "value": 0.5, "n": 8}]
    elif fmt == "csv":
        assert out.splitlines() == ["model,metric,value,n", "sandbox,asr,0.75,8", "tiny,asr,0.5,8"]
    else:
        lines = out.splitlines()
        assert lines[0].split() == ["model", "metric", "value", "n"]
        assert lines[2].split() == ["sandbox", "asr", "0.75", "8"] and lines[-1] == "(2 rows)"


def test_params_help_names_every_registered_method(capsys):
    from core.methods import METHODS

    with pytest.raises(SystemExit):
        main(["params", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"one of {', '.join(METHODS)} (default: all)" in out


def test_query_help_describes_the_sql_and_lists_every_table(capsys):
    from core.schemas import TABLES

    with pytest.raises(SystemExit):
        main(["query", "--help"])
    out = capsys.readouterr().out
    assert "one DuckDB SQL statement over the tables below" in out
    listed = [line.split()[0] for line in out.split("tables (each a view of its own name")[1].splitlines()[1:]]
    assert listed == list(TABLES)


def test_query_table_says_how_to_see_cut_cells_whole(capsys, store_root):
    long = "x" * 80
    code, out, err = moesafe(capsys, "query", f"select '{long}' as route", "--out", store_root)
    assert code == 0 and long not in out and "…" in out
    assert err == "note: cells ending in '…' are cut; --format json or --format csv prints them whole\n"
    code, out, err = moesafe(capsys, "query", f"select '{long}' as route", "--out", store_root, "--format", "json")
    assert (code, err, json.loads(out)) == (0, "", [{"route": long}])


def test_query_with_bad_sql_is_one_line_and_exits_2(capsys, store_root):
    code, out, err = moesafe(capsys, "query", "select nope from metrics", "--out", store_root)
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert err.startswith("moesafe query: error: BinderException: ") and "nope" in err and err.count("\n") == 1


def test_status_shows_runs_units_and_failures(capsys, store_root):
    code, out, err = moesafe(capsys, "status", "--out", store_root)
    assert (code, err) == (0, "")
    header, _, row, *rest = out.splitlines()
    assert header.split() == ["run_id", "status", "attempts", "started_at", "ended_at", "units_ok", "units_failed"]
    assert row.split()[:3] == [RUN, "running", "1"] and row.split()[-2:] == ["2", "1"]
    assert "failed units (1):" in rest
    assert (f"  {RUN} sandbox fsour-0001 (fsour, 3 attempts): RuntimeError: CUDA out of memory") in rest


def test_status_of_one_run_and_of_nothing(capsys, store_root, tmp_path):
    code, out, _ = moesafe(capsys, "status", "--out", store_root, "--run-id", RUN)
    assert code == 0 and out.splitlines()[2].split()[0] == RUN and "(1 row)" in out
    code, out, err = moesafe(capsys, "status", "--out", store_root, "--run-id", "other-run")
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert err.startswith(f"moesafe status: error: no run 'other-run' under {store_root}; its runs: {RUN}. Fix: ")
    code, _, err = moesafe(capsys, "status", "--out", store_root, "--run-id", "x'; drop")
    assert code == EXIT_BAD_INPUT and err.startswith("moesafe status: error: --run-id \"x'; drop\" cannot name a file")


@pytest.mark.parametrize("command", [["status"], ["query", "select * from metrics"]])
def test_a_result_root_without_runs_is_an_error_not_an_empty_answer(capsys, tmp_path, command):
    missing = tmp_path / "reslts"
    code, out, err = moesafe(capsys, *command, "--out", str(missing))
    assert (code, out) == (EXIT_BAD_INPUT, "") and not missing.exists()  # a refused command writes nothing
    assert err.startswith(f"moesafe {command[0]}: error: result root {missing} does not exist. Fix: pass the --out")
    (tmp_path / "empty").mkdir()
    code, out, err = moesafe(capsys, *command, "--out", str(tmp_path / "empty"))
    assert (code, out) == (EXIT_BAD_INPUT, "") and f"result root {tmp_path / 'empty'} holds no runs" in err


@pytest.mark.parametrize("failed", [0, 1])
def test_run_prints_metrics_and_exits_by_completeness(capsys, store_root, monkeypatch, failed):
    calls = []

    def run_manifest(manifest, *, out, run_id, address, force_new_run, **options):
        calls.append((manifest.run_id, out, run_id, address, force_new_run))
        return types.SimpleNamespace(run_id=RUN, out=out, units_total=3, units_ok=3 - failed, units_failed=failed,
                                     units_skipped=0, units_reused=0)

    # jobs.runner is the lead's; the CLI only needs its run_manifest
    monkeypatch.setitem(sys.modules, "jobs.runner", types.SimpleNamespace(run_manifest=run_manifest))
    code, out, err = moesafe(capsys, "run", str(QUICKSTART), "--out", store_root, "--run-id", RUN,
                             "--address", "auto")
    assert calls == [(calls[0][0], store_root, RUN, "auto", False)] and calls[0][0].startswith("quickstart-")
    assert err == "" and code == (EXIT_INCOMPLETE if failed else 0)
    lines = out.splitlines()
    assert lines[0].split() == ["model", "dataset", "method", "judge", "metric", "value", "n"]
    assert lines[2].split() == ["sandbox", "sandbox-heldout-regular", "fsour", "refusal", "asr", "0.75", "8"]
    assert (f"run {RUN}: {'INCOMPLETE' if failed else 'complete'}, {3 - failed} units ok, 0 skipped (done earlier), "
            f"{failed} failed, of 3") in lines
    assert lines[-1] == f'explore: moesafe query "select * from metrics where run_id = \'{RUN}\'" --out {store_root}'


def test_run_refuses_a_bad_manifest_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jobs.runner", types.SimpleNamespace(run_manifest=None))  # never called
    bad = tmp_path / "bad.yaml"
    manifest = yaml.safe_load(QUICKSTART.read_text())
    assert manifest["methods"][0]["method"] == "fsour"
    manifest["methods"][0]["params"]["candidates"] = -1
    bad.write_text(yaml.safe_dump(manifest))
    code, _, err = moesafe(capsys, "run", str(bad), "--out", str(tmp_path / "out"))
    assert code == EXIT_BAD_INPUT
    assert "  methods[0].params.candidates: -1 is not allowed: fsour.candidates must be a positive integer" in err
    # a manifest whose schema holds but whose dataset file is missing: refused by the checks, and
    # the output root they found writable is still not created
    manifest["methods"][0]["params"]["candidates"] = 4
    manifest["datasets"]["harmful"] = {"source": str(tmp_path / "missing.csv")}
    bad.write_text(yaml.safe_dump(manifest))
    code, _, err = moesafe(capsys, "run", str(bad), "--out", str(tmp_path / "out" / "nested"))
    assert code == EXIT_BAD_INPUT and "  datasets.harmful: " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "a refused run writes nothing"


def test_submit_to_an_unreachable_address_names_it(capsys):
    code, out, err = moesafe(capsys, "submit", str(QUICKSTART), "--address", "http://127.0.0.1:9",
                             "--out", "s3://bucket/results")
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert "moesafe submit: error: cannot reach a Ray cluster's dashboard at http://127.0.0.1:9" in err


def test_submit_names_a_dataset_file_it_cannot_ship(capsys, tmp_path, monkeypatch):
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["datasets"]["harmful"] = {"source": "prompts/missing.csv"}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.chdir(tmp_path)
    code, out, err = moesafe(capsys, "submit", "m.yaml", "--address", "http://127.0.0.1:9",
                             "--out", "s3://bucket/results")
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert (f"moesafe submit: error: datasets.harmful.source: 'prompts/missing.csv' is not a file here (paths are "
            f"read from the current directory, {tmp_path})") in err


def test_submit_needs_a_result_root_the_cluster_and_this_machine_can_find(capsys):
    # The quickstart's `out` is the relative "results": on the cluster, inside Ray's per-job copy.
    code, out, err = moesafe(capsys, "submit", str(QUICKSTART), "--address", "http://127.0.0.1:9")
    assert (code, out) == (EXIT_BAD_INPUT, "")
    assert err == ("moesafe submit: error: result root 'results' would be inside the job's copy of the project on "
                   "the cluster, where neither `moesafe status` nor `moesafe query` can find it: pass --out "
                   "s3://bucket/prefix (or an absolute path on a disk the cluster's nodes share)\n")
    code, _, err = moesafe(capsys, "submit", str(QUICKSTART), "--address", "http://127.0.0.1:9",
                           "--out", "/shared/results")
    assert code == EXIT_BAD_INPUT and "note: results go to /shared/results on the cluster's head node" in err
    assert "cannot reach a Ray cluster's dashboard at http://127.0.0.1:9" in err


SCRIPT = Path(sys.executable).parent / "moesafe"


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_installed_console_script(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: 1\n")
    done = subprocess.run([str(SCRIPT), "validate", str(bad)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == EXIT_BAD_INPUT and done.stdout == ""
    assert "unknown key 'modle' at the top level (did you mean 'models'?)" in done.stderr
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "validate" in done.stdout and "submit" in done.stdout


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_sandbox_json_prints_only_json_and_no_library_noise(sandbox_dir):
    # sandbox_dir is <cache>/sandbox/<key>: the command reuses it and loads it to evaluate
    done = subprocess.run([str(SCRIPT), "sandbox", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                               "MOESAFE_CACHE": str(sandbox_dir.parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model_dir"] == str(sandbox_dir)  # stdout is one JSON object, nothing else
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr


def test_params_prints_each_field_of_the_params_dataclass_with_its_default(capsys):
    import dataclasses

    from core.fsour import FsourParams

    code, out, err = moesafe(capsys, "params", "fsour")
    assert (code, err) == (0, "")
    header = out.splitlines()[2]
    start = header.index("default")
    shown = {line.split()[0]: line[start:].split()[0] for line in out.splitlines()[3:] if line[:1].isalpha()
             and not line.startswith("What")}
    assert shown == {f.name: json.dumps(f.default) for f in dataclasses.fields(FsourParams)}
    assert "N: random expert sets tried at each (token, layer)" in out
    code, out, _ = moesafe(capsys, "params")
    assert code == 0 and all(f"{m} (" in out for m in ("fsour", "rosais", "safex", "steermoe"))
    code, out, err = moesafe(capsys, "params", "fsur")
    assert (code, out) == (EXIT_BAD_INPUT, "") and "unknown method 'fsur'; the methods: fsour, " in err


@pytest.mark.slow
def test_sandbox_json(capsys, sandbox_dir, monkeypatch):
    # sandbox_dir is <cache>/sandbox/<key>; the command finds the same cached model there
    monkeypatch.setenv("MOESAFE_CACHE", str(sandbox_dir.parents[1]))
    code, out, _ = moesafe(capsys, "sandbox", "--json")
    report = json.loads(out)
    assert code == 0 and report["model_dir"] == str(sandbox_dir)
    assert {"refusal_rate_harmful", "compliance_rate_benign", "train_seconds"} <= set(report)
    assert 0 <= report["refusal_rate_harmful"] <= 1
    # the weights' name: the same build on another CPU can be another model
    assert report["weights_sha256"] == hashlib.sha256((sandbox_dir / "model.safetensors").read_bytes()).hexdigest()


def test_run_interrupted_by_ctrl_c_says_so_records_it_and_can_be_resumed(capsys, tmp_path, monkeypatch, sandbox_dir):
    """Ctrl-C during a run: one line and exit 130, not a traceback through Ray; the attempt is
    recorded as interrupted (before: `running`, with no end, for good) and the lease is free."""
    import jobs.runner

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.runner, "connect_ray", lambda address: None)  # nothing here needs Ray
    monkeypatch.setattr(jobs.runner.Scheduler, "run", interrupted)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("run_id: cut\nmodels:\n  - {name: sandbox, path: sandbox, dtype: float32}\n"
                        "datasets:\n  harmful: {source: sandbox, split: regular, limit: 2}\n"
                        "methods:\n  - {method: steermoe, dataset: harmful, params: {top_n: 4, max_new_tokens: 8}}\n")
    out = str(tmp_path / "results")
    code, _, err = moesafe(capsys, "run", str(manifest), "--out", out)
    assert code == EXIT_INTERRUPTED
    assert ("moesafe run: interrupted; the units it finished are kept: run the same command again to resume\n"
            in err) and "Traceback" not in err
    [run] = ResultStore(out).read_table("runs", run_id="cut").to_pylist()
    assert run["status"] == "interrupted" and run["ended_at"] is not None
    assert [(a["status"], a["ended_at"] is not None) for a in run["attempts"]] == [("interrupted", True)]
    ResultStore(out).acquire_run("cut").release()  # the next attempt may start at once
