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


def test_submit_ships_a_manifest_from_anywhere_and_finds_the_token_where_ray_keeps_it(ray_head, tmp_path):
    """The manifest and its dataset file live outside the project; the token is only in
    ~/.ray/auth_token (no RAY_AUTH_MODE, no RAY_AUTH_TOKEN), as on a user's machine."""
    import csv

    import yaml

    from core.datasets import load_prompts

    address, head_env = ray_head
    elsewhere = tmp_path / "my-experiments"
    elsewhere.mkdir()
    with open(elsewhere / "harmful.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "target"])
        writer.writerows((p.id, p.prompt, p.target) for p in load_prompts("sandbox", split="regular", limit=2))
    manifest = yaml.safe_load((REPO / "manifests" / "smoke.yaml").read_text())
    manifest["datasets"]["harmful"] = {"source": "./harmful.csv"}  # relative: read from the current directory
    (elsewhere / "mine.yaml").write_text(yaml.safe_dump(manifest))
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(head_env["RAY_AUTH_TOKEN"])
    user_env = {k: v for k, v in head_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    user_env["HOME"] = str(home)

    out = str(tmp_path / "out")
    user_env["MOESAFE_TEST_JUDGE_KEY"] = "value-of-the-test-key"  # what `--env` passes to the job
    submitted = subprocess.run([MOESAFE, "submit", "mine.yaml", "--address", address, "--out", out,
                                "--run-id", "smoke", "--env", "MOESAFE_TEST_JUDGE_KEY"], cwd=elsewhere, env=user_env,
                               capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "Token authentication" not in submitted.stderr  # Ray's warning is not news to the user
    job_id = submitted.stdout.split()[0]
    # `ray job logs --follow` returns when the job ends (a subprocess: Ray reads its auth mode at import)
    logs = subprocess.run([RAY, "job", "logs", "--follow", "--address", address, job_id], env=head_env,
                          capture_output=True, text=True, timeout=600)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=head_env,
                            capture_output=True, text=True, timeout=60)
    assert "succeeded" in status.stdout + status.stderr, logs.stdout[-3000:]
    assert "complete, " in logs.stdout  # moesafe run's closing line, printed inside the job
    metrics = json.loads(run_query("select method, metric, dataset from metrics where run_id = 'smoke'", out, "json"))
    assert {m["method"] for m in metrics} == {"fsour", "rosais", "safex", "steermoe"}
    # the shipped copy of harmful.csv was read (a file's stem names its dataset)
    assert {m["dataset"] for m in metrics if m["method"] == "fsour"} == {"harmful"}
    # The job's processes got the variable, and so does anyone who can read the job API (the README says so).
    shown = subprocess.run([sys.executable, "-c", "import json, sys; from ray.job_submission import "
                            "JobSubmissionClient; print(json.dumps(JobSubmissionClient(sys.argv[1])"
                            ".get_job_info(sys.argv[2]).runtime_env))",
                            address, job_id], env=head_env, capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["env_vars"] == {"MOESAFE_TEST_JUDGE_KEY": "value-of-the-test-key"}, shown.stderr
