"""Bad input that tests/test_manifest.py and tests/test_cli.py do not already cover: an unreachable
cluster address, a run id reused with a different manifest, negative method counts, and a model
config routing to more experts than it has. Each is refused with an error naming what and where,
before work starts, and nothing already written is lost."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from core.configs import save_tiny_model
from core.schemas import TABLES
from core.store import ResultStore
from jobs.cli import EXIT_BAD_INPUT, main
from jobs.manifest import ManifestError, check_manifest, load_manifest, manifest_hash
from tests.test_manifest import GOOD, problems

REPO = Path(__file__).resolve().parents[1]
MOESAFE = Path(sys.executable).parent / "moesafe"  # the installed console script

SHORT = """
store_answers: hash
models:
  - {{name: sandbox, path: sandbox, dtype: float32}}
datasets:
  harmful: {{source: sandbox, split: regular, limit: 2}}
methods:
  - method: steermoe
    dataset: harmful
    params: {{top_n: {top_n}, max_new_tokens: 4}}
"""


def files_with_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A result root holding a run already, written through the store."""
    root = tmp_path / "results"
    store = ResultStore(str(root))
    store.write_run("earlier", "models: []\n")
    store.write_unit("earlier", "sandbox", "u1", {"metrics": [
        {"dataset": "d", "method": "fsour", "judge": "refusal", "params_hash": "0" * 16, "metric": "asr", "value": 0.5,
         "n": 2}]},
        {"method": "fsour", "kind": "fsour_metrics", "status": "ok", "attempts": 1, "seconds": 0.1, "error": None})
    return root


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_unreachable_cluster_address_is_named_and_nothing_is_written(via, earlier_run, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(SHORT.format(top_n=4))
    address = f"127.0.0.1:{closed_port()}"
    before = files_with_bytes(earlier_run)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = [str(MOESAFE), "run", str(manifest), "--out", str(earlier_run)]
    if via == "RAY_ADDRESS":  # how a Ray job (moesafe submit) tells `moesafe run` where its cluster is
        env["RAY_ADDRESS"] = address
    else:
        argv += ["--address", address]
    # a fresh process: in this one Ray may be up already, and then no address is dialled
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stderr.startswith(f"moesafe run: error: cannot reach the Ray cluster at '{address}': nothing "
                                  f"answers at {address} (Connection refused)"), done.stderr
    assert done.stderr.count("\n") == 1, "one line, no traceback"
    assert files_with_bytes(earlier_run) == before


@pytest.fixture(scope="module")
def local_ray(sandbox_dir):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_run_id_reused_with_another_manifest_is_refused_unless_forced(local_ray, tmp_path, capsys):
    root = tmp_path / "results"
    first, edited = tmp_path / "first.yaml", tmp_path / "edited.yaml"
    first.write_text(SHORT.format(top_n=4))
    edited.write_text(SHORT.format(top_n=2))  # computes something else: another manifest hash
    assert main(["run", str(first), "--out", str(root), "--run-id", "nightly"]) == 0
    capsys.readouterr()
    before = files_with_bytes(root)

    assert main(["run", str(edited), "--out", str(root), "--run-id", "nightly"]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and err == (f"moesafe run: error: run id 'nightly' already exists in {str(root)!r} with a "
                                 "different manifest; use another --run-id, or --force-new-run to start a new run "
                                 "under a derived id\n")
    assert files_with_bytes(root) == before, "refused before anything was written"

    assert main(["run", str(edited), "--out", str(root), "--run-id", "nightly", "--force-new-run"]) == 0
    derived = f"nightly-{manifest_hash(load_manifest(edited))[:8]}"
    assert f"run {derived}: complete" in capsys.readouterr().out
    store = ResultStore(str(root), read_only=True)
    assert store.read_table("runs", run_id=derived).to_pylist()[0]["status"] == "finished"
    after = files_with_bytes(root)
    assert {path: after[path] for path in before} == before, "the first run's files are untouched"


@pytest.mark.parametrize("method, params, expected", [
    ("fsour", "restarts: -1",
     r"^methods\[0\]\.params\.restarts: -1 is not allowed: fsour\.restarts must be a positive integer"),
    ("rosais", "s1: -3", r"^methods\[1\]\.params\.s1: -3 is not allowed: rosais\.s1 must be a positive integer"),
    ("safex", "rounds: -5", r"^methods\[2\]\.params\.rounds: -5 is not allowed: rounds, .* must be positive"),
])
def test_negative_counts_are_refused(method, params, expected):
    # zero for each of these, and N (candidates) negative, are in tests/test_manifest.py
    data = yaml.safe_load(GOOD)
    index = ["fsour", "rosais", "safex", "steermoe"].index(method)
    data["methods"][index]["params"] = yaml.safe_load("{" + params + "}")
    found = problems(yaml.safe_dump(data))
    assert any(re.search(expected, line) for line in found), found


def test_model_routing_to_more_experts_than_it_has_is_refused(tmp_path):
    model = save_tiny_model("mixtral", tmp_path / "top10-of-8", num_experts_per_tok=10)  # 8 experts
    manifest = load_manifest(SHORT.format(top_n=4).replace("path: sandbox", f"path: {model}"))
    with pytest.raises(ManifestError, match=r"models\[0\] \(sandbox\): .*10.*8"):
        check_manifest(manifest, out=str(tmp_path / "out"))


def test_more_shards_than_decoder_layers_is_refused(tmp_path):
    """Before any actor starts: the sandbox has 4 decoder layers, so 4 shards are fine and 5 are not."""
    text = SHORT.format(top_n=4).replace("dtype: float32", "dtype: float32, shards: SHARDS")
    check_manifest(load_manifest(text.replace("SHARDS", "4")), out=str(tmp_path / "out"))
    with pytest.raises(ManifestError, match=r"models\[0\] \(sandbox\): shards: 5, but the model has 4 decoder layers"):
        check_manifest(load_manifest(text.replace("SHARDS", "5")), out=str(tmp_path / "out"))


def test_a_run_with_fsour_rows_of_the_one_unit_per_restart_version_is_not_resumed(tmp_path):
    """fsour_routes v2 rows were written by units that searched and answered one restart each; this
    version's searches and batched answers are other units, so resuming would add a second row per
    restart. Any v2 row (here a pre-check's) refuses the resume, naming the table and versions."""
    from jobs.runner import RunError, _check_schema

    root = tmp_path / "results"
    store = ResultStore(str(root))
    store.write_run("old", "models: []\n")
    store.write_unit("old", "sandbox", "u1", {}, {"method": "fsour", "kind": "fsour_precheck", "status": "ok",
                                                  "attempts": 1, "seconds": 0.1, "error": None})
    v2 = TABLES["fsour_routes"].schema.remove(TABLES["fsour_routes"].schema.get_field_index("search_seconds"))
    row = {"run_id": "old", "model": "sandbox", "unit_id": "u1", "prompt_id": "p", "dataset": "harmful", "restart": -1,
           "route": [], "joint_logprob": None, "forwards": 0, "candidates": 0, "seconds": 0.1, "jailbroken": False,
           "score": 0.0, "judge": "refusal", "prompt_tokens": None, "scope": "prompt", "params": "{}",
           "schema_version": 2}
    (root / "fsour_routes/model=sandbox/run=old").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=v2), root / "fsour_routes/model=sandbox/run=old/u1.parquet")
    assert store.read_table("fsour_routes", run_id="old").column("search_seconds").to_pylist() == [None]
    with pytest.raises(RunError, match=r"fsour_routes schema version 2; this version writes 3\) and cannot be resumed"):
        _check_schema(store, "old")


def test_a_run_stored_by_an_older_version_is_named_not_resumed(tmp_path, capsys):
    """A run whose `metrics` rows are schema version 1 (no judge, no params_hash columns): resuming
    it is refused with the versions named, and nothing changes; its rows stay queryable."""
    root = tmp_path / "results"
    path = tmp_path / "old.yaml"
    path.write_text("run_id: old\n" + SHORT.format(top_n=4))
    manifest = load_manifest(path)
    store = ResultStore(str(root))
    store.write_run("old", manifest.to_yaml(), manifest_hash=manifest_hash(manifest))
    store.write_unit("old", "sandbox", "u1", {}, {"method": "steermoe", "kind": "steer_metrics", "status": "ok",
                                                  "attempts": 1, "seconds": 0.1, "error": None})
    v1 = pa.table({"run_id": ["old"], "model": ["sandbox"], "unit_id": ["u1"], "dataset": ["harmful"],
                   "method": ["steermoe"], "metric": ["asr_steered"], "value": [0.5], "n": pa.array([2], pa.int64()),
                   "schema_version": pa.array([1], pa.int32())})
    (root / "metrics/model=sandbox/run=old").mkdir(parents=True)
    pq.write_table(v1, root / "metrics/model=sandbox/run=old/u1.parquet")
    before = files_with_bytes(root)

    code = main(["run", str(path), "--out", str(root)])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert f"run id 'old' in '{root}' was written by an older moesafe (metrics schema version 1; this version " \
           f"writes 3) and cannot be resumed: use another --run-id or another --out" in err
    assert files_with_bytes(root) == before
    assert main(["query", "select method, judge, metric, value from metrics", "--out", str(root),
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "steermoe,,asr_steered,0.5"
