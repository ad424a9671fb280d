"""Runs on Ray's real autoscaler, for tests/test_cloud.py: started by that test inside its own PID and
network namespace (`unshare -pfn --mount-proc`), because the fake multi-node provider dials the GCS
on the fixed port 6379 and its teardown, `ray stop --force`, stops every Ray it can see.

    python tests/autoscale_run.py WORKDIR MANIFEST_FIRST MANIFEST_TIMEOUT MANIFEST_PREFLIGHT MANIFEST_SECOND

The cluster: a head without CPUs or GPUs and one worker type {CPU: 1, GPU: 1}, min_workers 0, so
nothing runs until the autoscaler adds a node. What it measured goes to WORKDIR/report.json; the
results to WORKDIR/out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

IDLE_TIMEOUT_MINUTES = 0.1  # idle fake nodes go within seconds, so the test sees the scale-down
SCALE_DOWN_S = 90.0


def cluster_config(max_workers: int) -> dict:
    """Ray's fake multi-node provider: the real autoscaler, worker raylets started on this machine."""
    return {
        "cluster_name": "moesafe-autoscale-test",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "nobody"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": max_workers},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_cluster(workdir: Path) -> None:
    config = workdir / "autoscaler.json"
    config.write_text(json.dumps(cluster_config(max_workers=2)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # a loaded machine starts a node's agent slower than the raylet's default waits allow
           "RAY_raylet_start_wait_time_s": "120", "RAY_agent_register_timeout_ms": "120000"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    start = [ray_cli, "start", "--head", f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats"]
    for tries_left in (1, 0):  # a raylet slower than Ray's 30 s registration wait (a loaded machine): once more
        if subprocess.run(start, env=env, stdout=subprocess.DEVNULL).returncode == 0:
            return
        if tries_left:  # stops only this namespace's Ray (main checks that it runs in one)
            subprocess.run([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)
    raise SystemExit("ray start --head failed twice")


def worker_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


def main(workdir: str, first: str, timeout: str, preflight: str, second: str) -> None:
    if os.getpid() != 1:
        raise SystemExit("run this only as the first process of its own PID namespace (see tests/test_cloud.py): "
                         "it may run `ray stop --force`, which stops every Ray instance it can see")
    work = Path(workdir)
    start_cluster(work)
    import ray

    from jobs.manifest import load_manifest
    from jobs.runner import RunError, run_manifest

    ray.init(address="auto", log_to_driver=False)
    out = str(work / "out")
    report: dict = {"nodes_before": worker_nodes()}

    start = time.monotonic()
    summary = run_manifest(load_manifest(Path(first)), out=out, progress=False)
    report["first"] = {"seconds": time.monotonic() - start, "seconds_waiting": summary.seconds_waiting,
                       "units_ok": summary.units_ok, "units_total": summary.units_total,
                       "units_failed": summary.units_failed, "nodes_after": worker_nodes()}

    deadline = time.monotonic() + SCALE_DOWN_S
    while worker_nodes() and time.monotonic() < deadline:
        time.sleep(1.0)
    report["scaled_down_after_s"] = SCALE_DOWN_S - (deadline - time.monotonic())
    report["nodes_at_end"] = worker_nodes()

    # the first run's units, under other resources: reused unless told not to, so it would not wait
    for name, manifest, kwargs in (("timeout", timeout, {"wait_timeout_s": 5.0, "reuse": False}),
                                   ("preflight", preflight, {})):
        start = time.monotonic()
        try:
            run_manifest(load_manifest(Path(manifest)), out=out, progress=False, **kwargs)
            report[name] = {"error": None}
        except RunError as error:
            report[name] = {"error": str(error), "seconds": time.monotonic() - start}

    summary = run_manifest(load_manifest(Path(second)), out=out, progress=False)
    report["second"] = {"seconds_waiting": summary.seconds_waiting, "units_ok": summary.units_ok,
                        "units_reused": summary.units_reused, "units_total": summary.units_total,
                        "units_failed": summary.units_failed}
    ray.shutdown()
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
