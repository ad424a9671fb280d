"""The scheduler: manifest -> work units -> model actors -> rows in the store.

One driver loop fills the cluster. Each model replica is a Ray placement group (one bundle: the
replica's GPUs and CPUs, on one node) with its actor scheduled into it. Every model asks for its
replicas at once; Ray grants the groups that fit, and on an autoscaling cluster a pending group is
what makes the autoscaler add nodes. A model starts as soon as one of its replicas is placed, so a
model that waits for nodes does not hold back those that fit; models retire (their groups removed)
when all their units are done, so a sweep with more models than GPUs runs them in turn. Each actor
gets a short queue of units; results stream to the store from the actors; the driver keeps only
unit statuses. A replica whose actor is dead for good is replaced (a new group; its units in
flight re-queued), a bounded number of times.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.method import PlanContext, WorkUnit
from core.methods import get_method
from core.models import describe_model, resolve_model_path, sandbox_weights
from core.schemas import RESULT_TABLES, UNITS_TABLE, table_schema
from core.store import ResultStore, model_slug
from jobs.auth import TOKEN_HELP, use_ray_auth_token
from jobs.errors import CliError
from jobs.execute import execute_driver_unit
from jobs.progress import RunProgress

UNITS_PER_ACTOR = 2  # in flight per actor: one running, one queued, so the actor never waits on the driver
MAX_ATTEMPTS = 3  # a unit that raises this many times is recorded as failed
CONNECT_TIMEOUT_S = 10.0  # to reach a cluster's address: ray.init itself waits on one for minutes
WAIT_TIMEOUT_S = 30 * 60.0  # for nodes: how long a run waits with nothing placed before giving up
REPLACEMENTS_PER_REPLICA = 2  # dead-for-good actors replaced per replica, so a unit that kills every actor ends
WAIT_NOTICE_S = 5.0  # a wait for nodes longer than this is reported
PREFLIGHT_TIMEOUT_S = 120.0  # a judge's check (one request, or loading a judge model)
RELEASE_TIMEOUT_S = 120.0  # for a model actor to release its shard actors (a compiled graph waits on each)


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
    units_reused: int = 0  # computed by an earlier run under the same root: rows copied, not recomputed
    seconds: float = 0.0
    seconds_waiting: float = 0.0  # with nothing placed: waiting for the cluster to grow

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
class _Replica:
    group: Any  # its placement group
    requested: float = field(default_factory=time.monotonic)  # when the group was asked for
    actor: Any = None  # created once the group is placed
    ready: Any = None  # the group's ready() reference, asked for once

    def __post_init__(self):
        self.ready = self.group.ready()

    @property
    def placed(self) -> bool:
        done, _ = ray.wait([self.ready], timeout=0)
        return bool(done)


@dataclass
class _Model:
    entry: Any  # the manifest's model entry
    key: dict[str, Any]
    plans: list[_Plan]
    replicas: list[_Replica] = field(default_factory=list)
    requested: bool = False  # its replicas asked for
    replacements_left: int = 0
    lost: str | None = None  # why no replica is left, once none is
    judges_checked: bool = False  # its actors' judges passed their check on its first placed replica's node
    queue: deque = field(default_factory=deque)  # (unit, attempt, plan)
    in_flight: dict = field(default_factory=dict)  # object ref -> (unit, attempt, plan, actor)
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # done in an earlier attempt of this run

    @property
    def actors(self) -> list:
        return [r.actor for r in self.replicas if r.actor is not None]

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
    """When the cluster's GCS refuses this process's credentials, send Ray's token from where Ray
    keeps it (as `moesafe submit` does; Ray itself sends it only to a cluster it finds on its own),
    and RunError saying a token is needed if that does not do (ray.init would retry for half a
    minute of warnings, then call the cluster unreachable). A cluster without token authentication
    gets none: there, a driver switched to token mode saw every actor it started die at once."""
    if _gcs_refuses(target):
        use_ray_auth_token()
        if _gcs_refuses(target):
            raise RunError(TOKEN_HELP.format(address=address))


def _gcs_refuses(target: str) -> bool:
    """Whether the GCS at `target` answers UNAUTHENTICATED to this process's credentials (anything
    else is left to ray.init to report)."""
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
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


class Scheduler:
    def __init__(self, manifest, store: ResultStore, run_id: str, progress: bool = True,
                 wait_timeout_s: float = WAIT_TIMEOUT_S, reuse: bool = True):
        self.manifest, self.store, self.run_id = manifest, store, run_id
        self.wait_timeout_s = wait_timeout_s
        self.done_before = store.done_units(run_id)
        self.planned: set[str] = set()  # ids of the units every plan has yielded so far in this attempt
        self.reusable = store.units_done_elsewhere(run_id) if reuse else {}
        self.summary = RunSummary(run_id, store.root)
        self.bar = RunProgress(run_id, progress)
        # records carry the manifest's dataset name, so every table is keyed by what the user named
        self.prompts = {name: [dataclasses.replace(p, dataset=name) for p in spec.load()]
                        for name, spec in manifest.datasets.items()}
        self.groups: list = []  # every placement group this run asked for: removed when it ends
        self.waiting_since: float | None = None  # since when nothing of this run is placed
        self.wait_told = False  # the wait was reported
        self.judge_workers: dict[str, Any] = {}  # judge name -> its JudgeWorker's handle (classifiers)
        try:
            self.judges = self._start_judges()
        except BaseException:
            self._remove_groups()
            raise

    # -- setup -------------------------------------------------------------------------------
    def _start_judges(self) -> dict[str, Any]:
        """name -> settings (built inside each model actor) or a JudgeActor, the name of a
        JudgeWorker (classifier, in its own placement group, checked there now: it loads its model
        where it will judge); this runner holds the JudgeWorkers' handles while it runs.
        The other judges are checked where they run, in each model's first placed replica
        (`_check_judges_in`), before its actor starts: a bad key or endpoint stops the run before
        any generation."""
        from actors.judge_worker import JudgeActor, JudgeWorker

        judges: dict[str, Any] = {}
        checks = {}
        for name, spec in self.manifest.judges.items():
            settings = {"name": spec.type, **spec.settings}
            if spec.type == "classifier":  # a judge model: its own replica, counted like a model's
                bundle = {"CPU": 1.0, "GPU": self._classifier_gpus(settings.get("device", "auto"))}
                group = self._request_group(bundle)
                self._wait_placed(f"judge {name!r}", [_Replica(group)])
                judges[name] = JudgeActor(f"moesafe-judge-{self.run_id}-{name}-{uuid.uuid4().hex[:8]}",
                                          ray.get_runtime_context().namespace)
                self.judge_workers[name] = JudgeWorker.options(
                    name=judges[name].name, namespace=judges[name].namespace, **self._in_group(bundle, group),
                ).remote(settings)
                checks[name] = self.judge_workers[name].check.remote()
            else:
                judges[name] = settings
        self._await_checks(checks)
        return judges

    def _check_judges_in(self, model: _Model, group) -> None:
        """Check the judges that model actors build (all but classifiers) on the node of `model`'s
        placed replica `group`: that node's environment (keys given to worker nodes only, or by
        the job's runtime env) is what they will see, not the head's or the driver's."""
        where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        self._await_checks({name: _check_judge.options(scheduling_strategy=where).remote(settings)
                            for name, settings in self.judges.items() if isinstance(settings, dict)},
                           f" (on the node of model {model.entry.name!r})")
        model.judges_checked = True

    def _await_checks(self, checks: dict[str, Any], where: str = "") -> None:
        for name, ref in checks.items():
            try:
                ray.get(ref, timeout=PREFLIGHT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise RunError(f"judge {name!r} did not pass its check within {PREFLIGHT_TIMEOUT_S:.0f} s on the "
                               "cluster: is its endpoint reachable from the cluster's nodes?") from None
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise RunError(f"judge {name!r} ({self.manifest.judges[name].type}) failed its check on the "
                               f"cluster{where}, before any generation: {cause}") from None

    @staticmethod
    def _classifier_gpus(device: str) -> float:
        if device == "cpu":
            return 0.0
        if device == "auto":  # a GPU when the cluster has one now; "cuda" waits for one
            return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        return 1.0

    def _model(self, entry) -> _Model | None:
        resolved = resolve_model_path(entry.path)
        shape = describe_model(resolved, entry.trust_remote_code, entry.revision)
        key = {"name": entry.name, "path": entry.path, "revision": entry.revision, "dtype": entry.dtype,
               "experts_implementation": entry.experts_implementation, "num_layers": shape.num_layers,
               "num_experts": shape.num_experts}
        weights = sandbox_weights(entry.path, resolved)
        if weights is not None:  # the sandbox only: another CPU's build is another model under its name
            key["weights_sha256"] = weights
        slug = model_slug(entry.name)
        plans = []
        for m in self.manifest.methods:
            if m.models and entry.name not in m.models:
                continue
            ctx = self._context(key, slug, m.method, m.build_params(), m.judge_names, m.roles())
            plans.append(_Plan(ctx, get_method(m.method).stages(ctx)))
        if not plans:
            return None
        return _Model(entry, key, plans, replacements_left=REPLACEMENTS_PER_REPLICA * entry.replicas)

    # -- the loop ----------------------------------------------------------------------------
    def _context(self, key: dict, slug: str, method: str, params, judge_names: tuple[str, ...],
                 roles: dict[str, str]) -> PlanContext:
        """The plan context of a method entry on one model; `derive` gives the same for another
        method a plan builds on (core.method.derived), so those units are that entry's units."""
        params_json = params.to_json()

        def read(table: str) -> list[dict]:
            # Rows of the units this plan planned, not every row of these params: another entry of
            # the method with other judges (or a method nesting its stages under its own judges)
            # writes rows of the same prompts and params, which would decide this plan's next stage
            # by whichever committed first and count each prompt twice in its metrics.
            planned = set(ctx.upstream)
            rows = self.store.read_table(table, run_id=self.run_id, model=slug).to_pylist()
            return [r for r in rows if r.get("params") == params_json and r["unit_id"] in planned]

        def derive(other: str, other_params, other_roles) -> PlanContext:
            return self._context(key, slug, other, other_params, judge_names, dict(other_roles))

        prompts = {role: self.prompts[name] for role, name in roles.items()}
        # Unit ids hash the model key: with the prompts' texts and the judges' settings in it, a
        # unit id names its whole content, so another run's unit of the same id can be reused.
        content = _digest({"prompts": {role: [dataclasses.asdict(p) for p in ps] for role, ps in prompts.items()},
                           "judges": [self.manifest.judges[name].model_dump() for name in judge_names]})
        ctx = PlanContext({**key, "content": content}, method, params, judge_names, prompts, roles,
                          self.manifest.chunking.prompts_per_unit, self.manifest.chunking.rounds_per_unit,
                          key["num_layers"], read, derive=derive)
        return ctx

    def run(self) -> RunSummary:
        start = time.perf_counter()
        try:
            active = [m for m in map(self._model, self.manifest.models) if m is not None]
            while active:
                self._place(active)
                for model in active:
                    self._advance(model)
                    self._dispatch(model)
                if all(plan.finished for model in active for plan in model.plans):
                    self.bar.final()
                self._collect(active)
                for model in [m for m in active if m.done]:
                    active.remove(model)
                    self._retire(model)
                    self.bar.write(f"model {model.entry.name}: {model.ok} units ok, {model.skipped} skipped "
                                   f"(done earlier), {model.failed} failed")
        finally:
            self._remove_groups()
            self.bar.close()
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    # -- replicas: placement groups and their actors -------------------------------------------
    def _remove_groups(self) -> None:
        for group in self.groups:
            remove_placement_group(group)
        self.groups = []

    @staticmethod
    def _bundle(entry) -> dict[str, float]:
        """The resources of one actor of a replica: the whole replica, or one of its `shards`."""
        bundle = {"CPU": float(entry.num_cpus)}
        if entry.num_gpus:
            bundle["GPU"] = float(entry.num_gpus)
        return bundle

    def _model_worker(self, worker_class, entry, group, weights_sha256: str | None = None):
        """A replica's ModelWorker in its placed group. A sharded replica's resources are its
        shard actors' (one bundle each); its ModelWorker only drives them and holds none.
        `weights_sha256`: the sandbox build the run planned with, which the worker checks its own against."""
        args = ({**entry.model_dump(), "weights_sha256": weights_sha256}, self.judges, self.store.root, self.run_id,
                self.manifest.store_answers)
        if entry.shards > 1:
            return worker_class.options(num_cpus=0, num_gpus=0).remote(*args, placement_group=group)
        return worker_class.options(**self._in_group(self._bundle(entry), group)).remote(*args)

    @staticmethod
    def _in_group(bundle: dict[str, float], group) -> dict[str, Any]:
        """Actor options that take the whole of the group's one bundle."""
        return {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)}

    def _request_group(self, bundle: dict[str, float], count: int = 1):
        """A placement group of `count` such bundles. One bundle (a whole replica, or a judge): STRICT_PACK,
        its GPUs and CPUs on one node. A sharded replica's bundle per shard: PACK, on as few nodes as
        hold it, across nodes when one node cannot."""
        group = placement_group([{k: v for k, v in bundle.items() if v}] * count,
                                strategy="STRICT_PACK" if count == 1 else "PACK")
        self.groups.append(group)
        return group

    def _add_replica(self, model: _Model) -> None:
        model.replicas.append(_Replica(self._request_group(self._bundle(model.entry), model.entry.shards)))

    def _place(self, active: list[_Model]) -> None:
        """Start the actors of replicas whose groups Ray has placed; report, and bound, the wait
        while no replica of any model is placed (only the cluster growing can help then)."""
        from actors.model_worker import ModelWorker

        for model in active:
            if model.queue and not model.requested:  # asked for once it has work: reused units need none
                model.requested = True
                for _ in range(model.entry.replicas):
                    self._add_replica(model)
            for replica in model.replicas:
                if replica.actor is None and replica.placed:
                    if not model.judges_checked:
                        self._check_judges_in(model, replica.group)
                    replica.actor = self._model_worker(ModelWorker, model.entry, replica.group,
                                                       model.key.get("weights_sha256"))
        running = any(m.actors for m in active)
        if running:
            self._end_wait()
        waiting = [(m, r) for m in active for r in m.replicas if r.actor is None]
        self.bar.waiting(_waiting_line([r for _, r in waiting], running) if waiting else "")
        if waiting and not running:
            self._check_wait(f"model {waiting[0][0].entry.name!r}", [r for _, r in waiting])

    def _wait_placed(self, what: str, replicas: list[_Replica]) -> None:
        """Block until one of `replicas` is placed (the judges, which the models need first)."""
        while not any(r.placed for r in replicas):
            self._check_wait(what, replicas)
            time.sleep(1.0)
        self._end_wait()

    def _end_wait(self) -> None:
        if self.waiting_since is not None:
            waited = time.monotonic() - self.waiting_since
            self.summary.seconds_waiting += waited
            self.waiting_since = None
            if self.wait_told:
                self.bar.write(f"placed after waiting {waited:.0f} s for the cluster")

    def _check_wait(self, what: str, replicas: list[_Replica]) -> None:
        """Nothing of this run is placed: only the cluster growing can help. Give up after the
        wait timeout, counted from when nothing was placed (not from the request: a model that
        waits behind a running one is not stuck)."""
        if self.waiting_since is None:
            self.waiting_since, self.wait_told = time.monotonic(), False
        waited = time.monotonic() - self.waiting_since
        if waited > WAIT_NOTICE_S and not self.wait_told:  # not for the moment a placement takes
            self.wait_told = True
            self.bar.write(f"{what}: {_waiting_line(replicas)}")
        if waited > self.wait_timeout_s:
            bundle = placement_group_table(replicas[0].group)["bundles"][0]
            has = _resources(ray.cluster_resources()) or "no CPU or GPU"
            raise RunError(
                f"{what}: waited {waited / 60:.1f} min for {len(replicas)} x {_resources(bundle)} and the cluster "
                f"has not placed one (its nodes have {has} in all). No node type offers "
                "that much on one node, the autoscaler is at max_workers, or the cloud has no capacity now. "
                "Give the cluster such a node type, lower num_gpus/num_cpus, or wait longer (--wait-timeout)")

    def _retire(self, model: _Model) -> None:
        for replica in model.replicas:
            if replica.actor is not None:
                _release(replica.actor)
            remove_placement_group(replica.group)
            self.groups.remove(replica.group)
        model.replicas = []

    def _replace(self, model: _Model, dead) -> None:
        """The actor `dead` is dead for good: re-queue its units in flight (the death is not theirs
        to count), drop its group, and ask for a new replica while replacements are left."""
        lost = [ref for ref, (_, _, _, actor) in model.in_flight.items() if actor is dead]
        for ref in lost:
            unit, attempt, plan, _ = model.in_flight.pop(ref)
            model.queue.appendleft((unit, attempt, plan))
        [replica] = [r for r in model.replicas if r.actor is dead]
        ray.kill(dead)
        remove_placement_group(replica.group)
        self.groups.remove(replica.group)
        model.replicas.remove(replica)
        if model.replacements_left:
            model.replacements_left -= 1
            self._add_replica(model)
            self.bar.write(f"model {model.entry.name}: a replica's actor died for good; {len(lost)} unit(s) "
                           f"re-queued, a new replica asked for")
        elif not model.replicas:
            model.lost = (f"every replica of model {model.entry.name!r} died, and its "
                          f"{REPLACEMENTS_PER_REPLICA * model.entry.replicas} replacements are used up")

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
                # a unit another plan planned too (core.method.derived) runs and counts once
                shared = {u.unit_id for u in units if u.unit_id in self.planned}
                self.planned |= {u.unit_id for u in units}
                self.bar.planned(label, plan.stage, len(units) - len(shared))
                self.summary.units_total += len(units) - len(shared)
                for unit in units:
                    if unit.unit_id in shared:
                        if any(unit.unit_id in other.pending for other in model.plans):
                            plan.pending.add(unit.unit_id)  # wait for it
                        elif unit.unit_id not in self.done_before:
                            plan.failed = True  # it failed for the other plan in this attempt
                    elif unit.unit_id in self.done_before:
                        self.summary.units_skipped += 1
                        model.skipped += 1
                        self.bar.done()
                    elif self._reused(unit):
                        self.bar.done()
                    elif unit.on_driver:
                        self._run_on_driver(model, plan, unit)
                    else:
                        plan.pending.add(unit.unit_id)
                        model.queue.append((unit, 1, plan))

    def _reused(self, unit: WorkUnit) -> bool:
        """Commit `unit` by copying its rows if another run under this root computed it (its id
        hashes all its content, see _model); False if none did."""
        source = self.reusable.get((model_slug(unit.model), unit.unit_id))
        if source is None:
            return False
        self.store.reuse_unit(source, self.run_id, unit.model, unit.unit_id)
        self.summary.units_reused += 1
        self.done_before.add(unit.unit_id)  # done here now, for any other plan that plans it
        return True

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
        while model.lost and model.queue:  # no replica left to run them (see _replace)
            unit, attempt, plan = model.queue.popleft()
            self._record_failure(model, plan, unit, attempt, 0.0, model.lost)
        for actor in model.actors:
            busy = sum(1 for _, _, _, a in model.in_flight.values() if a is actor)
            while busy < UNITS_PER_ACTOR and model.queue:
                unit, attempt, plan = model.queue.popleft()
                model.in_flight[actor.run.remote(unit, attempt)] = (unit, attempt, plan, actor)
                busy += 1

    def _collect(self, active: list[_Model]) -> None:
        refs = {ref: model for model in active for ref in model.in_flight}
        if not refs:  # waiting for replicas to be placed
            time.sleep(0.2)
            return
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
        for ref in ready:
            model = refs[ref]
            unit, attempt, plan, actor = model.in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorDiedError:  # beyond its restarts: every later call would fail at once
                model.in_flight[ref] = (unit, attempt, plan, actor)
                self._replace(model, actor)
                continue
            except ray.exceptions.RayError as e:
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
        plan.failed |= not ok  # a driver unit runs inside _advance and is in no plan's pending set
        for waiting in model.plans:  # every plan that planned this unit
            if unit.unit_id in waiting.pending:
                waiting.pending.discard(unit.unit_id)
                waiting.failed |= not ok
        if ok:
            self.done_before.add(unit.unit_id)  # a plan that plans it later in this run skips it
            model.ok += 1
            self.summary.units_ok += 1
        else:
            model.failed += 1
            self.summary.units_failed += 1
        self.bar.done()


def _release(actor) -> None:
    """Kill a model actor once it has released what it drives (a sharded replica's shard actors,
    a compiled graph torn down); one that is dead or does not answer is killed all the same."""
    try:
        ray.get(actor.close.remote(), timeout=RELEASE_TIMEOUT_S)
    except Exception:  # dead, restarting or stuck: the kill below ends it either way
        pass
    ray.kill(actor)


@ray.remote(num_cpus=0, max_retries=0)
def _check_judge(settings: dict[str, Any]) -> None:
    """A judge's preflight, in a task in a model replica's placement group: the environment (keys)
    of the node where that model's actors build the judge."""
    from core.judges import make_judge

    make_judge(**settings).check()


def _resources(resources: dict[str, float]) -> str:
    """{GPU: 1, CPU: 4}: the resources a user sets, not Ray's internal ones."""
    shown = {k: (int(v) if float(v).is_integer() else v) for k, v in resources.items()
             if k in ("GPU", "CPU") or not (k.startswith("node:") or k.endswith("memory") or "_group_" in k)}
    if not shown:
        return ""
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(shown.items(), key=lambda kv: kv[0] != "GPU")) + "}"


def _waiting_line(replicas: list[_Replica], behind_running: bool = False) -> str:
    """"waiting for 2 x {GPU: 1, CPU: 1}: autoscaler pending, 3 min" (the progress line)."""
    table = placement_group_table(replicas[0].group)
    pending = "behind the running models" if behind_running else "autoscaler pending"
    state = {"PENDING": pending, "RESCHEDULING": "a node was lost, rescheduling"}.get(
        table.get("state"), str(table.get("state", "")).lower())
    minutes = (time.monotonic() - min(r.requested for r in replicas)) / 60
    return f"waiting for {len(replicas)} x {_resources(table['bundles'][0])}: {state}, {minutes:.0f} min"


def _digest(value: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_manifest(manifest, *, out: str | None = None, run_id: str | None = None, address: str | None = None,
                 force_new_run: bool = False, progress: bool = True, wait_timeout_s: float = WAIT_TIMEOUT_S,
                 reuse: bool = True) -> RunSummary:
    """Run `manifest` to completion (or resume it: units already in `units` are skipped; units
    that another run under the same root computed are reused unless `reuse` is False)."""
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
        # a classifier judge is checked as the scheduler starts (a run it refuses writes nothing);
        # the others where model actors build them, once a replica is placed
        scheduler = Scheduler(manifest, store, run_id, progress, wait_timeout_s, reuse)
        # the run id actually used (--run-id, --force-new-run), not the one the file named
        store.write_run(run_id, manifest.model_copy(update={"run_id": run_id}).to_yaml(), manifest_hash=digest)
        try:
            summary = scheduler.run()
        except RunError:  # a judge failed its check, or no node came: the run stops unfinished
            store.finish_run(run_id, "failed")
            raise
        except KeyboardInterrupt:  # Ctrl-C: this attempt ends (not `running` forever); its units stay
            store.finish_run(run_id, "interrupted")
            raise
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
