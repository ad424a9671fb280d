"""Shared fixtures."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# One sandbox cache for the test process and every Ray worker it starts (they inherit the
# environment): the git-ignored `.cache/moesafe` of the repository unless MOESAFE_CACHE is set.
os.environ.setdefault("MOESAFE_CACHE", str(REPO_ROOT / ".cache" / "moesafe"))
# Tiny models gain nothing from intra-op threads, and the test process plus its Ray workers
# would oversubscribe two cores (seen: 10-90x slower tiny forwards). Read by torch at import.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sandbox_dir() -> Path:
    """The sandbox model directory, built once (later sessions reuse the cache; its key changes
    with the build config and SANDBOX_VERSION)."""
    from core.sandbox import build_sandbox

    return build_sandbox()


@pytest.fixture(scope="module")
def two_worker_cluster(sandbox_dir):
    """A real Ray cluster of three nodes, driven by this process: a head without CPUs, so model
    actors always land on a worker node and the driver (attached to the head) survives the loss of
    any worker, and two 1-CPU worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


S3_ACCESS_KEY = "moesafe-test-access-key"
S3_SECRET_KEY = "moesafe-test-secret-key"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto in server mode) on loopback."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def aws_environment(endpoint: str, tmp_path) -> dict[str, str]:
    """The standard AWS variables pointing at the loopback server, with this machine's own AWS
    config, credentials and instance metadata kept out."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds"),
            "AWS_EC2_METADATA_DISABLED": "true"}


AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, tmp_path):
    """A fresh bucket's name; credentials and endpoint reach s3fs only through the standard
    AWS environment chain."""
    import s3fs

    for name, value in aws_environment(s3_endpoint, tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in AWS_UNSET:
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an older endpoint
    bucket = f"moesafe-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
