"""The cloud runtime: a run on Ray's real autoscaler (fake GPU nodes on this machine) that waits for
nodes, scales up and down, gives its wait-timeout and preflight errors, and reuses units across
runs; s3:// models read for planning without their weights and downloaded once per node."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray
import s3fs

from core.configs import save_tiny_model
from core.models import _download_s3, cache_root, describe_model, load_model
from core.schemas import RESULT_TABLES
from core.store import ResultStore
from jobs.manifest import load_manifest
from jobs.runner import run_manifest

REPO = Path(__file__).resolve().parents[1]
TIME_COLUMNS = ("seconds", "finished_at")

# One method at the smallest size with several units per stage: the figures are about scheduling.
MANIFEST = """
run_id: {run_id}
chunking: {{prompts_per_unit: 1}}
models:
{models}
datasets:
  harmful: {{source: sandbox, split: regular, limit: 3}}
judges:
{judges}
methods:
  - method: fsour
    dataset: harmful
    judge: {judge}
    params: {{candidates: 4, restarts: 2, max_new_tokens: 8}}
"""
# Each replica claims a GPU (so it waits for a GPU node) and runs on the CPU (the fake nodes have none).
SANDBOX_ON_GPU_NODE = "  - {name: sandbox, path: sandbox, dtype: float32, num_gpus: 1, device: cpu, replicas: 2}"
REFUSAL = "  refusal: {type: refusal}"


def write(tmp: Path, run_id: str, models: str, judges: str = REFUSAL, judge: str = "refusal") -> Path:
    path = tmp / f"{run_id}.yaml"
    path.write_text(MANIFEST.format(run_id=run_id, models=models, judges=judges, judge=judge))
    return path


def rows(root: str, run_id: str, model: str | None = None) -> dict[str, list[str]]:
    """The run's result tables as sorted JSON rows, without run id and time columns."""
    store = ResultStore(root, read_only=True)
    tables = {}
    for name in RESULT_TABLES:
        table = store.read_table(name, run_id=run_id, model=model)
        table = table.drop_columns([c for c in ("run_id", *TIME_COLUMNS) if c in table.column_names])
        tables[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())
    return tables


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs unshare and ip (util-linux, iproute2) and root for a private namespace")
def test_autoscaling_cluster_waits_for_nodes_reuses_units_and_matches_a_fixed_cluster(sandbox_dir, tmp_path):
    from transformers import AutoTokenizer

    tiny = save_tiny_model("olmoe", tmp_path / "tiny_olmoe", tokenizer=AutoTokenizer.from_pretrained(sandbox_dir))
    added = f"  - {{name: added, path: {tiny}, dtype: float32, num_gpus: 1, device: cpu}}"
    first = write(tmp_path, "first", SANDBOX_ON_GPU_NODE)
    second = write(tmp_path, "second", SANDBOX_ON_GPU_NODE + "\n" + added)
    too_big = write(tmp_path, "too-big", SANDBOX_ON_GPU_NODE.replace("num_gpus: 1", "num_gpus: 2"))
    keyless = write(tmp_path, "keyless", SANDBOX_ON_GPU_NODE, judge="graded", judges=(
        "  graded: {type: rubric, base_url: 'http://127.0.0.1:9/v1', model: m, "
        "api_key_env: MOESAFE_TEST_ABSENT_KEY}"))
    work = tmp_path / "work"
    work.mkdir()
    # /tmp/ray privately too: the cluster's session files must not replace this machine's others
    script = (f"ip link set lo up && mkdir -p /tmp/ray {work}/ray && mount --bind {work}/ray /tmp/ray && "
              f"exec {sys.executable} {REPO / 'tests' / 'autoscale_run.py'} {work} {first} {too_big} {keyless} {second}")
    done = subprocess.run(["unshare", "-pfn", "--mount-proc", "bash", "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    print(json.dumps(report, indent=1))  # the README's figures

    assert report["nodes_before"] == 0
    assert report["first"]["seconds_waiting"] > 0, "the run waited for the autoscaler"
    assert report["first"]["units_failed"] == 0 and report["first"]["units_ok"] == report["first"]["units_total"]
    assert report["first"]["nodes_after"] >= 1 and report["nodes_at_end"] == 0, "nodes scaled up, then down"
    assert "waited" in report["timeout"]["error"] and "{GPU: 2, CPU: 1}" in report["timeout"]["error"]
    assert "judge 'graded'" in report["preflight"]["error"]
    assert "MOESAFE_TEST_ABSENT_KEY" in report["preflight"]["error"]
    out = str(work / "out")
    store = ResultStore(out, read_only=True)
    assert not store.read_table("runs", run_id="keyless").num_rows, "a run refused in preflight writes nothing"
    assert not store.read_table("units", run_id="keyless").num_rows
    reused = report["second"]["units_reused"]
    assert reused == report["first"]["units_total"], "every unit of the first model was reused"
    assert report["second"]["units_ok"] == report["second"]["units_total"] - reused, "only the added model ran"
    units = store.read_table("units", run_id="second").to_pylist()
    assert {u["model"] for u in units if u["reused_from"]} == {"sandbox"}
    assert all(u["reused_from"] == "first" for u in units if u["model"] == "sandbox")

    # The same manifest, fresh, on a fixed local cluster (two GPUs it only claims): the same rows.
    fixed = str(tmp_path / "fixed")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fresh = run_manifest(load_manifest(second), out=fixed, progress=False)
    finally:
        ray.shutdown()
    assert fresh.complete and fresh.units_reused == 0
    assert rows(out, "second") == rows(fixed, "second"), "reused and computed rows equal a fresh run's"
    assert rows(out, "first") == rows(fixed, "second", model="sandbox"), "the autoscaled run equals the fixed one"


def test_s3_model_planning_reads_config_only_and_a_node_downloads_once(tmp_path, s3_bucket, monkeypatch):
    local = save_tiny_model("mixtral", tmp_path / "tiny")
    fs = s3fs.S3FileSystem()
    fs.put(str(local) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    monkeypatch.setenv("MOESAFE_CACHE", str(tmp_path / "cache"))
    prefix = f"s3://{s3_bucket}/models/tiny"

    shape = describe_model(prefix)
    assert shape.num_experts == describe_model(str(local)).num_experts
    assert not (cache_root() / "models").exists(), "planning downloaded no weights"

    downloads = []
    real_get = fs.get  # s3fs caches its instances: the loader gets this one

    def counted_get(*args, **kwargs):
        downloads.append(args[0])
        return real_get(*args, **kwargs)

    monkeypatch.setattr(fs, "get", counted_get)
    targets = []
    replicas = [threading.Thread(target=lambda: targets.append(_download_s3(prefix))) for _ in range(3)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join()
    assert len(downloads) == 1 and len(set(targets)) == 1, "replicas on one node share one download"
    assert load_model(prefix, dtype="float32", device="cpu").control.num_experts == shape.num_experts


def test_model_entry_device_and_revision_are_checked():
    from jobs.manifest import ManifestError

    base = "models:\n  - {{name: m, path: {path}, {extra}}}\ndatasets: {{h: {{source: sandbox}}}}\n" \
           "methods: [{{method: fsour, dataset: h}}]\n"
    assert load_manifest(base.format(path="sandbox", extra="device: cpu, num_gpus: 1")).models[0].device == "cpu"
    for extra, path, message in (("device: tpu", "sandbox", "device"),
                                 ("device: cpu, device_map: auto", "sandbox", "device is cpu"),
                                 ("revision: main", "sandbox", "revision pins a hub model")):
        with pytest.raises(ManifestError, match=message):
            load_manifest(base.format(path=path, extra=extra))
