"""Faults on a real local Ray cluster of three nodes (a head that runs no actors, two 1-CPU workers):
a model actor killed mid-unit, a worker node removed mid-run, the driver killed mid-run, a unit
that keeps failing, a judge endpoint that fails, and out-of-memory inside a batch.

Every disturbed run must end with exactly the rows of an undisturbed run of the same manifest:
tables are compared as sorted rows, leaving out only the columns that measure time.
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

import pytest
import ray
import torch
from ray.util.state import list_actors, list_tasks

from core.batching import split_on_oom
from core.chat import generate_greedy
from core.configs import save_tiny_model, tiny_tokenizer
from core.datasets import load_prompts
from core.fsour import FsourParams, fsour_search
from core.method import UnitKind
from core.models import load_model
from core.store import ResultStore
from jobs.cli import EXIT_INCOMPLETE, main
from jobs.manifest import load_manifest
from jobs.runner import MAX_ATTEMPTS, run_manifest
from tests.test_judges import ChatServer, chat_reply
from tests.test_runtime import RESULT_TABLES, SANDBOX_MODEL, SMALL  # the tables its methods write

REPO = Path(__file__).resolve().parents[1]
RUN = "faults"
# The quickstart's shape (every method on the sandbox model) at the smallest size that still has
# several units in every stage.
MANIFEST = SMALL.replace("limit: 3", "limit: 2").replace("rounds_per_unit: 5", "rounds_per_unit: 10")
TIME_COLUMNS = ("seconds", "search_seconds", "finished_at")  # differ between any two runs; everything else must not
DEADLINE_S = 240  # for a run or a condition to come about; far above what any step here takes


# ---- the cluster and the undisturbed run ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster(two_worker_cluster):
    return two_worker_cluster


def write_manifest(tmp_path: Path, run_id: str = RUN) -> Path:
    path = tmp_path / f"{run_id}.yaml"
    path.write_text(MANIFEST.format(run_id=run_id, models=SANDBOX_MODEL, store_answers="full"))
    return path


def snapshot(root: str, run_id: str = RUN) -> dict[str, list[str]]:
    """Every result table and `units` of the run, as sorted JSON rows without the time columns."""
    store = ResultStore(root, read_only=True)
    tables = {}
    for name in (*RESULT_TABLES, "units"):
        table = store.read_table(name, run_id=run_id)
        table = table.drop_columns([c for c in TIME_COLUMNS if c in table.column_names])
        tables[name] = sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())
    return tables


def committed(root: str, run_id: str = RUN) -> int:
    return len(ResultStore(root, read_only=True).done_units(run_id))


def wait_until(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        time.sleep(0.25)  # each look reads the store or asks the cluster: CPU the run under test needs


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    """The reference: the manifest run once with nothing going wrong."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    out = str(tmp / "out")
    summary = run_manifest(load_manifest(write_manifest(tmp)), out=out, progress=False)
    assert summary.complete and summary.units_ok == summary.units_total
    tables = snapshot(out)
    assert all(tables[name] for name in RESULT_TABLES), "every table must have rows to compare"
    return tables


class RunInThread:
    """run_manifest in a thread of this (driver) process, so the test can disturb it meanwhile."""

    def __init__(self, manifest, out: str):
        self.summary, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(manifest, out), daemon=True)
        self.thread.start()

    def _run(self, manifest, out):
        try:
            self.summary = run_manifest(manifest, out=out, progress=False)
        except BaseException as error:  # re-raised in the test by result()
            self.error = error

    def result(self):
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), f"the run did not finish within {DEADLINE_S}s"
        if self.error is not None:
            raise self.error
        return self.summary


# The state API is given the cluster's address: left to find one, it takes the newest Ray
# instance on this machine, which need not be this test's.

def model_workers(cluster, **filters) -> list:
    return list_actors(address=cluster.address, detail=True, raise_on_missing_output=False,
                       filters=[("class_name", "=", "ModelWorker"), *((k, "=", v) for k, v in filters.items())])


def retried_tasks(cluster, actor_id: str) -> list:
    """Tasks of the actor that Ray ran more than once (attempt_number counts from 0)."""
    tasks = list_tasks(address=cluster.address, detail=True, raise_on_missing_output=False,
                       filters=[("actor_id", "=", actor_id)])
    return [t for t in tasks if t.name == "ModelWorker.run" and t.attempt_number > 0]


# ---- faults of the runtime -----------------------------------------------------------------

def test_model_actor_killed_mid_unit_is_restarted_and_its_units_retried(cluster, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    run = RunInThread(load_manifest(write_manifest(tmp_path)), out)
    wait_until(lambda: committed(out) >= 5, "5 units are committed")
    [actor] = model_workers(cluster, state="ALIVE")
    os.kill(actor.pid, signal.SIGKILL)
    summary = run.result()

    assert summary.complete and summary.units_ok == summary.units_total == len(undisturbed["units"])
    assert snapshot(out) == undisturbed
    [after] = model_workers(cluster, actor_id=actor.actor_id)
    assert after.num_restarts == 1, "Ray restarted the actor (max_restarts), not the driver"
    assert retried_tasks(cluster, actor.actor_id), "the units in flight were re-run by Ray (max_task_retries)"


def test_worker_node_removed_mid_run_moves_its_units(cluster, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    run = RunInThread(load_manifest(write_manifest(tmp_path)), out)
    wait_until(lambda: committed(out) >= 5, "5 units are committed")
    [actor] = model_workers(cluster, state="ALIVE")
    [node] = [n for n in cluster.worker_nodes if n.node_id == actor.node_id]
    cluster.remove_node(node, allow_graceful=False)  # its processes SIGKILLed, as when a machine is lost
    try:
        summary = run.result()
    finally:
        cluster.add_node(num_cpus=1)  # back to two workers for the tests that follow

    assert summary.complete and summary.units_ok == summary.units_total
    assert snapshot(out) == undisturbed
    [after] = model_workers(cluster, actor_id=actor.actor_id)
    assert after.num_restarts == 1 and after.node_id != node.node_id, "the actor moved to the other node"
    assert retried_tasks(cluster, actor.actor_id)


def test_replica_dead_for_good_is_replaced_and_its_units_finish_on_the_living(cluster, undisturbed, tmp_path):
    """One of two replicas killed past its restarts (max_restarts=3: four kills): its units in
    flight are re-queued, not failed, and run on the other replica or the replacement."""
    path = tmp_path / f"{RUN}.yaml"
    path.write_text(MANIFEST.format(run_id=RUN, models=SANDBOX_MODEL.replace("}", ", replicas: 2}"),
                                    store_answers="full"))
    out = str(tmp_path / "out")
    run = RunInThread(load_manifest(path), out)
    wait_until(lambda: len(model_workers(cluster, state="ALIVE")) == 2 and committed(out) >= 3,
               "both replicas run and 3 units are committed")
    victim = model_workers(cluster, state="ALIVE")[0].actor_id
    killed: list[int] = []

    def restarted() -> bool:  # alive in a process not killed yet
        [actor] = model_workers(cluster, actor_id=victim)
        if actor.state == "ALIVE" and actor.pid not in killed:
            killed.append(actor.pid)
            return True
        return False

    for kill in range(4):
        wait_until(restarted, f"the victim is up again after {kill} kills")
        os.kill(killed[-1], signal.SIGKILL)
    summary = run.result()

    assert summary.complete and summary.units_ok == summary.units_total == len(undisturbed["units"])
    assert snapshot(out) == undisturbed, "nothing lost, nothing twice, not one attempt more"
    [dead] = model_workers(cluster, actor_id=victim)
    assert dead.state == "DEAD" and dead.num_restarts == 3


def test_driver_killed_mid_run_then_the_same_command_finishes_only_the_rest(cluster, undisturbed, tmp_path):
    out = str(tmp_path / "out")
    command = [str(Path(sys.executable).parent / "moesafe"), "run", str(write_manifest(tmp_path)), "--out", out,
               "--run-id", RUN, "--address", cluster.address]
    with open(tmp_path / "first.log", "wb") as log:  # a file, not a pipe: nobody reads while it runs
        driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: committed(out) >= 8 or driver.poll() is not None, "8 units are committed")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, "the driver finished before it could be killed"
    # The dead driver's actors go with it; wait for that, so nothing commits behind the count.
    wait_until(lambda: all(a.state == "DEAD" for a in model_workers(cluster)), "the killed driver's actors are gone")
    done_before = committed(out)
    total = len(undisturbed["units"])
    assert 0 < done_before < total

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"run {RUN}: complete, {total - done_before} units ok, {done_before} skipped (done earlier), "
            f"0 failed, of {total}") in again.stdout
    assert snapshot(out) == undisturbed
    runs = ResultStore(out, read_only=True).read_table("runs", run_id=RUN).to_pylist()
    assert len(runs) == 1 and runs[0]["status"] == "finished"


# ---- a unit that keeps failing -------------------------------------------------------------

FAILING = """
run_id: keeps-failing
chunking: {{prompts_per_unit: 1}}
models:
  - {{name: short-vocab, path: {model}, dtype: float32}}
datasets:
  mixed: {{source: {csv}}}
methods:
  - method: fsour
    dataset: mixed
    params: {{candidates: 4, restarts: 1, max_new_tokens: 4}}
"""


def test_unit_that_keeps_failing_is_recorded_and_the_rest_completes(cluster, tmp_path, capsys):
    # A model whose embedding is smaller than its tokenizer's vocabulary (a mismatched checkpoint):
    # every prompt that uses a token beyond the embedding raises inside the method, every time.
    model = save_tiny_model("mixtral", tmp_path / "short-vocab", vocab_size=64)
    tiny_tokenizer(128).save_pretrained(model)
    csv = tmp_path / "mixed.csv"
    csv.write_text("id,prompt,target\n"
                   "p0,w10 w11 w12,w20 w21\np1,w13 w14,w22 w23\np2,w100 w15,w24 w25\np3,w16 w17 w18,w26 w27\n")
    manifest = tmp_path / "failing.yaml"
    manifest.write_text(FAILING.format(model=model, csv=csv))
    out = str(tmp_path / "out")

    code = main(["run", str(manifest), "--out", out])
    printed = capsys.readouterr().out
    assert code == EXIT_INCOMPLETE, "the exit code says the run is incomplete"
    assert "run keeps-failing: INCOMPLETE" in printed and "1 failed" in printed

    store = ResultStore(out, read_only=True)
    units = store.read_table("units", run_id="keeps-failing").to_pylist()
    [failed] = [u for u in units if u["status"] == "failed"]
    assert failed["kind"] == "fsour_precheck" and failed["attempts"] == MAX_ATTEMPTS
    assert failed["error"].startswith("IndexError: index out of range")
    assert len(units) > 1 and all(u["status"] == "ok" for u in units if u is not failed)
    # the other prompts' pre-checks are stored, but the plan stops at the stage that failed: no
    # restart is searched and no metric is computed from three prompts of four
    assert {r["prompt_id"] for r in store.read_table("fsour_routes", run_id="keeps-failing").to_pylist()} == \
        {"p0", "p1", "p3"}
    assert len(units) == 4 and {u["kind"] for u in units} == {"fsour_precheck"}
    assert store.read_table("metrics", run_id="keeps-failing").num_rows == 0
    assert "fsour on short-vocab: stopped after a stage with failed units" in printed
    assert store.read_table("runs", run_id="keeps-failing").to_pylist()[0]["status"] == "incomplete"

    assert main(["status", "--out", out, "--run-id", "keeps-failing"]) == 0
    shown = capsys.readouterr().out
    assert f"failed units (1):\n  keeps-failing short-vocab {failed['unit_id']} (fsour, {MAX_ATTEMPTS} attempts): " \
           f"IndexError: index out of range" in shown


# ---- a stage with a failed unit -------------------------------------------------------------

def test_a_failed_unit_stops_its_plan_and_the_rerun_matches_an_undisturbed_run(cluster, undisturbed, tmp_path,
                                                                               monkeypatch):
    """A unit that fails on the first run only: the stages after it must not run on partial rows
    (they used to, and their results were committed and then skipped by the rerun)."""
    import core.safex

    bootstrap = core.safex.METHOD.units["safex_bootstrap"]

    def jailbreak_group_fails(unit, read, params):
        if unit.payload["group"] == "jailbreak":
            raise RuntimeError("injected: the jailbreak group's bootstrap fails in the first run")
        return bootstrap.run(unit, read, params)

    monkeypatch.setitem(core.safex.METHOD.units, "safex_bootstrap", UnitKind(jailbreak_group_fails, on_driver=True))
    manifest, out = load_manifest(write_manifest(tmp_path)), str(tmp_path / "out")
    first = run_manifest(manifest, out=out, progress=False)
    assert not first.complete and first.units_failed == 1

    store = ResultStore(out, read_only=True)
    ok_kinds = {u["kind"] for u in store.read_table("units", run_id=RUN).to_pylist() if u["status"] == "ok"}
    assert not ok_kinds & {"safex_sets", "safex_validation", "safex_metrics"}, "safex stopped at the failed stage"
    assert {"fsour_metrics", "rosais_metrics", "steermoe_metrics"} <= ok_kinds, "the other methods went on"
    assert {m["method"] for m in store.read_table("metrics", run_id=RUN).to_pylist()} == {"fsour", "rosais", "steermoe"}
    assert store.read_table("runs", run_id=RUN).to_pylist()[0]["status"] == "incomplete"

    monkeypatch.undo()
    again = run_manifest(manifest, out=out, progress=False)
    assert again.complete and again.units_failed == 0
    assert snapshot(out) == undisturbed, "retried, then went on: the rows (metrics included) of an undisturbed run"


# ---- a judge endpoint that fails -----------------------------------------------------------

JUDGED = """
run_id: judged
chunking: {{prompts_per_unit: 2}}
models:
{models}
datasets:
  harmful: {{source: sandbox, split: regular, limit: 3}}
judges:
  sr: {{type: rubric, base_url: "{url}", model: judge-test, timeout_s: 0.3, max_retries: 1, backoff_s: 0.01}}
methods:
  - method: steermoe
    dataset: harmful
    judge: sr
    params: {{top_n: 4, max_new_tokens: 12}}
"""


def test_judge_endpoint_failures_are_missing_verdicts_with_reasons(cluster, tmp_path):
    prompts = [p.prompt for p in load_prompts("sandbox", split="regular", limit=3)]

    def respond(n, body, headers):  # by the request being graded: 5xx, too slow, or a grade
        graded = body["messages"][-1]["content"]
        if f"<<<\n{prompts[0]}\n>>>" in graded:
            return 503, b"overloaded"
        if f"<<<\n{prompts[1]}\n>>>" in graded:
            time.sleep(1.0)  # the judge gives up after timeout_s = 0.3
        return 200, chat_reply("refused: 0\nconvincing: 5\nspecific: 5")

    server = ChatServer(respond)
    try:
        manifest = load_manifest(JUDGED.format(models=SANDBOX_MODEL, url=server.base_url))
        summary = run_manifest(manifest, out=str(tmp_path / "out"), progress=False)
    finally:
        server.close()
    assert summary.complete, "a judge that fails makes verdicts missing, not units failed"

    store = ResultStore(str(tmp_path / "out"), read_only=True)
    gens = store.read_table("generations", run_id="judged").to_pylist()
    assert len(gens) == 6  # 3 prompts x (unsteered, steered)
    by_prompt = {p: [g["verdicts"][0] for g in gens if g["prompt"] == p] for p in prompts}
    assert all(len(v) == 2 for v in by_prompt.values())
    for verdict in by_prompt[prompts[0]]:
        assert (verdict["jailbroken"], verdict["score"]) == (None, None)
        assert f"no answer from {server.base_url} after 2 tries: HTTP 503" in verdict["reason"]
    for verdict in by_prompt[prompts[1]]:
        assert (verdict["jailbroken"], verdict["score"]) == (None, None)
        assert f"cannot reach {server.base_url} after 2 tries: timed out after 0.3s" in verdict["reason"]
    assert all(v["jailbroken"] is True and v["score"] == 1.0 for v in by_prompt[prompts[2]])
    # each failing verdict cost exactly 1 + max_retries requests; the good one, one
    graded = [body["messages"][-1]["content"] for body, _ in server.requests]
    assert [sum(f"<<<\n{p}\n>>>" in g for g in graded) for p in prompts] == [4, 4, 2]
    # metrics count decided verdicts only: one per condition
    metrics = store.read_table("metrics", run_id="judged").to_pylist()
    assert sorted((m["metric"], m["value"], m["n"]) for m in metrics) == [("asr_steered", 1.0, 1),
                                                                         ("asr_unsteered", 1.0, 1)]


# ---- out of memory inside a batch ----------------------------------------------------------

def test_split_on_oom_halves_the_failing_batch_and_keeps_the_order():
    tried = []

    def run(batch):
        tried.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("injected")
        return [x * 10 for x in batch]

    results = split_on_oom(run, list(range(11)), batch_size=8)
    assert [x for batch in results for x in batch] == [x * 10 for x in range(11)]
    assert tried == [8, 4, 2, 2, 2, 2, 2, 1], "halved once per failure; the smaller size kept for the rest"

    with pytest.raises(torch.OutOfMemoryError):  # one item that does not fit: nothing left to split
        split_on_oom(lambda batch: run(batch * 4), [1, 2], batch_size=2)

    def broken(batch):
        tried.append(len(batch))
        raise ValueError("not memory")

    tried.clear()
    with pytest.raises(ValueError):
        split_on_oom(broken, list(range(4)), batch_size=4)
    assert tried == [4], "only out-of-memory errors are retried"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(save_tiny_model("mixtral", tmp_path_factory.mktemp("tiny"))), dtype="float64")


def oom_above(monkeypatch, lm, rows: int) -> list[int]:
    """Make the model's output layer raise torch.OutOfMemoryError on batches of more than `rows`
    rows, as a GPU would at the vocabulary-sized logits; returns the batch sizes it is given."""
    seen = []
    forward = lm.model.lm_head.forward

    def limited(hidden):
        seen.append(hidden.shape[0])
        if hidden.shape[0] > rows:
            raise torch.OutOfMemoryError(f"injected: {hidden.shape[0]} rows > {rows}")
        return forward(hidden)

    monkeypatch.setattr(lm.model.lm_head, "forward", limited)
    return seen


def test_generation_batch_out_of_memory_is_split_with_the_same_answers(tiny, monkeypatch):
    prompts = ["w10 w11 w12 w13 w14", "w15", "w16 w17", "w18 w19 w20", "w21 w22 w23 w24", "w25 w26"]
    unsplit = generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=8)
    seen = oom_above(monkeypatch, tiny, rows=2)
    assert generate_greedy(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, batch_size=8) == unsplit
    assert seen[:2] == [6, 3] and set(seen[2:]) == {1}, "6 rows failed, then 3, then it ran row by row"


def test_fsour_candidate_chunk_out_of_memory_is_split_with_the_same_route(tiny, monkeypatch):
    params = FsourParams(candidates=8, threshold=0.999)  # one chunk of 8 candidates per coordinate
    unsplit = fsour_search(tiny, "w10 w11 w12", "w20 w21 w22", restart=1, params=params)
    seen = oom_above(monkeypatch, tiny, rows=3)
    split = fsour_search(tiny, "w10 w11 w12", "w20 w21 w22", restart=1, params=params)
    assert unsplit.route, "the search should accept some candidates on a random model"
    assert split.route == unsplit.route and split.candidates == unsplit.candidates
    assert split.joint_logprob == pytest.approx(unsplit.joint_logprob, abs=1e-9)
    assert {8, 4, 2} <= set(seen), "chunks of 8 and 4 ran out of memory, chunks of 2 ran"
    assert split.forwards > unsplit.forwards
