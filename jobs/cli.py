"""`moesafe`: validate, run and submit manifests, and read the result store.

    moesafe sandbox [--json] [--force]        build (once) and evaluate the sandbox model
    moesafe models                            supported MoE families
    moesafe methods                           the registered methods, their datasets, tables and params
    moesafe params [METHOD] [--markdown]      each method's parameters, defaults and meaning
    moesafe validate MANIFEST [--out ROOT]    every check a run makes before it starts work
    moesafe run MANIFEST [--out ROOT] [--run-id ID] [--address ADDR] [--force-new-run] [--wait-timeout MIN]
                 [--no-reuse]
    moesafe submit MANIFEST --address http://HEAD:8265 --out s3://... [--run-id ID] [--env NAME]...
    moesafe status [--out ROOT] [--run-id ID]
    moesafe query "SQL" [--out ROOT] [--format table|csv|json]   (`query --help` lists the tables)
    moesafe report [--out ROOT] [--run-id ID ...] [--html FILE] [--compare RUN_A RUN_B]

Exit codes: 0 done, 1 a run finished with failed units, 2 bad input (manifest, SQL, address,
result root), with a message on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from jobs.auth import TOKEN_HELP, use_ray_auth_token
from jobs.errors import CliError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "results"
# What a submitted job carries: the project's code, and the manifest under this name (with its
# local datasets beside it) as its working directory.
CODE_PACKAGES = ("core", "actors", "jobs")
SUBMITTED_MANIFEST = "manifest.yaml"
EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (Ctrl-C)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries(loads_models=args.loads_models)
    from core.store import StoreError
    from jobs.manifest import ManifestError

    try:
        return args.command(args)
    except ManifestError as error:
        problems = error.problems
        print(f"moesafe {args.name}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the manifest:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    except (CliError, StoreError) as error:
        print(f"moesafe {args.name}: error: {error}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through Ray's wait
        resume = "; the units it finished are kept: run the same command again to resume" if args.name == "run" else ""
        print(f"moesafe {args.name}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT


def _quiet_libraries(loads_models: bool) -> None:
    """Silence what libraries print that a moesafe user cannot act on: Ray's notice that it turned on
    token authentication for a local cluster (it writes ~/.ray/auth_token itself), and
    transformers' bars for loading and saving the small local models (hub download bars stay)."""
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if loads_models:  # only these commands import transformers anyway; it is slow to import
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesafe", description="Find where the safety of MoE LLMs lives.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=run, name=name, loads_models=name in ("sandbox", "validate", "run"))
        return sub

    def manifest_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("manifest", help="the manifest YAML file")
        sub.add_argument("--out", help="result root (local dir or s3://bucket/prefix); default: the manifest's out")

    def out_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--out", default=DEFAULT_OUT, help=f"result root (default: {DEFAULT_OUT})")

    sub = command("sandbox", cmd_sandbox, "build (once, cached) and evaluate the small sandbox MoE model")
    sub.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_argument("--force", action="store_true", help="retrain even if a cached model exists")

    command("models", cmd_models, "list the supported MoE families")
    command("methods", cmd_methods, "list the methods a manifest can name, with their params and defaults")

    sub = command("params", cmd_params, "each method's parameters (a manifest's `params:`), defaults and meaning")
    sub.add_argument("method", nargs="?", help=f"one of {', '.join(_method_names())} (default: all)")
    sub.add_argument("--markdown", action="store_true", help="as Markdown tables (docs/METHODS.md holds these)")

    manifest_args(command("validate", cmd_validate, "check a manifest and what it points at, running nothing"))

    sub = command("run", cmd_run, "run a manifest (here, or on the Ray cluster at --address)")
    manifest_args(sub)
    sub.add_argument("--run-id", help="default: the manifest's run_id, else <file stem>-<hash>")
    sub.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    sub.add_argument("--force-new-run", action="store_true",
                     help="start the run id afresh instead of resuming it")
    sub.add_argument("--wait-timeout", type=float, default=30.0, metavar="MINUTES",
                     help="give up when nothing of the run has been placed for this long, e.g. while the "
                          "autoscaler adds nodes (default: 30)")
    sub.add_argument("--no-reuse", action="store_true",
                     help="recompute units that another run under the same --out already computed")

    sub = command("submit", cmd_submit, "submit `moesafe run MANIFEST` to a Ray cluster as a job")
    manifest_args(sub)
    sub.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
    sub.add_argument("--run-id", help="default: the manifest's run_id, else <file stem>-<hash>")
    sub.add_argument("--env", action="append", default=[], metavar="NAME",
                     help="pass this environment variable (e.g. a judge's API key) to the job's processes in its "
                          "runtime env; shown to whoever can open the cluster's dashboard (see README)")
    sub.add_argument("--wait-timeout", type=float, default=30.0, metavar="MINUTES",
                     help="as for `moesafe run`: how long the job waits for nodes")

    sub = command("status", cmd_status, "runs, their units by status, and failed units' errors")
    out_arg(sub)
    sub.add_argument("--run-id", help="only this run")

    sub = command("query", cmd_query, "SQL over the result tables (DuckDB; one view per table)")
    sub.formatter_class = argparse.RawDescriptionHelpFormatter
    sub.epilog = _query_tables_help()
    sub.add_argument("sql", help="one DuckDB SQL statement over the tables below, e.g. "
                                 "\"select method, metric, value, n from metrics\"")
    out_arg(sub)
    sub.add_argument("--format", default="table", choices=("table", "csv", "json"),
                     help="table (the default) cuts cells longer than 60 characters with '…'; "
                          "csv and json print every value whole")

    sub = command("report", cmd_report, "write one self-contained HTML page of the runs under a result root")
    out_arg(sub)
    sub.add_argument("--run-id", nargs="+", help="only these runs (default: every run under --out)")
    sub.add_argument("--html", help="the page to write (default: ROOT/report.html; for an s3:// root, "
                                    "report-<bucket-prefix>.html here)")
    sub.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                     help="add the metric deltas of RUN_B against RUN_A")
    return parser


def _method_names() -> list[str]:
    from core.methods import METHODS  # the registry only: no torch, so every command can list it

    return list(METHODS)


def _query_tables_help() -> str:
    from core.schemas import TABLES

    width = max(map(len, TABLES))
    lines = [f"  {name:<{width}}  {table.description}" for name, table in TABLES.items()]
    return ("tables (each a view of its own name; columns: `describe metrics`, meanings: docs/METHODS.md):\n"
            + "\n".join(lines))


def cmd_sandbox(args: argparse.Namespace) -> int:
    from core.sandbox import build_sandbox, evaluate_sandbox

    model_dir = build_sandbox(force=args.force)
    report = {**evaluate_sandbox(model_dir), "model_dir": str(model_dir)}
    if args.json:
        print(json.dumps(report))
    else:
        width = max(map(len, report))
        for key, value in report.items():
            if isinstance(value, dict):  # per-wording rates: one indented line each
                print(key)
                for part, rate in value.items():
                    print(f"  {rate:.3f}  {part}")
            else:
                print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from core.families import FAMILIES

    rows = [("family (model_type)", "router class", "selection")]
    rows += [(f.model_type, f.router_class.rpartition(".")[2], _selection_rule(f.select, set(FAMILIES)))
             for f in FAMILIES.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for model_type, router, rule in rows:
        print(f"{model_type:<{widths[0]}}  {router:<{widths[1]}}  {rule}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from core.methods import METHODS, get_method

    for name in METHODS:
        method = get_method(name)
        if method.roles == ("dataset",):
            datasets = "dataset: <name>"
        else:
            roles = [*method.roles, *(f"{role} (optional)" for role in method.optional_roles)]
            datasets = f"datasets: {', '.join(roles)}"
        target = ("; every prompt needs a target" if method.needs_target is True else
                  f"; every {' and '.join(method.needs_target)} prompt needs a target" if method.needs_target else "")
        print(f"{name}: {datasets}{target}; writes {', '.join((*method.tables, 'metrics'))}")
        print(f"  params: {', '.join(f'{f.name}={f.default!r}' for f in dataclasses.fields(method.params))}")
    return 0


def _selection_rule(select: Callable, model_types: set[str]) -> str:
    """The first paragraph of a family's select_* docstring (core.families, the one place the rules
    are written), without the list of families some of them start with."""
    summary = " ".join((select.__doc__ or "").strip().split("\n\n")[0].split())
    families, colon, rule = summary.partition(": ")
    listed = {name.strip() for name in families.split(",")}
    return rule if colon and listed <= model_types else summary


def method_params_classes() -> dict[str, type]:
    """method -> its params dataclass, from the method registry."""
    from core.methods import METHODS, get_method

    return {name: get_method(name).params for name in METHODS}


def params_table(method: str, markdown: bool = False) -> str:
    """`method`'s parameters (name, type, default, help) from its params dataclass, as aligned text
    or as a Markdown table. Defaults are shown as a manifest would write them (JSON is YAML)."""
    import dataclasses
    import typing

    cls = method_params_classes()[method]
    hints = typing.get_type_hints(cls)
    rows = [("parameter", "type", "default", "meaning")]
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if typing.get_origin(hint) is typing.Literal:
            kind = " | ".join(map(str, typing.get_args(hint)))
        else:
            kind = str(field.type)
        default = field.default
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        rows.append((field.name, kind, shown, field.metadata.get("help", "")))
    if markdown:
        escaped = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        lines = [f"| `{n}` | {t} | `{d}` | {h} |" for n, t, d, h in escaped[1:]]
        return "\n".join(["| parameter | type | default | meaning |", "|---|---|---|---|", *lines])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     for row in rows).rstrip()


def cmd_params(args: argparse.Namespace) -> int:
    classes = method_params_classes()
    if args.method and args.method not in classes:
        raise CliError(f"unknown method {args.method!r}; the methods: {', '.join(classes)}")
    for i, method in enumerate([args.method] if args.method else classes):
        title = f"{method} ({classes[method].__name__}): methods[].params in a manifest"
        print(("\n" if i else "") + (f"### {title}\n" if args.markdown else f"{title}\n"))
        print(params_table(method, args.markdown))
    if not args.markdown:
        print("\nWhat each method computes and what its tables mean: docs/METHODS.md")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from jobs.manifest import check_manifest, load_manifest

    manifest = load_manifest(Path(args.manifest))
    check_manifest(manifest, out=args.out)
    print(f"OK {args.manifest}: run {manifest.run_id}, {len(manifest.models)} model(s), "
          f"{len(manifest.datasets)} dataset(s), {len(manifest.methods)} method(s); "
          f"results to {args.out or manifest.out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from core.query import run_query
    from jobs.manifest import check_manifest, load_manifest
    from jobs.runner import run_manifest  # imported here: it brings up Ray

    run_id = args.run_id and _checked_run_id(args.run_id)
    manifest = load_manifest(Path(args.manifest))
    check_manifest(manifest, out=args.out)
    result = run_manifest(manifest, out=args.out or manifest.out, run_id=run_id, address=args.address,
                          force_new_run=args.force_new_run, wait_timeout_s=args.wait_timeout * 60,
                          reuse=not args.no_reuse)
    # the store accepts only file-safe run ids ([A-Za-z0-9._-]), so quoting one into SQL is safe
    where = f"run_id = '{result.run_id}'"
    print(run_query(f"select model, dataset, method, judge, metric, value, n from metrics where {where} "
                    f"order by model, method, dataset, judge, metric", result.out))
    print(f"\nrun {result.run_id}: {_outcome(result)}")
    out = shlex.quote(str(result.out))
    if result.units_reused:
        print(f"reused units come from earlier runs under {out}, not recomputed (--no-reuse recomputes them)")
    if result.units_failed:
        print(f"failed units: moesafe status --out {out} --run-id {result.run_id}; "
              f"run the same command again to retry them")
    print(f'explore: moesafe query "select * from metrics where {where}" --out {out}')
    return 0 if not result.units_failed else EXIT_INCOMPLETE


def _outcome(result) -> str:
    """What the run did, counting every unit once: run ok now, done by an earlier attempt of this run,
    reused from another run under the same root, failed."""
    if result.units_total and result.units_skipped == result.units_total:
        return f"already complete: all {result.units_total} units were done earlier, nothing ran"
    state = "complete" if not result.units_failed else "INCOMPLETE"
    reused = f"{result.units_reused} reused, " if result.units_reused else ""
    return (f"{state}, {result.units_ok} units ok, {result.units_skipped} skipped (done earlier), {reused}"
            f"{result.units_failed} failed, of {result.units_total}")


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from jobs.manifest import load_manifest

    manifest_path = Path(args.manifest)
    # Only the schema here: models, datasets and the result root are checked on the cluster,
    # where the job runs and where they must be reachable.
    manifest = load_manifest(manifest_path)
    out = args.out or manifest.out
    run_id = _checked_run_id(args.run_id or manifest.run_id)
    if not out.startswith("s3://") and not os.path.isabs(out):
        # relative to the job's working directory: a copy in Ray's per-job cache on the node that runs it
        raise CliError(f"result root {out!r} would be inside the job's copy of the project on the cluster, where "
                       f"neither `moesafe status` nor `moesafe query` can find it: pass --out s3://bucket/prefix "
                       f"(or an absolute path on a disk the cluster's nodes share)")
    if not out.startswith("s3://"):
        print(f"note: results go to {out} on the cluster's head node, where the job's driver runs; "
              f"pass --out s3://bucket/prefix to query them from here", file=sys.stderr)
    missing = [name for name in args.env if not os.environ.get(name)]
    if missing:
        raise CliError(f"--env {missing[0]}: that variable is not set here, so there is nothing to pass; "
                       f"export it first")
    env_vars = {name: os.environ[name] for name in args.env}
    entrypoint = shlex.join(["moesafe", "run", SUBMITTED_MANIFEST, "--out", out, "--run-id", run_id,
                             "--wait-timeout", str(args.wait_timeout)])
    with tempfile.TemporaryDirectory(prefix="moesafe-submit-") as staging:
        _stage_manifest(manifest_path, Path(staging))
        use_ray_auth_token()
        try:
            client = JobSubmissionClient(args.address)
        except AuthenticationError:
            raise CliError(TOKEN_HELP.format(address=args.address)) from None
        except ConnectionError:
            raise CliError(f"cannot reach a Ray cluster's dashboard at {args.address}: is the cluster up and is "
                           f"that its head's dashboard address (http://HEAD:8265)? For a cluster started with "
                           f"`ray up cluster.yaml`, `ray dashboard cluster.yaml` forwards it to "
                           f"http://127.0.0.1:8265") from None
        # The job's working directory holds the manifest and its local datasets; the project's code
        # travels as modules, so the cluster runs this checkout's code.
        runtime_env = {"working_dir": staging, "py_modules": [str(PROJECT_ROOT / name) for name in CODE_PACKAGES],
                       "excludes": ["__pycache__"], **({"env_vars": env_vars} if env_vars else {})}
        for wait in (1, 2, 4, 8, 16, 0):  # a just-started head answers "no available agent" for a few seconds
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or not wait:
                    raise CliError(f"the Ray cluster at {args.address} refused the job: {e}") from None
                time.sleep(wait)
    print(job_id)
    print(f"run {run_id} submitted as job {job_id}\n"
          f"  follow:  ray job logs --follow --address {args.address} {job_id}\n"
          f"  results: moesafe status --out {shlex.quote(out)} --run-id {run_id}", file=sys.stderr)
    return 0


def _stage_manifest(manifest_path: Path, staging: Path) -> None:
    """Write the manifest into `staging` as SUBMITTED_MANIFEST, with each dataset file it names by
    local path (`source: ./x.csv`, or `path:` for a local copy of a named dataset) copied under
    `staging/datasets/` and the manifest pointed at the copy. Relative paths are read from the
    current directory, as `moesafe run` reads them."""
    from core.datasets import DATASETS

    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    for name, dataset in (manifest.get("datasets") or {}).items():
        for key in ("source", "path"):
            value = dataset.get(key)
            if not isinstance(value, str) or value in DATASETS or "://" in value:
                continue  # a named dataset or a URL: the cluster reads it itself
            local = Path(value).expanduser()
            if not local.is_file():
                raise CliError(f"datasets.{name}.{key}: {value!r} is not a file here (paths are read from the "
                               f"current directory, {Path.cwd()}); submit ships local dataset files with the job")
            # the file's own name: a file's stem names its dataset in the result rows
            copy = Path("datasets") / name / key / local.name
            (staging / copy).parent.mkdir(parents=True)
            shutil.copyfile(local, staging / copy)
            dataset[key] = copy.as_posix()
    (staging / SUBMITTED_MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True),
                                             encoding="utf-8")


def cmd_status(args: argparse.Namespace) -> int:
    from core.query import run_query

    store = _result_root(args.out)
    if args.run_id:
        _checked_run_id(args.run_id)
        if not store.read_table("runs", run_id=args.run_id).num_rows:
            known = sorted(set(store.read_table("runs")["run_id"].to_pylist()))
            raise CliError(f"no run {args.run_id!r} under {store.root}; its runs: {', '.join(known)}. "
                           f"Fix: pass one of them to --run-id, or the result root that run wrote with --out")
    where = f"where r.run_id = '{args.run_id}'" if args.run_id else ""
    print(run_query(
        "select r.run_id, r.status, coalesce(len(r.attempts), 1) as attempts, r.started_at, r.ended_at, "
        "count(u.unit_id) filter (where u.status = 'ok') as units_ok, "
        "count(u.unit_id) filter (where u.status = 'failed') as units_failed "
        f"from runs r left join units u on u.run_id = r.run_id {where} "
        "group by all order by r.started_at", store.root))
    failed = json.loads(run_query(
        "select r.run_id, u.model, u.method, u.unit_id, u.attempts, u.error from units u "
        f"join runs r on u.run_id = r.run_id {where} {'and' if where else 'where'} u.status = 'failed' "
        "order by r.run_id, u.model, u.unit_id", store.root, "json"))
    if failed:
        print(f"\nfailed units ({len(failed)}):")
        for unit in failed:
            print(f"  {unit['run_id']} {unit['model']} {unit['unit_id']} ({unit['method']}, "
                  f"{unit['attempts']} attempt{'s' if unit['attempts'] != 1 else ''}): {unit['error']}")
    return 0


def _result_root(out: str):
    """The store at `out`, read-only; CliError when no run ever wrote there (a mistyped --out would
    otherwise answer with empty tables)."""
    from core.store import ResultStore

    store = ResultStore(out, read_only=True)
    if not store.has_files("runs"):
        missing = "does not exist" if store.is_local and not os.path.isdir(store.root) else "holds no runs"
        raise CliError(f"result root {store.root} {missing}. Fix: pass the --out a run wrote to "
                       f"(`moesafe run MANIFEST --out ROOT`; `make quickstart` writes to {DEFAULT_OUT})")
    return store


def _checked_run_id(run_id: str) -> str:
    """`run_id` if it is a valid run id, which also makes it safe to quote into SQL."""
    from core.store import _check_id

    _check_id("--run-id", run_id)
    return run_id


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from core.query import ReadOnlyError, run_query

    try:
        result = run_query(args.sql, _result_root(args.out).root, args.format)
    except ReadOnlyError as error:
        raise CliError(str(error)) from None
    except duckdb.PermissionException as error:
        raise CliError(f"{' '.join(str(error).split())}: queries read only the tables under --out "
                       f"{args.out}") from None
    except duckdb.Error as error:
        raise CliError(f"{type(error).__name__}: {' '.join(str(error).split())}") from None
    if result:  # CSV ends in a newline already; a statement without rows prints nothing
        print(result, end="" if result.endswith("\n") else "\n")
    if args.format == "table" and "…" in result:
        print("note: cells ending in '…' are cut; --format json or --format csv prints them whole",
              file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import ReportError, write_report

    run_ids = [_checked_run_id(r) for r in args.run_id or []]
    compare = tuple(_checked_run_id(r) for r in args.compare) if args.compare else None
    try:
        path = write_report(args.out, args.html, run_ids or None, compare)
    except ReportError as error:
        raise CliError(str(error)) from None
    print(os.path.abspath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
