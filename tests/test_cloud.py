"""The cloud runtime: a run on Ray's real autoscaler (fake GPU nodes on this machine) that waits for
nodes, loses a node mid-run and gets another, scales up and down, checks its judges on the models'
nodes, gives its wait-timeout error, and reuses units across runs; a classifier judge in its own
placement group; s3:// models read for planning without their weights and downloaded once per node."""
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
from jobs.runner import RunError, run_manifest

REPO = Path(__file__).resolve().parents[1]
TIME_COLUMNS = ("seconds", "search_seconds", "finished_at")

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
def test_autoscaling_cluster_waits_for_nodes_replaces_a_lost_one_reuses_units_and_matches_a_fixed_cluster(sandbox_dir, tmp_path):
    from transformers import AutoTokenizer

    tiny = save_tiny_model("olmoe", tmp_path / "tiny_olmoe", tokenizer=AutoTokenizer.from_pretrained(sandbox_dir))
    added = f"  - {{name: added, path: {tiny}, dtype: float32, num_gpus: 1, device: cpu}}"
    first = write(tmp_path, "first", SANDBOX_ON_GPU_NODE)
    second = write(tmp_path, "second", SANDBOX_ON_GPU_NODE + "\n" + added)
    too_big = write(tmp_path, "too-big", SANDBOX_ON_GPU_NODE.replace("num_gpus: 1", "num_gpus: 2"))
    # Its key variable is set on the worker nodes only (Ray's fake provider sets RAY_NODE_TYPE_NAME
    # there; the head has none): checked where the model's actors run, the key is found and the
    # endpoint, unreachable, stops the run. Checked on the head, the key would be missing.
    unreachable = write(tmp_path, "unreachable", SANDBOX_ON_GPU_NODE, judge="graded", judges=(
        "  graded: {type: rubric, base_url: 'http://127.0.0.1:9/v1', model: m, max_retries: 0, "
        "api_key_env: RAY_NODE_TYPE_NAME}"))
    work = tmp_path / "work"
    work.mkdir()
    # /tmp/ray privately too: the cluster's session files must not replace this machine's others
    script = (f"ip link set lo up && mkdir -p /tmp/ray {work}/ray && mount --bind {work}/ray /tmp/ray && "
              f"exec {sys.executable} {REPO / 'tests' / 'autoscale_run.py'} {work} {first} {too_big} {unreachable} {second}")
    done = subprocess.run(["unshare", "-pfn", "--mount-proc", "bash", "-c", script], capture_output=True, text=True,
                          timeout=900)  # a loaded machine: the namespace part took 4.5 min at load 11-17
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    print(json.dumps(report, indent=1))  # the README's figures

    first_run = report["first"]
    assert report["nodes_before"] == 0
    assert first_run["seconds_waiting"] > 0, "the run waited for the autoscaler"
    assert first_run["units_failed"] == 0 and first_run["units_ok"] == first_run["units_total"]
    assert first_run["nodes_after"] >= 1 and report["nodes_at_end"] == 0, "nodes scaled up, then down"
    # A worker node terminated mid-run: the autoscaler brought another (a node id not seen before it).
    assert first_run["killer_error"] is None and first_run["killed_node"], "no node was terminated"
    assert 0 < first_run["units_before_kill"] < first_run["units_total"], "the node died mid-run"
    assert not first_run["killed_node_alive_after"]
    assert len(first_run["worker_nodes_seen"]) >= 3, "the terminated node was replaced"
    assert "waited" in report["timeout"]["error"] and "{GPU: 2, CPU: 1}" in report["timeout"]["error"]
    assert report["preflight"]["error"].startswith(
        "judge 'graded' (rubric) failed its check on the cluster (on the node of model 'sandbox'), before any "
        "generation: "), report["preflight"]["error"]
    assert "cannot reach http://127.0.0.1:9/v1" in report["preflight"]["error"], "the key was found on the worker"
    out = str(work / "out")
    store = ResultStore(out, read_only=True)
    assert [r["status"] for r in store.read_table("runs", run_id="unreachable").to_pylist()] == ["failed"]
    assert not store.read_table("units", run_id="unreachable").num_rows, "no unit ran"
    units = store.read_table("units", run_id="first").column("unit_id").to_pylist()
    assert len(units) == len(set(units)) == first_run["units_total"], "nothing lost or doubled"
    reused = report["second"]["units_reused"]
    assert reused == report["first"]["units_total"], "every unit of the first model was reused"
    assert report["second"]["units_ok"] == report["second"]["units_total"] - reused, "only the added model ran"
    units = store.read_table("units", run_id="second").to_pylist()
    assert {u["model"] for u in units if u["reused_from"]} == {"sandbox"}
    assert all(u["reused_from"] == "first" for u in units if u["model"] == "sandbox")

    # The same manifest, fresh, on a fixed local cluster (two GPUs it only claims): the same rows.
    fixed = str(tmp_path / "fixed")
    ray.init(address="local", num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fresh = run_manifest(load_manifest(second), out=fixed, progress=False)
    finally:
        ray.shutdown()
    assert fresh.complete and fresh.units_reused == 0
    assert rows(out, "second") == rows(fixed, "second"), "reused and computed rows equal a fresh run's"
    assert rows(out, "first") == rows(fixed, "second", model="sandbox"), "the autoscaled run equals the fixed one"


@pytest.mark.slow
def test_a_classifier_judge_runs_in_its_own_group_and_is_checked_there_first(sandbox_dir, tmp_path, capfd):
    judged, broken = classifier_manifests(tmp_path, sandbox_dir)
    out = str(tmp_path / "out")
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert run_manifest(load_manifest(judged), out=out, progress=False).complete
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "REMOVED"]
        judge_groups = [g for g in groups if list(g["bundles"].values()) == [{"CPU": 1.0}]]
        with pytest.raises(RunError, match=r"judge 'cls' \(classifier\) failed its check on the cluster, before any "
                                           r"generation: classifier judge: cannot load sequence model from"):
            run_manifest(load_manifest(broken), out=out, progress=False)
    finally:
        ray.shutdown()
    assert len(judge_groups) == 1, "the classifier judge had its own group: one bundle of {CPU: 1}"
    verdicts = [v for g in ResultStore(out, read_only=True).read_table("generations", run_id="judged").to_pylist()
                for v in g["verdicts"]]
    assert verdicts and {v["judge"] for v in verdicts} == {"cls"}
    assert all(v["jailbroken"] is not None and 0.0 <= v["score"] <= 1.0 for v in verdicts), "the classifier judged"
    assert not ResultStore(out, read_only=True).read_table("runs", run_id="broken").num_rows, \
        "a run stopped by a judge's check writes nothing"
    # The model actors find the judge by name: a handle among their constructor arguments would put
    # those arguments in the object store, from where a restarted actor may not get them back.
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def classifier_manifests(tmp_path: Path, sandbox_dir: str) -> tuple[Path, Path]:
    """Manifests judged by a `classifier`: a tiny sequence classifier over the sandbox's words
    (random weights, built from a config, saved, loaded back by from_pretrained), on the CPU;
    and the same judge pointing at a directory with no model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(sandbox_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    (tmp_path / "empty").mkdir()
    judge = "  cls: {{type: classifier, model_path: {path}, mode: sequence, device: cpu}}"
    one_replica = SANDBOX_ON_GPU_NODE.replace("replicas: 2", "replicas: 1")  # one actor to start, not two
    return (write(tmp_path, "judged", one_replica, judges=judge.format(path=tmp_path / "cls"), judge="cls"),
            write(tmp_path, "broken", one_replica, judges=judge.format(path=tmp_path / "empty"), judge="cls"))


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
