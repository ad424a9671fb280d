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
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import s3fs
from fsspec.implementations.local import LocalFileSystem

from core.schemas import RESULT_TABLES, RUNS_TABLE, UNITS_TABLE, SchemaError, build_table, table_schema

UNIT_STATUSES = ("ok", "failed")

# Run and unit ids become file and directory names.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Environment variables whose values must never reach a stored manifest.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


class StoreError(RuntimeError):
    """The result root cannot be used as asked, or an id cannot name a file."""


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
        """Write the run's `runs` row. `manifest` is the YAML text; it is refused if it holds the
        value of a secret-looking environment variable. Defaults: manifest_hash = sha256 of the
        text, versions = installed moesafe/torch/transformers/ray, started_at = now."""
        self._require_writable()
        _check_id("run_id", run_id)
        _check_no_secrets(manifest)
        row = {
            "run_id": run_id,
            "manifest": manifest,
            "manifest_hash": manifest_hash or hashlib.sha256(manifest.encode()).hexdigest(),
            "versions": dict(versions) if versions is not None else _runtime_versions(),
            "started_at": started_at or _now(),
            "ended_at": None,
            "status": status,
        }
        self._put(self._run_path(run_id), build_table(RUNS_TABLE, [row]))

    def finish_run(self, run_id: str, status: str = "finished", ended_at: datetime | None = None) -> None:
        """Rewrite the run's `runs` row with its final status and end time (default: now)."""
        self._require_writable()
        rows = self.read_table(RUNS_TABLE, run_id=run_id).to_pylist()
        if not rows:
            raise StoreError(f"run {run_id!r} has no row under {self.root!r}; call write_run first")
        row = {**rows[0], "status": status, "ended_at": ended_at or _now()}
        del row["schema_version"]  # rewritten in the current version
        self._put(self._run_path(run_id), build_table(RUNS_TABLE, [row]))

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
        data = sink.getvalue()
        if not self.is_local:
            self.fs.pipe_file(path, data.to_pybytes())  # one PUT (or multipart upload): atomic
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


def _unit_key(path: str) -> tuple[str, str, str]:
    """(model, run_id, unit_id) of a unit file .../model=<m>/run=<r>/<u>.parquet."""
    model_dir, run_dir, file_name = path.split("/")[-3:]
    return model_dir.removeprefix("model="), run_dir.removeprefix("run="), file_name.removesuffix(".parquet")


def _check_id(kind: str, value: Any) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise StoreError(f"{kind} {value!r} cannot name a file: use letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit")


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
