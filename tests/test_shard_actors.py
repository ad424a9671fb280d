"""Sharded replicas on a real local Ray cluster: shard actors pipelining micro-batches, the runtime
with `shards: 2` giving the tables of `shards: 1`, and a shard process killed mid-run."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.shard_worker import CompiledStages, RayStages, start_shards
from core.configs import save_tiny_model
from core.models import load_model
from core.routing import Route
from core.schemas import RESULT_TABLES
from core.sharding import sharded_loaded_model
from core.store import ResultStore
from jobs.runner import run_manifest
from tests.test_runtime import _manifest

TIMINGS = {"unit_id", "run_id", "seconds", "search_seconds"}  # what differs between two runs of one manifest


@pytest.fixture(scope="module")
def ray_cluster(sandbox_dir):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_pipelined_micro_batches_equal_the_unsharded_model(ray_cluster, tmp_path):
    path = str(save_tiny_model("deepseek_v2", tmp_path / "m"))  # dense first layer, shared expert
    full = load_model(path, dtype="float64")
    entry = {"shards": 2, "dtype": "float64", "num_cpus": 1}
    stages = RayStages(lambda: start_shards(entry, path))
    lm = sharded_loaded_model(path, stages)
    assert len(set(ray.get([a.pid.remote() for a in stages.actors]))) == 2, "one process per shard"
    ids = torch.randint(7, 128, (8, 10), generator=torch.Generator().manual_seed(0))
    c = full.control
    disable = Route.disable({c.num_layers - 1: [0, 3]}, c.num_experts)
    with torch.no_grad(), c.apply(disable), c.record() as want_rec:
        want = full.model(ids).logits
    with lm.control.apply(disable), lm.control.record() as rec:
        msgs = [lm.model.message(ids[i:i + 2])[0] for i in range(0, 8, 2)]  # 4 micro-batches
        got = torch.cat(lm.model.forward_many(msgs))
    assert torch.equal(got, want)
    # a recording adds forwards up row by row: the micro-batches' rows land on rows 0-1
    assert torch.equal(rec.counts().sum(0), want_rec.counts().sum(0))
    # a forward with a KV cache: the caches live on the shards
    with torch.no_grad():
        want_gen = full.model.generate(ids[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(lm.model.generate(ids[:2], max_new_tokens=4, pad_token_id=0), want_gen)
    assert sum(stages.param_bytes()) < 1.01 * sum(t.numel() * t.element_size() for t in full.model.parameters()) + 4096
    # the same shard actors driven through a Ray Compiled Graph: the same logits, recordings and answers;
    # generation with 4 rows runs as 2 micro-batches (one per stage) decoded in turn, both in flight at once
    compiled = CompiledStages(lambda: stages.actors, in_flight=3)
    try:
        lm = sharded_loaded_model(path, compiled)
        with lm.control.apply(disable), lm.control.record() as rec:
            got = torch.cat(lm.model.forward_many([lm.model.message(ids[i:i + 2])[0] for i in range(0, 8, 2)]))
        assert torch.equal(got, want)
        assert torch.equal(rec.counts().sum(0), want_rec.counts().sum(0))
        with torch.no_grad():
            want_gen = full.model.generate(ids[:4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(lm.model.generate(ids[:4], max_new_tokens=4, pad_token_id=0), want_gen)
    finally:
        compiled.close()


def _graph_monitors() -> list[threading.Thread]:
    """The threads by which Ray watches this process's compiled graphs (one per graph until it is torn down)."""
    return [t for t in threading.enumerate() if t.name == "CompiledGraphMonitorThread"]


def test_a_compiled_replica_whose_shard_died_is_rebuilt_and_closes_cleanly(ray_cluster, tmp_path):
    path = str(save_tiny_model("mixtral", tmp_path / "m"))
    stages = CompiledStages(lambda: start_shards({"shards": 2, "dtype": "float64", "num_cpus": 1}, path), in_flight=2)
    try:
        lm = sharded_loaded_model(path, stages)
        ids = torch.randint(7, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        want = lm.model(ids).logits
        old = list(stages.actors)
        os.kill(ray.get(old[1].pid.remote()), signal.SIGKILL)
        # Ray notices the death and tears the graph down: its channels closed, the next message
        # cannot even be sent; that error means a lost shard, as an actor error does for plain calls
        deadline = time.time() + 120
        while _graph_monitors() and time.time() < deadline:
            time.sleep(0.2)
        assert not _graph_monitors(), "Ray did not tear the graph down after its shard died"
        with pytest.raises(ray.exceptions.RayChannelError) as lost:
            lm.model(ids)
        assert isinstance(lost.value, stages.lost)
        stages.rebuild()  # the graph compiled anew over two new shard actors
        assert not set(stages.actors) & set(old)
        assert torch.equal(lm.model(ids).logits, want)
        assert len(_graph_monitors()) == 1
    finally:
        stages.close()
    # closed: the graph torn down here (no monitor thread left) and its actors stopped
    assert not _graph_monitors()
    for actor in stages.actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.pid.remote(), timeout=60)


def _tables(out, run_id):
    """Every result table of the run and its `units` (one row per committed unit: a unit done twice
    or lost shows), as sorted rows without the timings."""
    store, dropped = ResultStore(out), TIMINGS | {"finished_at"}  # and when each unit was committed
    return {t: sorted(json.dumps({k: v for k, v in r.items() if k not in dropped}, sort_keys=True, default=str)
                      for r in store.read_table(t, run_id=run_id).to_pylist()) for t in (*RESULT_TABLES, "units")}


def _my_shard_processes() -> list[int]:
    """Pids of ShardWorker processes descended from this test process (its own Ray's workers only)."""
    parent, title = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parent[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title[pid] = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    mine, found = {os.getpid()}, True
    while found:
        found = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                found = True
    return sorted(pid for pid in mine if "ShardWorker" in title.get(pid, ""))


def _shard_tasks_since(start: float) -> set[str]:
    """The methods of the ShardWorker tasks this Ray ran since `start` (epoch seconds), from its task
    events: `run` for each stage of a forward by plain actor calls, `__ray_call__` for a compiled
    graph's loops (its forwards run inside them)."""
    prefix = "task::ShardWorker."
    return {e["cat"].removeprefix(prefix) for e in ray.timeline()
            if e.get("cat", "").startswith(prefix) and e["ts"] >= start * 1e6}


def _kill_a_shard_once(out, run_id):
    """Kill one shard process (SIGKILL) once the run's first units have committed. `killed` gets
    its pid once a shard process that was not there before the kill is up: the replica was rebuilt
    mid-run, not merely lost after its last unit."""
    def kill():
        deadline = time.time() + 300
        victim, before = None, set()
        while time.time() < deadline and not killed:
            shards = _my_shard_processes()
            if victim is None:
                try:
                    done = ResultStore(out).read_table("units", run_id=run_id).num_rows
                except Exception:  # no units table yet
                    done = 0
                if done >= 3 and shards:
                    victim, before = shards[-1], set(shards)
                    os.kill(victim, signal.SIGKILL)
            elif set(shards) - before:
                killed.append(victim)
            time.sleep(0.2)

    killed: list[int] = []
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, tmp_path_factory):
    """The reduced quickstart, unsharded, run once as run "one": the result root every sharded run
    of these tests writes to as well, and whose tables they must give."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    out = str(tmp / "out")
    assert run_manifest(_manifest(tmp, run_id="one"), out=out, progress=False).complete
    return tmp, out


@pytest.mark.parametrize("transport", ["actors", "compiled"])
def test_sharded_quickstart_gives_the_same_tables_even_when_a_shard_dies(undisturbed, transport):
    tmp, out = undisturbed
    run_id = f"two-{transport}"
    models = f"  - {{name: sandbox, path: sandbox, dtype: float32, shards: 2, transport: {transport}}}"
    thread, killed = _kill_a_shard_once(out, run_id)
    start = time.time()
    # reuse=False: the sharded replica's units have the same content as run one's, so they would be copied
    summary = run_manifest(_manifest(tmp, run_id=run_id, models=models), out=out, progress=False, reuse=False)
    thread.join()
    assert killed, "the test should have killed a shard mid-run"
    assert summary.complete and summary.units_failed == 0
    assert _tables(out, run_id) == _tables(out, "one")
    units = ResultStore(out).read_table("units", run_id=run_id).column("unit_id").to_pylist()
    assert len(units) == len(set(units)), "a unit committed twice"
    tasks = _shard_tasks_since(start)  # the transport the manifest asked for is the one that ran
    assert ("run" in tasks, "__ray_call__" in tasks) == (transport == "actors", transport == "compiled"), tasks
    # the replica was released with the run: its shard actors (and a compiled graph's loops on them) gone
    deadline = time.time() + 60
    while _my_shard_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert not _my_shard_processes()
