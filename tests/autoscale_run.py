"""Runs on Ray's real autoscaler, for tests/test_cloud.py: started by that test inside its own PID and
network namespace (`unshare -pfn --mount-proc`), because the fake multi-node provider dials the GCS
on the fixed port 6379 and its teardown, `ray stop --force`, stops every Ray it can see.

    python tests/autoscale_run.py WORKDIR MANIFEST_FIRST MANIFEST_TIMEOUT MANIFEST_PREFLIGHT MANIFEST_SECOND

The cluster: a head without CPUs or GPUs and one worker type {CPU: 1, GPU: 1}, min_workers 0, so
nothing runs until the autoscaler adds a node. During the first run, once a unit is committed, one
worker node is terminated (its raylet and every process it started, SIGKILLed: a reclaimed spot
node); the autoscaler must bring another. What it measured goes to WORKDIR/report.json; the
results to WORKDIR/out.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
           "RAY_raylet_start_wait_time_s": "120", "RAY_agent_register_timeout_ms": "120000",
           # a killed node is declared dead (GCS health checks) and terminated by the autoscaler (no
           # heartbeat) within seconds instead of half a minute each, so its replacement comes sooner
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}
    # set by the fake provider on worker nodes only: the preflight manifest's judge reads it as its key
    env.pop("RAY_NODE_TYPE_NAME", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    start = [ray_cli, "start", "--head", f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0",
             "--include-dashboard=false", "--disable-usage-stats"]
    for tries_left in (1, 0):  # a raylet slower than Ray's 30 s registration wait (a loaded machine): once more
        if subprocess.run(start, env=env, stdout=subprocess.DEVNULL).returncode == 0:
            return
        if tries_left:  # stops only this namespace's Ray (main checks that it runs in one)
            subprocess.run([ray_cli, "stop", "--force"], stdout=subprocess.DEVNULL)
    raise SystemExit("ray start --head failed twice")


def alive_workers() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def worker_nodes() -> int:
    return len(alive_workers())


def _processes() -> dict[int, int]:
    """pid -> parent pid, of every process in this namespace."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    return parents


def terminate_node(node_id: str) -> int:
    """SIGKILL the raylet of fake node `node_id` (the provider starts it with the node id in
    RAY_OVERRIDE_NODE_ID_FOR_TESTING) and every process under it; returns how many were killed."""
    parents = _processes()
    marker = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    [raylet] = [pid for pid in parents if Path(f"/proc/{pid}/comm").exists()
                and Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"
                and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    doomed, grew = {raylet}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed |= below
        grew = bool(below)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(doomed)


class NodeKiller(threading.Thread):
    """Watches a run: once it has committed a unit, terminates one worker node; records every
    worker node seen alive meanwhile (the replacement is a new one)."""

    def __init__(self, out: str, run_id: str):
        super().__init__(daemon=True)
        self.out, self.run_id = out, run_id
        self.stop, self.seen, self.killed = threading.Event(), set(), None
        self.units_before_kill = self.processes_killed = 0
        self.error = None

    def run(self) -> None:
        try:
            self._watch()
        except Exception as error:  # reported, so the test says why no node was killed
            self.error = f"{type(error).__name__}: {error}"

    def _watch(self) -> None:
        from core.store import ResultStore

        store = ResultStore(self.out, read_only=True)
        while not self.stop.wait(0.5):
            alive = alive_workers()
            self.seen |= alive
            if self.killed is None and alive and Path(self.out, "units").exists():
                committed = store.read_table("units", run_id=self.run_id).num_rows
                if committed:
                    self.killed, self.units_before_kill = sorted(alive)[0], committed
                    self.processes_killed = terminate_node(self.killed)


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

    killer = NodeKiller(out, "first")
    killer.start()
    start = time.monotonic()
    summary = run_manifest(load_manifest(Path(first)), out=out, progress=False)
    killer.stop.set()
    killer.join()
    report["first"] = {"seconds": time.monotonic() - start, "seconds_waiting": summary.seconds_waiting,
                       "units_ok": summary.units_ok, "units_total": summary.units_total,
                       "units_failed": summary.units_failed, "nodes_after": worker_nodes(),
                       "killed_node": killer.killed, "units_before_kill": killer.units_before_kill,
                       "processes_killed": killer.processes_killed, "killer_error": killer.error,
                       "worker_nodes_seen": sorted(killer.seen), "killed_node_alive_after": killer.killed in alive_workers()}

    # While the first run's nodes are still up (these runs place at once or never): a judge check
    # on the model's node; a wait that times out. Other resources or judges: no unit to reuse.
    for name, manifest, kwargs in (("preflight", preflight, {}),
                                   ("timeout", timeout, {"wait_timeout_s": 5.0, "reuse": False})):
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

    deadline = time.monotonic() + SCALE_DOWN_S
    while worker_nodes() and time.monotonic() < deadline:
        time.sleep(1.0)
    report["scaled_down_after_s"] = SCALE_DOWN_S - (deadline - time.monotonic())
    report["nodes_at_end"] = worker_nodes()
    ray.shutdown()
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
