"""`moesafe submit` runs a manifest as a real Ray job on a cluster started with `ray start`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from core.query import run_query

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MOESAFE = str(Path(sys.executable).with_name("moesafe"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, sandbox_dir):
    """A one-node cluster with its dashboard (job server) on loopback; token auth on, as Ray 2.59+
    does by default for `ray start`."""
    # as on a cluster set up by cluster.yaml: the environment with moesafe installed is on PATH
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "moesafe-submit-test-token-0123456789",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard = _free_port()
    # every port free, not Ray's defaults: another cluster on this machine must not collide
    ports = [f"--{name}={_free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # --block: the head's processes belong to this child, so stopping it stops only this cluster
    head = subprocess.Popen([RAY, "start", "--head", "--block", *ports, "--num-cpus=2", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:  # the job server answers once the dashboard is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(1)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        head.terminate()
        head.wait(timeout=120)


def test_submit_runs_the_manifest_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    out = str(tmp_path / "out")
    env = {**env, "MOESAFE_TEST_JUDGE_KEY": "value-of-the-test-key"}  # what `--env` passes to the job
    submitted = subprocess.run([MOESAFE, "submit", "manifests/smoke.yaml", "--address", address, "--out", out,
                                "--run-id", "smoke", "--env", "MOESAFE_TEST_JUDGE_KEY"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split()[0]
    # `ray job logs --follow` returns when the job ends (a subprocess: Ray reads its auth mode at import)
    logs = subprocess.run([RAY, "job", "logs", "--follow", "--address", address, job_id], env=env,
                          capture_output=True, text=True, timeout=600)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in status.stdout + status.stderr, logs.stdout[-3000:]
    assert "complete, " in logs.stdout  # moesafe run's closing line, printed inside the job
    metrics = json.loads(run_query("select method, metric from metrics where run_id = 'smoke'", out, "json"))
    assert {m["method"] for m in metrics} == {"fsour", "rosais", "safex", "steermoe"}
    # The job's processes got the variable, and so does anyone who can read the job API (the README says so).
    shown = subprocess.run([sys.executable, "-c", "import json, sys; from ray.job_submission import "
                            "JobSubmissionClient; print(json.dumps(JobSubmissionClient(sys.argv[1])"
                            ".get_job_info(sys.argv[2]).runtime_env))",
                            address, job_id], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["env_vars"] == {"MOESAFE_TEST_JUDGE_KEY": "value-of-the-test-key"}, shown.stderr
