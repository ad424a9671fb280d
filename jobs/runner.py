"""The scheduler: manifest -> work units -> model actors -> rows in the store.

One driver loop fills the cluster. Models start (their actors created and loaded) while their
resources fit, and retire when all their units are done, so a sweep with more models than GPUs
runs them in turn and keeps every GPU busy while work remains. Each actor gets a short queue of
units; results stream to the store from the actors; the driver keeps only unit statuses.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray

from core.method import PlanContext, WorkUnit
from core.methods import get_method
from core.models import describe_model, resolve_model_path
from core.schemas import RESULT_TABLES, UNITS_TABLE, table_schema
from core.store import ResultStore, model_slug
from jobs.errors import TOKEN_HELP, CliError
from jobs.execute import execute_driver_unit
from jobs.progress import RunProgress

UNITS_PER_ACTOR = 2  # in flight per actor: one running, one queued, so the actor never waits on the driver
MAX_ATTEMPTS = 3  # a unit that raises this many times is recorded as failed
CONNECT_TIMEOUT_S = 10.0  # to reach a cluster's address: ray.init itself waits on one for minutes


class RunError(CliError, RuntimeError):
    """The run cannot start or go on as asked (cluster, resources, run id): bad input, so
    `moesafe run` reports it on one line and exits 2."""


@dataclass
class RunSummary:
    run_id: str
    out: str
    units_total: int = 0
    units_ok: int = 0
    units_failed: int = 0
    units_skipped: int = 0  # done in an earlier attempt of this run
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.units_failed == 0


@dataclass
class _Plan:
    ctx: PlanContext
    stages: Iterator[list[WorkUnit]]
    pending: set[str] = field(default_factory=set)
    failed: bool = False  # a unit of the current stage failed: the plan goes no further this attempt
    finished: bool = False
    stage: int = 0  # stages yielded so far


@dataclass
class _Model:
    entry: Any  # the manifest's model entry
    key: dict[str, Any]
    plans: list[_Plan]
    need_gpus: float
    need_cpus: float
    actors: list = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # (unit, attempt, plan)
    in_flight: dict = field(default_factory=dict)  # object ref -> (unit, attempt, plan, actor)
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # done in an earlier attempt of this run

    @property
    def done(self) -> bool:
        return all(p.finished for p in self.plans) and not self.queue and not self.in_flight


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (default: RAY_ADDRESS, which Ray jobs set), or start a local
    one sized to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RunError(f"cannot reach the Ray cluster at {address!r}: {e}. "
                           "Start it (`ray start --head`) "
                           "or leave out --address (and unset RAY_ADDRESS) to run on a local cluster") from e
    else:  # "local": a new instance even when another one runs on this machine (ray.init would join it)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


def _check_reachable(address: str) -> None:
    """RunError naming `address` unless something accepts connections there ("auto" and other
    addresses without a port are left to Ray, which resolves them)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RunError(f"cannot reach the Ray cluster at {address!r}: nothing answers at {host}:{port} "
                       f"({e.strerror or type(e).__name__}). Start it (`ray start --head`), check the "
                       "address, or leave out --address (and unset RAY_ADDRESS) to run on a local cluster") from None
    if not address.startswith("ray://"):  # the Ray client port speaks another protocol
        _check_token_accepted(address, f"{host}:{port}")


def _check_token_accepted(address: str, target: str) -> None:
    """RunError saying a token is needed when the cluster's GCS refuses this process's credentials
    (ray.init would retry for half a minute of warnings, then call the cluster unreachable)."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import \
        _get_authentication_metadata_tuple
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT_S,
                metadata=_get_authentication_metadata_tuple())
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise RunError(TOKEN_HELP.format(address=address)) from None
            # anything else: ray.init reports it


class Scheduler:
    def __init__(self, manifest, store: ResultStore, run_id: str, progress: bool = True):
        self.manifest, self.store, self.run_id = manifest, store, run_id
        self.done_before = store.done_units(run_id)
        self.summary = RunSummary(run_id, store.root)
        self.bar = RunProgress(run_id, progress)
        # records carry the manifest's dataset name, so every table is keyed by what the user named
        self.prompts = {name: [dataclasses.replace(p, dataset=name) for p in spec.load()]
                        for name, spec in manifest.datasets.items()}
        self.judges = self._start_judges()

    # -- setup -------------------------------------------------------------------------------
    def _start_judges(self) -> dict[str, Any]:
        """name -> settings (built inside each model actor) or a JudgeWorker handle (classifier)."""
        from actors.judge_worker import JudgeWorker

        judges: dict[str, Any] = {}
        for name, spec in self.manifest.judges.items():
            settings = {"name": spec.type, **spec.settings}
            if spec.type == "classifier":  # a judge model: its own actor, on a GPU when the cluster has one
                gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
                judges[name] = JudgeWorker.options(num_gpus=gpus).remote(settings)
            else:
                judges[name] = settings
        return judges

    def _model(self, entry) -> _Model | None:
        shape = describe_model(resolve_model_path(entry.path), entry.trust_remote_code)
        key = {"name": entry.name, "path": entry.path, "dtype": entry.dtype,
               "experts_implementation": entry.experts_implementation, "num_layers": shape.num_layers,
               "num_experts": shape.num_experts}
        slug = model_slug(entry.name)
        plans = []
        for m in self.manifest.methods:
            if m.models and entry.name not in m.models:
                continue
            params = m.build_params()
            roles = m.roles()
            params_json = params.to_json()

            def read(table: str, params_json=params_json) -> list[dict]:
                rows = self.store.read_table(table, run_id=self.run_id, model=slug).to_pylist()
                return [r for r in rows if r.get("params") == params_json]

            ctx = PlanContext(key, m.method, params, m.judge_names,
                              {role: self.prompts[name] for role, name in roles.items()}, roles,
                              self.manifest.chunking.prompts_per_unit, self.manifest.chunking.rounds_per_unit,
                              shape.num_layers, read)
            plans.append(_Plan(ctx, get_method(m.method).stages(ctx)))
        if not plans:
            return None
        return _Model(entry, key, plans, entry.replica_gpus * entry.replicas, entry.replica_cpus * entry.replicas)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RunSummary:
        start = time.perf_counter()
        waiting = deque(m for m in map(self._model, self.manifest.models) if m is not None)
        active: list[_Model] = []
        while waiting or active:
            while waiting and self._fits(waiting[0], active):
                model = waiting.popleft()
                self._start(model, active)
                active.append(model)
            if not active:
                m = waiting[0]
                raise RunError(f"model {m.entry.name!r} needs {m.entry.replica_gpus} GPU(s) and "
                               f"{m.entry.replica_cpus} CPU(s) per replica; the cluster has {ray.cluster_resources()}")
            for model in active:
                self._advance(model)
                self._dispatch(model)
            if not waiting and all(plan.finished for model in active for plan in model.plans):
                self.bar.final()
            self._collect(active)
            for model in [m for m in active if m.done]:
                active.remove(model)
                for actor in model.actors:
                    ray.kill(actor)
                self.bar.write(f"model {model.entry.name}: {model.ok} units ok, {model.skipped} skipped (done "
                               f"earlier), {model.failed} failed")
        self.bar.close()
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    @staticmethod
    def _free(active: list[_Model]) -> tuple[float, float]:
        """(GPUs, CPUs) of the cluster not held by the running models' actors."""
        total = ray.cluster_resources()
        return (total.get("GPU", 0) - sum(m.need_gpus for m in active),
                total.get("CPU", 0) - sum(m.need_cpus for m in active))

    def _fits(self, model: _Model, active: list[_Model]) -> bool:
        """At least one replica fits beside the running models."""
        gpus, cpus = self._free(active)
        return model.entry.replica_gpus <= gpus + 1e-9 and model.entry.replica_cpus <= cpus + 1e-9

    def _start(self, model: _Model, active: list[_Model]) -> None:
        """Create as many of the model's replicas as fit now (at least one)."""
        from actors.model_worker import ModelWorker

        gpus, cpus = self._free(active)
        entry = model.entry
        fit = entry.replicas
        if entry.replica_gpus:
            fit = min(fit, int(gpus // entry.replica_gpus + 1e-9))
        if entry.replica_cpus:
            fit = min(fit, int(cpus // entry.replica_cpus + 1e-9))
        fit = max(1, fit)
        model.need_gpus, model.need_cpus = fit * entry.replica_gpus, fit * entry.replica_cpus
        # a sharded replica's resources are its shard actors'; its ModelWorker only drives them
        own_gpus, own_cpus = (0, 0) if entry.shards > 1 else (entry.num_gpus, entry.num_cpus)
        model.actors = [ModelWorker.options(num_gpus=own_gpus, num_cpus=own_cpus)
                        .remote(entry.model_dump(), self.judges, self.store.root, self.run_id,
                                self.manifest.store_answers)
                        for _ in range(fit)]

    def _advance(self, model: _Model) -> None:
        """Move every plan whose stage is complete to its next stage (reading the store). A stage
        with a failed unit ends its plan: later stages would read partial rows and commit results
        that look complete. The next attempt of the run retries the failed units and goes on."""
        for plan in model.plans:
            while not plan.finished and not plan.pending:
                label = f"{model.entry.name}/{plan.ctx.method}"
                if plan.failed:
                    plan.finished = True
                    self.bar.finished(label)
                    self.bar.write(f"{plan.ctx.method} on {model.entry.name}: stopped after a stage with failed "
                                   f"units; run the same command again to retry them and go on")
                    break
                try:
                    units = next(plan.stages)
                except StopIteration:
                    plan.finished = True
                    self.bar.finished(label)
                    break
                plan.ctx.upstream += [unit.unit_id for unit in units]  # what the next stages derive from
                plan.stage += 1
                self.bar.planned(label, plan.stage, len(units))
                self.summary.units_total += len(units)
                for unit in units:
                    if unit.unit_id in self.done_before:
                        self.summary.units_skipped += 1
                        model.skipped += 1
                        self.bar.done()
                    elif unit.on_driver:
                        self._run_on_driver(model, plan, unit)
                    else:
                        plan.pending.add(unit.unit_id)
                        model.queue.append((unit, 1, plan))

    def _run_on_driver(self, model: _Model, plan: _Plan, unit: WorkUnit) -> None:
        start = time.perf_counter()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                tables = execute_driver_unit(unit, plan.ctx.read)
                self.store.write_unit(self.run_id, unit.model, unit.unit_id, tables, {
                    "method": unit.method, "kind": unit.kind, "status": "ok", "attempts": attempt,
                    "seconds": time.perf_counter() - start, "error": None})
                self._finished(model, plan, unit, ok=True)
                return
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        self._record_failure(model, plan, unit, MAX_ATTEMPTS, time.perf_counter() - start, error)

    def _dispatch(self, model: _Model) -> None:
        for actor in model.actors:
            busy = sum(1 for _, _, _, a in model.in_flight.values() if a is actor)
            while busy < UNITS_PER_ACTOR and model.queue:
                unit, attempt, plan = model.queue.popleft()
                model.in_flight[actor.run.remote(unit, attempt)] = (unit, attempt, plan, actor)
                busy += 1

    def _collect(self, active: list[_Model]) -> None:
        refs = {ref: model for model in active for ref in model.in_flight}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
        for ref in ready:
            model = refs[ref]
            unit, attempt, plan, _ = model.in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died beyond its restarts
                result = {"status": "failed", "seconds": 0.0, "error": f"{type(e).__name__}: {e}"[:2000]}
            if result["status"] == "ok":
                self._finished(model, plan, unit, ok=True)
            elif attempt < MAX_ATTEMPTS:
                model.queue.append((unit, attempt + 1, plan))
            else:
                self._record_failure(model, plan, unit, attempt, result["seconds"], result["error"])

    def _record_failure(self, model, plan, unit, attempts, seconds, error) -> None:
        self.store.write_unit(self.run_id, unit.model, unit.unit_id, {}, {
            "method": unit.method, "kind": unit.kind, "status": "failed", "attempts": attempts,
            "seconds": seconds, "error": error})
        self.bar.write(f"unit {unit.unit_id} ({unit.model}) failed after {attempts} attempts: {error}")
        self._finished(model, plan, unit, ok=False)

    def _finished(self, model: _Model, plan: _Plan, unit: WorkUnit, ok: bool) -> None:
        plan.pending.discard(unit.unit_id)
        plan.failed |= not ok
        if ok:
            model.ok += 1
            self.summary.units_ok += 1
        else:
            model.failed += 1
            self.summary.units_failed += 1
        self.bar.done()


def run_manifest(manifest, *, out: str | None = None, run_id: str | None = None, address: str | None = None,
                 force_new_run: bool = False, progress: bool = True) -> RunSummary:
    """Run `manifest` to completion (or resume it: units already in `units` are skipped)."""
    from jobs.manifest import manifest_hash

    root = out or manifest.out
    store = ResultStore(root)
    run_id = run_id or manifest.run_id
    digest = manifest_hash(manifest)
    previous = store.read_table("runs", run_id=run_id).to_pylist()
    if previous:
        _check_schema(store, run_id)
    if previous and previous[0]["manifest_hash"] != digest:
        if not force_new_run:
            raise RunError(f"run id {run_id!r} already exists in {root!r} with a different manifest; use "
                           "another --run-id, or --force-new-run to start a new run under a derived id")
        run_id = f"{run_id}-{digest[:8]}"
    lease = store.acquire_run(run_id)  # before Ray: a second driver of this run is refused at once
    with lease.kept_alive():
        connect_ray(address)
        # the run id actually used (--run-id, --force-new-run), not the one the file named
        store.write_run(run_id, manifest.model_copy(update={"run_id": run_id}).to_yaml(), manifest_hash=digest)
        summary = Scheduler(manifest, store, run_id, progress).run()
        if lease.lost:
            raise RunError(str(lease.lost))
        store.finish_run(run_id, "finished" if summary.complete else "incomplete")
    return summary


def _check_schema(store: ResultStore, run_id: str) -> None:
    """RunError if the run's stored rows are in an older schema than this version writes: its
    units' ids and rows do not mean what they mean now, so it cannot be resumed."""
    for name in (UNITS_TABLE, *RESULT_TABLES):
        current = table_schema(name).version
        stored = store.read_table(name, run_id=run_id).column("schema_version").to_pylist()
        older = min(stored, default=current)
        if older < current:
            raise RunError(f"run id {run_id!r} in {store.root!r} was written by an older moesafe ({name} schema "
                           f"version {older}; this version writes {current}) and cannot be resumed: "
                           f"use another --run-id or another --out. Its results stay readable with moesafe query")
