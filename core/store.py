"""The Parquet result store: where every unit's rows land, all together or not at all.

Layout (Hive style, one file per unit per table, deterministic names):

    <root>/<table>/model=<slug>/run=<run_id>/<unit_id>.parquet
    <root>/runs/run=<run_id>/<run_id>.parquet

`root` is a local directory or `s3://bucket/prefix`. S3 credentials, region and endpoint come
only from the standard AWS chain (AWS_* environment variables incl. AWS_ENDPOINT_URL, ~/.aws,
instance roles), read by s3fs/botocore; nothing here takes or writes credentials.

How `write_unit` commits a unit:
  1. delete the unit's `units` row, so a rewritten unit is uncommitted while it is rewritten;
  2. write each table's file atomically (local: temp file in the same directory + os.replace;
     S3: one PUT per object) and delete the unit's files of tables it no longer writes;
  3. write the `units` row last: it is the commit marker.
A crash at any point leaves the unit uncommitted: readers (`read_table` and the views of
core.query) show only rows of units whose `units` row says ok, and resume (`done_units`) runs
the unit again, whose retry overwrites the same file names, so no row is ever duplicated.

One driver at a time writes a run: `acquire_run` takes the run's lease, an object at
`<root>/_leases/<run_id>.json` naming its holder (host, pid, a random token) and an expiry. It
is created only if absent and replaced only if unchanged since read (S3: conditional PUTs,
If-None-Match / If-Match; local disks: the same compare-and-swap under an flock of the root), so two
drivers can never both hold it. The holder renews it while it runs (`RunLease.kept_alive`); a
driver that died stops renewing, and after the expiry the next driver takes the lease over (at
once when the dead driver ran on the same host: its pid is gone).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import s3fs
from fsspec.implementations.local import LocalFileSystem

from core.schemas import RESULT_TABLES, RUNS_TABLE, UNITS_TABLE, SchemaError, build_table, table_schema

UNIT_STATUSES = ("ok", "failed")

# Run and unit ids become file and directory names; 255 bytes is the usual limit of one name, and a
# unit's file name is the id plus ".parquet" and a temp suffix.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_ID_LENGTH = 128
# A run's lease lasts this long unless renewed; its holder renews it every third of that.
LEASE_TTL_S = 60.0
# Environment variables whose values must never reach a stored manifest.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


class StoreError(RuntimeError):
    """The result root cannot be used as asked, or an id cannot name a file."""


class RunHeldError(StoreError):
    """Another driver holds the run's lease."""


class LeaseLostError(StoreError):
    """The lease expired and another driver took it over before this holder renewed it."""


class _Conflict(Exception):
    """A conditional lease write found the lease changed since it was read."""


def model_slug(name_or_path: str) -> str:
    """A path-safe, stable name for a model: `Qwen/Qwen3-30B-A3B` -> `Qwen--Qwen3-30B-A3B`.

    Path separators become `--`, anything but letters, digits, `.`, `_`, `-` becomes `-`;
    a slug maps to itself."""
    parts = [p for p in re.split(r"[/\\]+", name_or_path.strip()) if p not in ("", ".", "..")]
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", "--".join(parts)).lstrip(".-")
    if not slug:
        raise StoreError(f"cannot make a model slug from {name_or_path!r}: it has no letters or digits")
    return slug


class ResultStore:
    """Result tables under one root. `read_only=True` skips the write probe (e.g. for queries
    with read-only credentials) and refuses writes."""

    def __init__(self, root: str, *, read_only: bool = False):
        if root.startswith("s3://"):
            self._base = root[len("s3://"):].strip("/")
            if not self._base:
                raise StoreError(f"result root {root!r} names no bucket; use s3://bucket/prefix")
            self.root = "s3://" + self._base
            # No listings cache: other workers add files all the time, and a cached listing
            # would hide their units from done_units and read_table.
            self.fs = s3fs.S3FileSystem(use_listings_cache=False)
        elif "://" in root:
            raise StoreError(f"result root {root!r}: only local directories and s3://bucket/prefix are supported")
        else:
            self._base = self.root = os.path.abspath(os.path.expanduser(root))
            self.fs = LocalFileSystem()
        self.read_only = read_only
        if not read_only:
            self.check_writable()

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def check_writable(self) -> None:
        """Write and delete a probe file under the root; StoreError naming the root if that fails."""
        probe = f"{self._base}/.moesafe-write-probe-{uuid.uuid4().hex}"
        try:
            if self.is_local:
                os.makedirs(self._base, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as e:  # OS, botocore and s3fs errors alike: all mean "cannot write here"
            if self.is_local:
                fix = "point the results root at a directory this user can create and write"
            else:
                fix = ("check that the bucket exists and that the credentials of the standard AWS chain "
                       "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, instance role) may put "
                       "and delete objects there; for an S3-compatible server set AWS_ENDPOINT_URL")
            raise StoreError(f"result root {self.root!r} is not writable ({type(e).__name__}: {e}). "
                             f"Fix: {fix}.") from e

    # -- writing -----------------------------------------------------------------------------

    def write_unit(self, run_id: str, model: str, unit_id: str,
                   tables: Mapping[str, Sequence[Mapping[str, Any]] | pa.Table],
                   unit_row: Mapping[str, Any]) -> None:
        """Write one unit's result rows and then its `units` row (the commit marker).

        `tables` maps result table names to rows (dicts or an Arrow table); rows may omit
        run_id, model and unit_id, which are filled in. `unit_row` holds the `units` columns
        method, kind, status ("ok"/"failed"), attempts, seconds, error and optionally
        finished_at (default: now). A failed unit writes no result rows. Everything is
        validated before anything is written; writing the same unit again replaces it."""
        self._require_writable()
        _check_id("run_id", run_id)
        _check_id("unit_id", unit_id)
        slug = model_slug(model)
        not_results = sorted(set(tables) - set(RESULT_TABLES))
        if not_results:
            raise SchemaError(f"write_unit writes the result tables ({', '.join(RESULT_TABLES)}), not "
                              f"{not_results}; the unit's own row goes in unit_row, the run's in write_run")
        status = unit_row.get("status")
        if status not in UNIT_STATUSES:
            raise SchemaError(f"table 'units' column 'status': {status!r} is not one of {UNIT_STATUSES}")
        key = {"run_id": run_id, "model": slug, "unit_id": unit_id}
        built = {name: build_table(name, rows, **key) for name, rows in tables.items()}
        if status == "failed" and any(t.num_rows for t in built.values()):
            raise SchemaError(f"unit {unit_id!r} has status 'failed' but result rows for "
                              f"{sorted(n for n, t in built.items() if t.num_rows)}; a failed unit writes none")
        unit = build_table(UNITS_TABLE, [{"finished_at": _now(), **unit_row}], **key)

        self._remove(self._unit_path(UNITS_TABLE, slug, run_id, unit_id))
        for name in RESULT_TABLES:
            path = self._unit_path(name, slug, run_id, unit_id)
            if name in built and built[name].num_rows:
                self._put(path, built[name])
            else:  # left over from an earlier attempt that wrote this table
                self._remove(path)
        self._put(self._unit_path(UNITS_TABLE, slug, run_id, unit_id), unit)

    def write_run(self, run_id: str, manifest: str, *, manifest_hash: str | None = None,
                  versions: Mapping[str, Any] | None = None, started_at: datetime | None = None,
                  status: str = "running") -> None:
        """Write the run's `runs` row as a new attempt starts. `manifest` is the YAML text; it is
        refused if it holds the value of a secret-looking environment variable. Defaults:
        manifest_hash = sha256 of the text, versions = installed moesafe/torch/transformers/ray,
        started_at = now. A run that has a row already (a resume) keeps its first `started_at`
        and gains one more entry in `attempts`."""
        self._require_writable()
        _check_id("run_id", run_id)
        _check_no_secrets(manifest)
        started_at = started_at or _now()
        previous = self.read_table(RUNS_TABLE, run_id=run_id).to_pylist()
        attempt = {"started_at": started_at, "ended_at": None, "status": status, "host": socket.gethostname(),
                   "pid": os.getpid()}
        row = {
            "run_id": run_id,
            "manifest": manifest,
            "manifest_hash": manifest_hash or hashlib.sha256(manifest.encode()).hexdigest(),
            "versions": dict(versions) if versions is not None else _runtime_versions(),
            "started_at": previous[0]["started_at"] if previous else started_at,
            "ended_at": None,
            "status": status,
            "attempts": [*(previous[0]["attempts"] or [] if previous else []), attempt],
        }
        self._put(self._run_path(run_id), build_table(RUNS_TABLE, [row]))

    def finish_run(self, run_id: str, status: str = "finished", ended_at: datetime | None = None) -> None:
        """Rewrite the run's `runs` row with its final status and end time (default: now), also
        as the end of its latest attempt."""
        self._require_writable()
        rows = self.read_table(RUNS_TABLE, run_id=run_id).to_pylist()
        if not rows:
            raise StoreError(f"run {run_id!r} has no row under {self.root!r}; call write_run first")
        ended_at = ended_at or _now()
        attempts = rows[0]["attempts"] or []
        if attempts:
            attempts[-1] = {**attempts[-1], "ended_at": ended_at, "status": status}
        row = {**rows[0], "status": status, "ended_at": ended_at, "attempts": attempts}
        del row["schema_version"]  # rewritten in the current version
        self._put(self._run_path(run_id), build_table(RUNS_TABLE, [row]))

    # -- the run lease -----------------------------------------------------------------------

    def acquire_run(self, run_id: str, ttl_s: float = LEASE_TTL_S) -> RunLease:
        """Take the lease of run `run_id` for this process, or RunHeldError naming its holder
        (host, pid) and when its lease expires. An expired lease is taken over."""
        self._require_writable()
        _check_id("run_id", run_id)
        lease = RunLease(self, run_id, token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                         ttl_s=ttl_s)
        for _ in range(3):  # a lost race re-reads the lease, which then names the winner
            holder, version = self._lease_read(run_id)
            if holder is not None and _expires_at(holder) > _now() and not _died_here(holder):
                raise RunHeldError(
                    f"run id {run_id!r} in {self.root!r} is being run by another driver: {holder['host']} pid "
                    f"{holder['pid']}, since {holder['acquired_at']}; its lease expires at {holder['expires_at']} "
                    f"unless that driver renews it (it does every {ttl_s / 3:.0f} s while it runs). Wait for it to "
                    f"finish (`moesafe status --out {self.root} --run-id {run_id}`), or use another --run-id")
            try:
                lease.version = self._lease_swap(run_id, lease.record(), version)
                return lease
            except _Conflict:
                continue
        raise RunHeldError(f"run id {run_id!r} in {self.root!r}: its lease keeps changing hands; another driver "
                           f"is starting this run; use another --run-id or try again")

    def _lease_path(self, run_id: str) -> str:
        return f"{self._base}/_leases/{run_id}.json"

    def _lease_read(self, run_id: str) -> tuple[dict | None, str | None]:
        """The lease record and its version (local: the holder's token; S3: the object's ETag)."""
        path = self._lease_path(run_id)
        if self.is_local:
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read())
            except FileNotFoundError:
                return None, None
            return record, record["token"]
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        from fsspec.asyn import sync

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        return json.loads(data), etag

    def _lease_swap(self, run_id: str, record: dict, version: str | None) -> str:
        """Write `record` if the lease is still at `version` (None: absent); its new version, or
        _Conflict."""
        path = self._lease_path(run_id)
        data = json.dumps(record).encode()
        if self.is_local:
            with self._lease_lock():
                if self._lease_read(run_id)[1] != version:
                    raise _Conflict
                self._put_bytes(path, data)
            return record["token"]
        bucket, key, _ = self.fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except OSError as error:
            if _precondition_failed(error):
                raise _Conflict from None
            raise

    def _lease_delete(self, run_id: str, version: str) -> None:
        """Delete the lease if it is still at `version` (a lease taken over stays)."""
        path = self._lease_path(run_id)
        if self.is_local:
            with self._lease_lock():
                if self._lease_read(run_id)[1] == version:
                    os.remove(path)
                    with contextlib.suppress(OSError):  # left only while some run holds a lease
                        os.rmdir(os.path.dirname(path))
            return
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except OSError as error:
            if _precondition_failed(error):
                return
            # a server without conditional deletes: compare, then delete (a takeover in between is
            # only possible after this lease expired)
            if self._lease_read(run_id)[1] == version:
                self.fs.rm_file(path)

    @contextlib.contextmanager
    def _lease_lock(self):
        """An exclusive flock on the root directory: makes a lease's read-compare-write one step on
        a local disk, and leaves no file behind. Held for milliseconds, freed by the kernel if its
        process dies."""
        descriptor = os.open(self._base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the flock

    def reuse_unit(self, source_run: str, run_id: str, model: str, unit_id: str) -> None:
        """Commit unit `unit_id`, computed ok by run `source_run`, under `run_id` too: its rows
        copied (a unit id hashes everything that determines its result), its `units` row saying
        `reused_from`. Commits like write_unit."""
        slug = model_slug(model)
        [source] = [u for u in self.read_table(UNITS_TABLE, run_id=source_run, model=slug).to_pylist()
                    if u["unit_id"] == unit_id and u["status"] == "ok"]
        tables = {}
        for name in RESULT_TABLES:
            path = self._unit_path(name, slug, source_run, unit_id)
            if self.fs.exists(path):
                rows = pq.read_table(path, filesystem=self.fs)
                tables[name] = rows.drop_columns(["run_id", "schema_version"])
        self.write_unit(run_id, model, unit_id, tables, {
            "method": source["method"], "kind": source["kind"], "status": "ok", "attempts": 0, "seconds": 0.0,
            "error": None, "reused_from": source_run})

    # -- reading -----------------------------------------------------------------------------

    def read_table(self, name: str, run_id: str | None = None, model: str | None = None) -> pa.Table:
        """All rows of table `name` (optionally of one run and/or model) in its current schema;
        columns missing from older files are null. Result tables show committed units only."""
        ts = table_schema(name)
        if name == RUNS_TABLE and model is not None:
            raise SchemaError("table 'runs' has no model column; read it by run_id only")
        files = self._files(name, run_id, model)
        if name in RESULT_TABLES:
            committed = self._committed_units(run_id, model)
            files = [f for f in files if _unit_key(f) in committed]
        if not files:
            return ts.schema.empty_table()
        return ds.dataset(files, schema=ts.schema, format="parquet", filesystem=self.fs).to_table()

    def done_units(self, run_id: str, model: str | None = None) -> set[str]:
        """Ids of the run's units that finished ok: what a resumed run skips."""
        return self._unit_ids(run_id, model, "ok")

    def units_done_elsewhere(self, run_id: str) -> dict[tuple[str, str], str]:
        """(model slug, unit id) -> a run other than `run_id` that computed that unit ok itself:
        what a run may reuse instead of recomputing."""
        units = self.read_table(UNITS_TABLE)
        done = {}
        for u in units.to_pylist():
            if u["status"] == "ok" and u["run_id"] != run_id and u["reused_from"] is None:
                done[(u["model"], u["unit_id"])] = u["run_id"]
        return done

    def failed_units(self, run_id: str, model: str | None = None) -> set[str]:
        return self._unit_ids(run_id, model, "failed")

    def table_glob(self, name: str) -> str:
        """A glob URL matching every file of table `name` (for DuckDB's read_parquet)."""
        table_schema(name)
        return f"{self.root}/{name}/**/*.parquet"

    def has_files(self, name: str) -> bool:
        return bool(self._files(name))

    # -- internals ---------------------------------------------------------------------------

    def _unit_ids(self, run_id: str, model: str | None, status: str) -> set[str]:
        units = self.read_table(UNITS_TABLE, run_id=run_id, model=model)
        return {u for u, s in zip(units["unit_id"].to_pylist(), units["status"].to_pylist()) if s == status}

    def _committed_units(self, run_id: str | None, model: str | None) -> set[tuple[str, str, str]]:
        units = self.read_table(UNITS_TABLE, run_id=run_id, model=model)
        return {(m, r, u) for m, r, u, s in zip(*(units[c].to_pylist() for c in ("model", "run_id", "unit_id", "status")))
                if s == "ok"}

    def _files(self, name: str, run_id: str | None = None, model: str | None = None) -> list[str]:
        if run_id is not None:
            _check_id("run_id", run_id)
        run = run_id or "*"
        if name == RUNS_TABLE:
            pattern = f"{self._base}/{name}/run={run}/*.parquet"
        else:
            pattern = f"{self._base}/{name}/model={model_slug(model) if model else '*'}/run={run}/*.parquet"
        return sorted(self.fs.glob(pattern))

    def _unit_path(self, name: str, slug: str, run_id: str, unit_id: str) -> str:
        return f"{self._base}/{name}/model={slug}/run={run_id}/{unit_id}.parquet"

    def _run_path(self, run_id: str) -> str:
        return f"{self._base}/{RUNS_TABLE}/run={run_id}/{run_id}.parquet"

    def _put(self, path: str, table: pa.Table) -> None:
        """Write `table` to `path` so that readers see the old file or the new one, never part."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._put_bytes(path, sink.getvalue().to_pybytes())

    def _put_bytes(self, path: str, data: bytes) -> None:
        if not self.is_local:
            self.fs.pipe_file(path, data)  # one PUT (or multipart upload): atomic
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        # Same directory, so os.replace is a rename on one filesystem; the name does not end in
        # .parquet, so no reader's glob picks up a half-written temp file.
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"this ResultStore of {self.root!r} was opened read_only; "
                             f"open ResultStore(root) to write")


class RunLease:
    """This driver's hold on one run (see ResultStore.acquire_run). `kept_alive()` renews it in a
    background thread while the run goes on and releases it at the end."""

    def __init__(self, store: ResultStore, run_id: str, *, token: str, host: str, pid: int, ttl_s: float):
        self.store, self.run_id, self.token, self.host, self.pid, self.ttl_s = store, run_id, token, host, pid, ttl_s
        self.acquired_at = _now()
        self.version: str | None = None
        self.lost: LeaseLostError | None = None  # set when a renewal found the lease taken over

    def record(self) -> dict[str, Any]:
        """The lease as stored, expiring ttl_s from now (kept in `expires_at`)."""
        self.expires_at = _now() + timedelta(seconds=self.ttl_s)
        return {"run_id": self.run_id, "token": self.token, "host": self.host, "pid": self.pid,
                "acquired_at": self.acquired_at.isoformat(timespec="milliseconds"),
                "expires_at": self.expires_at.isoformat(timespec="milliseconds")}

    def renew(self) -> None:
        """Push the expiry forward; LeaseLostError if another driver took the lease over."""
        try:
            self.version = self.store._lease_swap(self.run_id, self.record(), self.version)
        except _Conflict:
            holder, _ = self.store._lease_read(self.run_id)
            who = f"{holder['host']} pid {holder['pid']}" if holder else "nobody (it was deleted)"
            raise LeaseLostError(f"run {self.run_id!r}: this driver's lease expired and is now held by {who}; "
                                 f"stop, and let that driver finish the run") from None

    def release(self) -> None:
        self.store._lease_delete(self.run_id, self.version)

    @contextlib.contextmanager
    def kept_alive(self):
        """Renew every ttl/3 until the block ends, then release. A renewal that fails for a
        transient reason (network) is retried at the next tick; a lost lease is recorded in `lost`."""
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLostError as error:
                    self.lost = error
                    return
                except Exception:  # noqa: BLE001 -- S3 hiccup: the next tick tries again before expiry
                    pass

        renewer = threading.Thread(target=renew_until_stopped, name=f"lease-{self.run_id}", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            stop.set()
            renewer.join()
            if self.lost is None:
                self.release()


def _expires_at(record: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(record["expires_at"])


def _died_here(holder: Mapping[str, Any]) -> bool:
    """The holder ran on this host and its process is gone: its lease need not run out first (a
    driver killed and restarted at once). A reused pid only makes the next driver wait."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _precondition_failed(error: OSError) -> bool:
    """s3fs's translation of S3's 412 (If-None-Match: FileExistsError; If-Match: OSError) or of
    409 ConditionalRequestConflict (a concurrent conditional write won)."""
    code = getattr(error.__cause__, "response", {}).get("Error", {}).get("Code")
    return isinstance(error, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _unit_key(path: str) -> tuple[str, str, str]:
    """(model, run_id, unit_id) of a unit file .../model=<m>/run=<r>/<u>.parquet."""
    model_dir, run_dir, file_name = path.split("/")[-3:]
    return model_dir.removeprefix("model="), run_dir.removeprefix("run="), file_name.removesuffix(".parquet")


def _check_id(kind: str, value: Any) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise StoreError(f"{kind} {shown} cannot name a file: use letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit")
    if len(value) > MAX_ID_LENGTH:
        raise StoreError(f"{kind} {value[:40]!r}...: is too long ({len(value)} characters); it names files and "
                         f"directories, so at most {MAX_ID_LENGTH} are allowed")


def _check_no_secrets(manifest: str) -> None:
    for name, value in os.environ.items():
        # Short values ("1", "us-east-1") match by accident; secrets are long.
        if SECRET_NAME.search(name) and len(value) >= 8 and value in manifest:
            raise StoreError(f"the manifest contains the value of environment variable {name}; refusing to "
                             f"store it. Name the variable in the manifest instead of pasting its value")


def _runtime_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in ("moesafe", "torch", "transformers", "ray"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _now() -> datetime:
    return datetime.now(timezone.utc)
