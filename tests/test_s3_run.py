"""Runs whose results go to S3: the quickstart's shape at test size against a real S3-compatible
server on loopback (moto in server mode), resumed, and queried with `moesafe query`. S3 settings and
credentials reach the store only through the standard AWS environment and config chain."""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import s3fs

from core.store import ResultStore, StoreError
from jobs.cli import main
from jobs.manifest import load_manifest
from jobs.runner import run_manifest
from tests.conftest import AWS_UNSET, S3_ACCESS_KEY, S3_SECRET_KEY, aws_environment
from tests.test_faults import MANIFEST, snapshot
from tests.test_runtime import SANDBOX_MODEL

RUN = "s3run"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, sandbox_dir, tmp_path_factory):
    """A fresh bucket, and a local Ray cluster started with the AWS variables set, since its
    workers (the model actors, which write the results) inherit the environment at start."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in aws_environment(s3_endpoint, tmp_path_factory.mktemp("aws")).items():
            env.setenv(name, value)
        for name in AWS_UNSET:
            env.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an older endpoint
        name = f"moesafe-run-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(name)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield name
        ray.shutdown()
    s3fs.S3FileSystem.clear_instance_cache()


def s3_snapshot(bucket: str, prefix: str, local: Path) -> dict[str, list[str]]:
    """The run's tables as they are in S3, read from a copy fetched in one concurrent download
    (reading them in place costs one request per object, ~10 s against moto)."""
    s3fs.S3FileSystem().get(f"{bucket}/{prefix}/", f"{local}/", recursive=True)
    return snapshot(str(local), RUN)


def test_run_to_s3_resume_and_query(bucket, tmp_path, capsys):
    prefix = "nightly/results"
    root = f"s3://{bucket}/{prefix}"
    manifest = tmp_path / "small.yaml"
    manifest.write_text(MANIFEST.format(run_id=RUN, models=SANDBOX_MODEL, store_answers="full"))

    first = run_manifest(load_manifest(manifest), out=root, progress=False)
    assert first.complete
    before = s3_snapshot(bucket, prefix, tmp_path / "before")
    total = len(before["units"])
    assert first.units_ok == total and all(before[name] for name in before), "every table has rows in S3"

    # Cut the run short after the fact: the last stages' commit markers are gone from S3.
    fs = s3fs.S3FileSystem()
    lost = [u["unit_id"] for u in ResultStore(root, read_only=True).read_table("units", run_id=RUN).to_pylist()
            if u["kind"] in ("rosais_attack", "safex_validation", "steer_metrics")]
    fs.rm([f"{bucket}/{prefix}/units/model=sandbox/run={RUN}/{unit}.parquet" for unit in lost])
    resumed = run_manifest(load_manifest(manifest), out=root, progress=False)
    assert (resumed.units_ok, resumed.units_skipped, resumed.units_failed) == (len(lost), total - len(lost), 0)
    assert s3_snapshot(bucket, prefix, tmp_path / "after") == before, "resumed: the same rows, none twice"
    capsys.readouterr()  # the runs' progress lines

    code = main(["query", f"select method, metric, dataset, judge, value, n from metrics where run_id = '{RUN}' "
                          "order by method, metric, dataset, judge", "--out", root, "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0, out
    stored = ResultStore(root, read_only=True).read_table("metrics", run_id=RUN).to_pylist()
    columns = ("method", "metric", "dataset", "judge", "value", "n")
    assert json.loads(out) == sorted(({k: m[k] for k in columns} for m in stored),
                                     key=lambda m: (m["method"], m["metric"], m["dataset"], m["judge"]))

    # credentials never reach the results, compressed or not: every object under the prefix is
    # read from the copy fetched after the resume (the query writes nothing; the listing says so)
    copy = tmp_path / "after"
    fs.invalidate_cache()
    keys = sorted(key.removeprefix(f"{bucket}/{prefix}/") for key in fs.find(f"{bucket}/{prefix}"))
    assert keys == sorted(str(path.relative_to(copy)) for path in copy.rglob("*") if path.is_file())
    for key in keys:
        data = (copy / key).read_bytes()
        text = data + json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str).encode()
        assert S3_ACCESS_KEY.encode() not in text and S3_SECRET_KEY.encode() not in text, key


def test_credentials_come_from_the_aws_config_chain(s3_bucket, tmp_path, monkeypatch):
    root = f"s3://{s3_bucket}/chain"
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to fall back on here
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreError, match=r"is not writable \(NoCredentialsError: .* credentials of the standard "
                                         r"AWS chain"):
        ResultStore(root)

    credentials = tmp_path / "credentials"  # what `aws configure` writes
    credentials.write_text(f"[default]\naws_access_key_id = {S3_ACCESS_KEY}\n"
                           f"aws_secret_access_key = {S3_SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    s3fs.S3FileSystem.clear_instance_cache()
    store = ResultStore(root)
    store.write_run("chain", "models: []\n")
    assert store.read_table("runs", run_id="chain").num_rows == 1
