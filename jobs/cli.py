"""`moesafe`: validate, run and submit manifests, and read the result store.

    moesafe sandbox [--json] [--force]        build (once) and evaluate the sandbox model
    moesafe models                            supported MoE families
    moesafe methods                           the registered methods, their datasets, tables and params
    moesafe validate MANIFEST [--out ROOT]    every check a run makes before it starts work
    moesafe run MANIFEST [--out ROOT] [--run-id ID] [--address ADDR] [--force-new-run] [--wait-timeout MIN]
                 [--no-reuse]
    moesafe submit MANIFEST --address http://HEAD:8265 [--out s3://...] [--run-id ID] [--env NAME]...
    moesafe status [--out ROOT] [--run-id ID]
    moesafe query "SQL" [--out ROOT] [--format table|csv|json]
    moesafe report [--out ROOT] [--run-id ID ...] [--html FILE] [--compare RUN_A RUN_B]

Exit codes: 0 done, 1 a run finished with failed units, 2 bad input (manifest, SQL, address,
result root), with a message on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
import sys
from pathlib import Path
from typing import Callable

from jobs.errors import CliError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "results"
# Left out of the working directory uploaded with a submitted job: environments, history, caches.
SUBMIT_EXCLUDES = [".venv", ".git", "results", ".cache"]
EXIT_INCOMPLETE = 1
EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    return EXIT_BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesafe", description="Find where the safety of MoE LLMs lives.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=run, name=name)
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
    sub.add_argument("sql")
    out_arg(sub)
    sub.add_argument("--format", default="table", choices=("table", "csv", "json"))

    sub = command("report", cmd_report, "write one self-contained HTML page of the runs under a result root")
    out_arg(sub)
    sub.add_argument("--run-id", nargs="+", help="only these runs (default: every run under --out)")
    sub.add_argument("--html", help="the page to write (default: ROOT/report.html; for an s3:// root, "
                                    "report-<bucket-prefix>.html here)")
    sub.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                     help="add the metric deltas of RUN_B against RUN_A")
    return parser


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
        target = "; every prompt needs a target" if method.needs_target else ""
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
    state = "complete" if not result.units_failed else "INCOMPLETE"
    print(f"\nrun {result.run_id}: {state}, {result.units_ok}/{result.units_total} units ok, "
          f"{result.units_failed} failed")
    out = shlex.quote(str(result.out))
    if result.units_reused:
        print(f"{result.units_reused} units reused from earlier runs under {out}, not recomputed (--no-reuse "
              f"recomputes them)")
    if result.units_failed:
        print(f"failed units: moesafe status --out {out} --run-id {result.run_id}; "
              f"run the same command again to retry them")
    print(f'explore: moesafe query "select * from metrics where {where}" --out {out}')
    return 0 if not result.units_failed else EXIT_INCOMPLETE


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from jobs.manifest import load_manifest

    manifest_path = Path(args.manifest).resolve()
    if not manifest_path.is_relative_to(PROJECT_ROOT):
        raise CliError(f"manifest {args.manifest} is outside the project directory {PROJECT_ROOT}, which is what "
                       f"the job uploads: copy it under {PROJECT_ROOT / 'manifests'}")
    # Only the schema here: models, datasets and the result root are checked on the cluster,
    # where the job runs and where they must be reachable.
    manifest = load_manifest(manifest_path)
    out = args.out or manifest.out
    run_id = _checked_run_id(args.run_id or manifest.run_id)
    if not out.startswith("s3://"):
        print(f"note: results go to {out!r} on the cluster's head node; pass --out s3://bucket/prefix to query "
              f"them from here", file=sys.stderr)
    try:
        client = JobSubmissionClient(args.address)
    except AuthenticationError:
        raise CliError(_TOKEN_HELP.format(address=args.address)) from None
    except ConnectionError:
        raise CliError(f"cannot reach a Ray cluster's dashboard at {args.address}: is the cluster up and is that "
                       f"its head's dashboard address (http://HEAD:8265)? For a cluster started with "
                       f"`ray up cluster.yaml`, `ray dashboard cluster.yaml` forwards it to "
                       f"http://127.0.0.1:8265") from None
    missing = [name for name in args.env if not os.environ.get(name)]
    if missing:
        raise CliError(f"--env {missing[0]}: that variable is not set here, so there is nothing to pass; "
                       f"export it first")
    env_vars = {name: os.environ[name] for name in args.env}
    entrypoint = shlex.join(["moesafe", "run", str(manifest_path.relative_to(PROJECT_ROOT)),
                             "--out", out, "--run-id", run_id, "--wait-timeout", str(args.wait_timeout)])
    for wait in (1, 2, 4, 8, 16, 0):  # a just-started head answers "no available agent" for a few seconds
        try:
            job_id = client.submit_job(entrypoint=entrypoint,
                                       runtime_env={"working_dir": str(PROJECT_ROOT), "excludes": SUBMIT_EXCLUDES,
                                                    **({"env_vars": env_vars} if env_vars else {})})
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


# Ray 2.59+ clusters started with `ray start` require a token unless RAY_AUTH_MODE=disabled.
_TOKEN_HELP = ("the Ray cluster at {address} requires its authentication token: set RAY_AUTH_MODE=token, "
               "with the token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")


def cmd_status(args: argparse.Namespace) -> int:
    from core.query import run_query
    from core.store import ResultStore

    store = ResultStore(args.out, read_only=True)
    if not store.has_files("runs"):
        raise CliError(f"no runs under {store.root}: pass the result root of a run with --out")
    where = f"where r.run_id = '{_checked_run_id(args.run_id)}'" if args.run_id else ""
    print(run_query(
        "select r.run_id, r.status, r.started_at, r.ended_at, "
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


def _checked_run_id(run_id: str) -> str:
    """`run_id` if it is a valid run id, which also makes it safe to quote into SQL."""
    from core.store import _check_id

    _check_id("--run-id", run_id)
    return run_id


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from core.query import run_query

    try:
        result = run_query(args.sql, args.out, args.format)
    except duckdb.Error as error:
        raise CliError(f"{type(error).__name__}: {' '.join(str(error).split())}") from None
    if result:  # CSV ends in a newline already; a statement without rows prints nothing
        print(result, end="" if result.endswith("\n") else "\n")
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
