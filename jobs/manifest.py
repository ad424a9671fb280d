"""The run manifest: one YAML file naming the models, datasets, judges and methods of a run.

    manifest = load_manifest("manifests/quickstart.yaml")   # schema, types, names: reads only the file
    check_manifest(manifest)                                # model configs, datasets, output root
    manifest.to_yaml(), manifest_hash(manifest)             # what the `runs` table records

Both steps raise `ManifestError`, whose lines each name the field path, the bad value and what is
allowed, e.g. `methods[0].params.candidates: -1 is not allowed: fsour.candidates must be a
positive integer, got -1`. Nothing in a manifest is ever evaluated as code: YAML is read with
the safe loader, and every field is plain data checked against a schema. No field can hold a
secret: judges name the environment variable that holds their API key (`api_key_env`).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import re
import reprlib
from collections.abc import Hashable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, TypeAdapter,
                      ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from core.datasets import DATASETS, FIELDS, FILE_TYPES, DatasetError, PromptRecord, load_prompts
from core.judges import JUDGES, RENAMED_JUDGES, Judge, make_judge
from core.method import Method
from core.methods import METHODS, get_method
from core.schemas import STORE_ANSWERS
from core.store import SECRET_NAME, ResultStore, StoreError, _check_id, model_slug

DEFAULT_JUDGE = "refusal"  # offline, always available


class ManifestError(ValueError):
    """A manifest is unusable; `problems` holds one line per problem, each naming its field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _problem(reason: str, *, at: str = "", value: Any = dataclasses.MISSING) -> PydanticCustomError:
    """A validation error for `_format_error`: `at` extends the failing field's path (e.g. into
    `params`), `value` is the offending value, quoted in the message."""
    ctx = {"reason": reason, "at": at}
    if value is not dataclasses.MISSING:
        ctx["value"] = value
    return PydanticCustomError("manifest", "{reason}", ctx)


def _unknown_keys(keys: list[Any], allowed: list[str]) -> PydanticCustomError:
    return PydanticCustomError("unknown_key", "unknown key(s) {keys}", {"keys": keys, "allowed": allowed})


class _Section(BaseModel):
    """A manifest section: only its own keys, types as written (no "5" for 5), immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # Caught here rather than by extra="forbid" so the message can list the allowed keys.
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise _unknown_keys(unknown, list(cls.model_fields))
        return data


class Chunking(_Section):
    """How methods split into work units (the unit of scheduling, retry and resume)."""

    prompts_per_unit: PositiveInt = 8  # prompts per unit of per-prompt work
    rounds_per_unit: PositiveInt = 50  # SAFEx bootstrap rounds per unit


class ModelSpec(_Section):
    name: str  # unique; the model's slug in result paths and the `model` column
    path: str  # "sandbox", a local directory, a hub id or an s3:// prefix
    dtype: str = "auto"  # a name in core.models.DTYPES
    num_gpus: NonNegativeFloat = 0  # per replica (per shard when sharded); 0 = CPU
    num_cpus: PositiveFloat = 1  # per replica (per shard when sharded)
    replicas: PositiveInt = 1  # model actors for this model
    shards: PositiveInt = 1  # actors per replica, each holding a contiguous range of the decoder layers
    # how a sharded replica's forwards go stage to stage: "actors" (plain Ray actor calls, the
    # default) or "compiled" (a Ray Compiled Graph); the results are the same, only the speed differs.
    # Left out of the stored manifest when not set, so a manifest without it keeps its hash (and run id).
    transport: str | None = Field(default=None, exclude_if=lambda transport: transport is None)
    device_map: Literal["auto"] | None = None  # "auto": spread the model over the replica's GPUs
    experts_implementation: str | None = None  # transformers' MoE kernel; None = its default
    trust_remote_code: bool = False
    # "cpu" runs on the CPU even in a replica holding GPUs (debugging; tests on nodes that only claim GPUs)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    revision: str | None = None  # a hub model's branch, tag or commit: part of the model's identity

    @model_validator(mode="after")
    def _device_fits(self) -> ModelSpec:
        if self.device == "cpu" and self.device_map == "auto":
            raise _problem("device_map: auto spreads a model over GPUs, but device is cpu: drop one of them",
                           at=".device_map", value=self.device_map)
        if self.revision is not None and (self.path == "sandbox" or self.path.startswith(("s3://", "/", ".", "~"))):
            raise _problem("a revision pins a hub model; a local or s3:// path is one version already",
                           at=".revision", value=self.revision)
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        try:
            slug = model_slug(name)
        except StoreError:
            slug = None
        if slug != name:
            example = f" (e.g. {slug!r})" if slug else ""
            raise _problem(f"cannot name result directories: use letters, digits, '.', '_' and '-', starting "
                           f"with a letter or digit{example}", value=name)
        return name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        from core.models import DTYPES  # imported when needed: it brings in torch

        if dtype not in DTYPES:
            raise _problem(f"is not one of {', '.join(DTYPES)}", value=dtype)
        return dtype

    @field_validator("experts_implementation")
    @classmethod
    def _known_kernel(cls, kernel: str | None) -> str | None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        known = ["eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()]
        if kernel is not None and kernel not in known:
            raise _problem(f"is not one of {', '.join(known)}", value=kernel)
        return kernel

    # "before": a value of another type (1, true, a list) gets the choices too, not only "input
    # should be a valid string"
    @field_validator("transport", mode="before")
    @classmethod
    def _known_transport(cls, transport: Any) -> str | None:
        from actors.shard_worker import TRANSPORTS  # imported when needed: it brings in Ray and torch

        if transport is not None and (not isinstance(transport, str) or transport not in TRANSPORTS):
            raise _problem(f"is not one of {', '.join(TRANSPORTS)}: actors (plain Ray actor calls, the default) "
                           "or compiled (a Ray Compiled Graph)", value=transport)
        return transport

    @model_validator(mode="after")
    def _one_way_to_split(self) -> ModelSpec:
        if self.shards > 1 and self.device_map is not None:
            raise _problem("a sharded model places each shard itself: use `shards` or `device_map: auto`, "
                           "not both", at=".device_map", value=self.device_map)
        if self.transport is not None and self.shards == 1:
            raise _problem("a transport carries a forward between the shards of a replica, and this model is "
                           "not sharded: set `shards: 2` or more, or drop `transport`",
                           at=".transport", value=self.transport)
        return self

    @property
    def replica_gpus(self) -> float:
        return self.num_gpus * self.shards

    @property
    def replica_cpus(self) -> float:
        return self.num_cpus * self.shards


class DatasetSpec(_Section):
    """Arguments of core.datasets.load_prompts."""

    source: str  # a name in DATASETS, or a .csv / .jsonl / .parquet path or URL
    split: str | None = None
    path: str | None = None  # a local copy of jbb / advbench / advbench50 instead of the hub
    columns: dict[Literal[FIELDS], str | None] | None = None
    limit: PositiveInt | None = None
    sandbox_split: Literal["heldout", "train"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _source_given(cls, data: Any) -> Any:
        # A bare `path:` is the likeliest slip (a local copy of a named dataset): say both forms.
        if isinstance(data, dict) and "source" not in data:
            named = ", ".join(d for d in DATASETS if d != "sandbox")
            raise _problem(f"required, but missing. Either name a dataset, `source: jbb` ({named} or sandbox), "
                           f"with `path: /local/copy.csv` for a local copy of it; or give your own file as "
                           f"`source: ./prompts.csv` ({', '.join(FILE_TYPES)})",
                           at=".source")
        return data

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source not in DATASETS and PurePosixPath(source).suffix.lower() not in FILE_TYPES:
            raise _problem(f"is not one of {', '.join(DATASETS)}, nor a path to a {', '.join(FILE_TYPES)} file",
                           value=source)
        return source

    def load(self) -> list[PromptRecord]:
        return load_prompts(self.source, **self.model_dump(exclude={"source"}))


class JudgeSpec(BaseModel):
    """`type` (a name in core.judges.JUDGES) and that judge's constructor arguments."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    type: str

    @model_validator(mode="after")
    def _buildable(self) -> JudgeSpec:
        if self.type in RENAMED_JUDGES:
            raise _problem(RENAMED_JUDGES[self.type], at=".type")
        if self.type not in JUDGES:
            raise _problem(f"is not one of {', '.join(JUDGES)}", at=".type", value=self.type)
        accepted = list(inspect.signature(JUDGES[self.type]).parameters)
        unknown = [key for key in self.settings if key not in accepted]
        # No judge takes a secret (they read keys from variables named by *_env), so a secret can
        # only arrive as an unknown key; its value is deliberately not echoed.
        secrets = [key for key in unknown if SECRET_NAME.search(str(key)) and not str(key).endswith("_env")]
        if secrets:
            raise _problem(f"key {secrets[0]!r} would hold a secret, and manifests are stored with the results: "
                           f"export the secret as an environment variable and give its name instead "
                           f"(api_key_env: JUDGE_API_KEY)")
        if unknown:
            raise _unknown_keys(unknown, ["type", *accepted])
        try:  # judges check their settings when built; none contacts anything before check()
            self.build()
        except (ValueError, TypeError) as error:
            raise _problem(str(error)) from None
        return self

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self) -> Judge:
        return make_judge(self.type, **self.settings)


class MethodSpec(_Section):
    method: Literal[tuple(METHODS)]
    dataset: str | None = None  # methods with one dataset role
    datasets: dict[str, str] | None = None  # role -> dataset name, for methods with several (safex's groups)
    judge: str | None = None  # one judge; default: refusal
    judges: list[str] | None = Field(default=None, min_length=1)  # several: the first decides
    models: list[str] | None = Field(default=None, min_length=1)  # None: every model
    # fields of the method's params dataclass; missing ones take its defaults
    params: dict[str, Any] = Field(default={}, validate_default=True)

    @field_validator("params")
    @classmethod
    def _params_fit(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "method" in info.data:  # else the method itself was invalid, and reported
            _build_params(info.data["method"], params)
        return params

    @model_validator(mode="after")
    def _datasets_and_judges_fit(self) -> MethodSpec:
        if self.judge is not None and self.judges is not None:
            raise _problem("give either `judge: <name>` or `judges: [<name>, ...]`, not both")
        if self.judges is not None and len(set(self.judges)) != len(self.judges):
            raise _problem("names a judge twice", at=".judges", value=self.judges)
        try:
            method = get_method(self.method)
        except ModuleNotFoundError:
            return self  # reported by params
        if method.roles == ("dataset",):
            if self.dataset is None or self.datasets is not None:
                raise _problem(f"{self.method} takes one dataset: dataset: <name>")
            return self
        roles = [*method.roles, *method.optional_roles]
        shape = "datasets: {" + ", ".join(f"{role}: <name>" for role in roles) + "}"
        if self.datasets is None or self.dataset is not None:
            raise _problem(f"{self.method} takes prompt groups, not `dataset`: {shape}")
        unknown = [role for role in self.datasets if role not in roles]
        if unknown:
            raise _unknown_keys(unknown, roles)
        missing = [role for role in method.roles if role not in self.datasets]
        if missing:
            raise _problem(f"required, but missing ({shape})", at=f".datasets.{missing[0]}")
        return self

    @property
    def judge_names(self) -> tuple[str, ...]:
        """The judges of this method, the deciding one first."""
        return tuple(self.judges) if self.judges is not None else (self.judge or DEFAULT_JUDGE,)

    def roles(self) -> dict[str, str]:
        """Dataset role -> dataset name."""
        return {"dataset": self.dataset} if self.datasets is None else dict(self.datasets)

    def datasets_used(self) -> dict[str, str]:
        """Field path within this method -> dataset name, for every dataset it reads."""
        if self.datasets is None:
            return {"dataset": self.dataset}
        return {f"datasets.{role}": name for role, name in self.datasets.items()}

    def build_params(self) -> Any:
        """This method's params dataclass (FsourParams, ...), defaults filled in."""
        return _build_params(self.method, self.params)


class Manifest(_Section):
    run_id: str | None = None  # load_manifest fills it in when absent
    out: str = "results"  # result root: a local directory or s3://bucket/prefix
    store_answers: Literal[STORE_ANSWERS] = "full"  # what the generations table keeps of each answer
    chunking: Chunking = Chunking()
    models: list[ModelSpec] = Field(min_length=1)
    datasets: dict[str, DatasetSpec] = Field(min_length=1)
    judges: dict[str, JudgeSpec] = Field(default={}, validate_default=True)  # "refusal" is always added
    methods: list[MethodSpec] = Field(min_length=1)

    @field_validator("run_id")
    @classmethod
    def _file_safe(cls, run_id: str | None) -> str | None:
        if run_id is not None:
            try:
                _check_id("run_id", run_id)
            except StoreError as error:
                raise _problem(str(error).split(": ", 1)[1], value=run_id) from None
        return run_id

    @field_validator("judges")
    @classmethod
    def _default_judge(cls, judges: dict[str, JudgeSpec]) -> dict[str, JudgeSpec]:
        # Written out so that the stored manifest says which judge `judge: refusal` meant.
        if DEFAULT_JUDGE in judges:
            return judges
        return {DEFAULT_JUDGE: JudgeSpec(type=DEFAULT_JUDGE), **judges}

    @model_validator(mode="after")
    def _names_resolve(self) -> Manifest:
        problems = []
        first_use: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if model.name in first_use:
                problems.append(f"models[{i}].name: {model.name!r} is already the name of "
                                f"models[{first_use[model.name]}]: model names must be unique")
            first_use.setdefault(model.name, i)
        for i, method in enumerate(self.methods):
            references = [(f"methods[{i}].{field}", name, "dataset", self.datasets)
                          for field, name in method.datasets_used().items()]
            if method.judges is None:
                references.append((f"methods[{i}].judge", method.judge_names[0], "judge", self.judges))
            references += [(f"methods[{i}].judges[{j}]", name, "judge", self.judges)
                           for j, name in enumerate(method.judges or [])]
            references += [(f"methods[{i}].models[{j}]", name, "model", first_use)
                           for j, name in enumerate(method.models or [])]
            for where, name, kind, defined in references:
                if name not in defined:
                    problems.append(f"{where}: {name!r} is not a {kind} in this manifest; "
                                    f"defined: {', '.join(defined)}")
        if problems:
            raise PydanticCustomError("problems", "{lines}", {"lines": problems})
        return self

    def models_for(self, method: MethodSpec) -> list[ModelSpec]:
        """The models `method` runs on: its `models`, or all of them."""
        return [m for m in self.models if method.models is None or m.name in method.models]

    def to_yaml(self) -> str:
        """The manifest as stored in the `runs` table: every field, defaults included (a model's
        `transport` only when set)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


@functools.cache
def _params_adapter(method: str) -> TypeAdapter:
    return TypeAdapter(get_method(method).params)


def _build_params(method: str, params: dict[str, Any]) -> Any:
    """`method`'s params dataclass built from `params`: types checked as pydantic does (lax: a
    YAML list fills a tuple field), then the dataclass's own checks. Errors name the key."""
    try:
        cls = get_method(method).params
    except ModuleNotFoundError as error:
        raise _problem(f"method {method!r} is not available: module {error.name} is missing") from None
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in params if key not in allowed]
    if unknown:
        raise _unknown_keys(unknown, allowed)
    try:
        return _params_adapter(method).validate_python(params)
    except ValidationError as validation:
        error = validation.errors(include_url=False)[0]
        if error["loc"]:  # a field's type
            raise _problem(_lower_first(error["msg"]), at=f".{error['loc'][0]}", value=error["input"]) from None
        # __post_init__ refused the values; its message names the field(s)
        reason = str(error.get("ctx", {}).get("error", error["msg"]))
        named = [key for key in params if re.search(rf"\b{re.escape(key)}\b", reason)]
        if len(named) == 1:
            raise _problem(reason, at=f".{named[0]}", value=params[named[0]]) from None
        raise _problem(reason) from None


# ---------------------------------------------------------------------------------------------
# Loading

# Values a manifest may hold once its aliases are expanded. A real one has hundreds; an alias bomb
# (each level aliasing the one before several times) stays a few hundred bytes while its
# expansion grows exponentially, and everything that walks it (validation, error messages) with it.
MAX_YAML_VALUES = 100_000


class _ManifestLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only: no !!python tags), refusing a key given twice in one
    mapping, which plain YAML resolves silently by keeping the last, and documents whose aliases
    expand to more than MAX_YAML_VALUES values (or refer to themselves)."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # construct_mapping itself reports these
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_expansion(root: yaml.Node) -> None:
    """ConstructorError unless the document under `root`, aliases expanded, has at most
    MAX_YAML_VALUES values. Counted per distinct node (an alias is the node it names), so a
    bomb is measured in microseconds without being expanded."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in in_progress:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it "
                                                    "(a recursive structure); a manifest is a tree",
                                                    node.start_mark)
        in_progress.add(id(node))
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise yaml.constructor.ConstructorError(
                    None, None, f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; a manifest "
                    f"needs far fewer: write the values out, or alias fewer times", child.start_mark)
        in_progress.discard(id(node))
        sizes[id(node)] = total
        return total

    size(root)


def load_manifest(source: str | os.PathLike) -> Manifest:
    """A validated manifest from a file (a Path, or a str ending in .yaml/.yml) or from YAML text.

    A manifest without run_id gets `<file stem>-<first 8 hex of its manifest_hash>`, so the same
    manifest resumes the same run and an edited one starts a new run."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                            and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ManifestError([f"cannot read manifest {str(path)!r}: {error.strerror or error}"]) from None
        stem = path.stem
    else:
        text, stem = str(source), "manifest"
    try:
        data = yaml.load(text, Loader=_ManifestLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ManifestError([_yaml_problem(error)]) from None
    if not isinstance(data, dict):
        raise ManifestError([f"a manifest is a YAML mapping (key: value lines) with models, datasets and "
                             f"methods; this one is {type(data).__name__ if data is not None else 'empty'}"])
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as validation:
        raise ManifestError([line for error in validation.errors(include_url=False)
                             for line in _format_error(error)]) from None
    if manifest.run_id is None:
        # the stem is cut so that the id stays within the store's length limit
        manifest = manifest.model_copy(update={"run_id": f"{model_slug(stem)[:64]}-{manifest_hash(manifest)[:8]}"})
    return manifest


def manifest_hash(manifest: Manifest) -> str:
    """sha256 of the manifest's canonical JSON, leaving out run_id and out: they say where a run
    goes, not what it computes. A run id reused with another hash names a different run."""
    canonical = json.dumps(manifest.model_dump(mode="json", exclude={"run_id", "out"}), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(error, "problem", None) or str(error)
    hint = ""
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in what:
        hint = " (a manifest is plain data: YAML tags such as !!python/object are refused)"
    return f"invalid YAML at {where}{what}{hint}"


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _format_error(error: dict) -> list[str]:
    """Manifest lines for one pydantic error: field path, bad value, what is allowed."""
    kind, ctx, loc = error["type"], error.get("ctx", {}), error["loc"]
    if kind == "problems":
        return ctx["lines"]
    path = (_path(loc) + ctx.get("at", "")).lstrip(".")
    if kind == "unknown_key" or (kind == "literal_error" and loc and loc[-1] == "[key]"):
        if kind == "literal_error":  # a key of a mapping with fixed keys (datasets.*.columns)
            path, keys, allowed = _path(loc[:-2]), [loc[-2]], re.findall(r"'([^']*)'", ctx["expected"])
        else:
            keys, allowed = ctx["keys"], ctx["allowed"]
        where = f"in {path}" if path else "at the top level"
        lines = []
        for key in keys:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {key!r} {where}{guess}; allowed: {', '.join(allowed)}")
        return lines
    prefix = f"{path}: " if path else ""
    if kind == "missing":
        return [f"{prefix}required, but missing"]
    if kind == "manifest":
        if "value" in ctx:  # a reason may say what the value is ("is not one of ...")
            joint = " " if ctx["reason"].startswith("is ") else " is not allowed: "
            return [f"{prefix}{_show(ctx['value'])}{joint}{ctx['reason']}"]
        return [f"{prefix}{ctx['reason']}"]
    if kind == "literal_error":
        return [f"{prefix}{_show(error['input'])} is not one of {ctx['expected']}"]
    return [f"{prefix}{_show(error['input'])} is not allowed: {_lower_first(error['msg'])}"]


# repr with bounded work: a value may be huge (a 1 MB string, a 10^6-item list), and only its start is shown.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 80, 80


def _show(value: Any) -> str:
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:]


# ---------------------------------------------------------------------------------------------
# Checks against the world

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts")  # by family naming


def check_manifest(manifest: Manifest, out: str | None = None) -> None:
    """Check what the manifest points at, starting no work: ManifestError listing every problem.

    The result root (`out`, default manifest.out) must be writable; each model's config must load
    (hub ids need the network or a cached copy; s3:// prefixes need only their config.json) and
    be a supported MoE family; each dataset must load, with unique ids and, for the methods that
    need one, a target per prompt; RoSais' `allowed` must fit each model's experts, and `shards`
    its decoder layers. Judges are not contacted: their endpoints may be reachable only from the
    cluster."""
    from core.families import UnsupportedModelError
    from core.models import ModelLoadError

    problems = []
    try:
        _check_out(out or manifest.out)
    except StoreError as error:
        problems.append(f"{'--out' if out else 'out'}: {error}")

    experts: dict[str, tuple[int, int]] = {}  # model name -> (routed experts, top-k)
    for i, model in enumerate(manifest.models):
        try:
            config = _model_config(model)
            experts[model.name] = _experts(config)
        except (ModelLoadError, UnsupportedModelError, OSError, ValueError) as error:
            problems.append(f"models[{i}] ({model.name}): path {model.path!r}: {_first_paragraph(error)}")
            continue
        layers = config.get("num_hidden_layers")
        if layers and model.shards > layers:  # found here, not by every shard actor failing to start
            problems.append(f"models[{i}] ({model.name}): shards: {model.shards}, but the model has {layers} "
                            "decoder layers and each shard holds at least one")

    prompts: dict[str, list[PromptRecord]] = {}
    for name, dataset in manifest.datasets.items():
        try:
            prompts[name] = dataset.load()
        except DatasetError as error:
            problems.append(f"datasets.{name}: {error}")

    problems += _prompts_too_long(manifest, prompts, checkable=set(experts))

    for i, method in enumerate(manifest.methods):
        entry: Method = get_method(method.method)
        if entry.needs_target:
            for field, name in method.datasets_used().items():
                role = field.removeprefix("datasets.")
                if entry.needs_target is not True and role not in entry.needs_target:
                    continue
                untargeted = [p.id for p in prompts.get(name, []) if p.target is None]
                if untargeted:
                    every = "every prompt" if entry.needs_target is True else f"every {role} prompt"
                    problems.append(
                        f"methods[{i}].{field}: {method.method} needs a target reply for {every}, but dataset "
                        f"{name!r} has {len(untargeted)} without one (e.g. {untargeted[0]!r}): map its target column "
                        f"in datasets.{name}.columns.target")
        if entry.check_datasets is not None:
            sizes = {role: len(prompts[name]) for role, name in method.roles().items() if name in prompts}
            try:
                entry.check_datasets(method.build_params(), sizes)
            except ValueError as error:
                field = next((f for f in method.params if re.search(rf"\b{re.escape(f)}\b", str(error))), None)
                where = f"params.{field}: {method.params[field]!r} is" if field else "datasets are"
                problems.append(f"methods[{i}].{where} not allowed with its datasets: {error}")
        if entry.check_model is not None:
            params = method.build_params()
            for model in manifest.models_for(method):
                if model.name in experts:
                    try:
                        entry.check_model(params, *experts[model.name])
                    except ValueError as error:
                        field = next((f for f in method.params if re.search(rf"\b{re.escape(f)}\b", str(error))),
                                     None)
                        where = f"params.{field}: {method.params[field]!r} is" if field else "params are"
                        problems.append(f"methods[{i}].{where} not allowed for model {model.name!r}: {error}")
    if problems:
        raise ManifestError(problems)


def _prompts_too_long(manifest: Manifest, prompts: dict[str, list[PromptRecord]], checkable: set[str]) -> list[str]:
    """One line per (dataset, model) where a prompt in the model's chat template has more tokens
    than the model has positions: such a prompt can only fail (or crawl) on the cluster. Models
    whose tokenizer is not at hand without a download or a build are skipped."""
    from core.chat import render_chat

    used: dict[str, tuple[ModelSpec, set[str]]] = {}  # model name -> (model, the datasets it reads)
    for method in manifest.methods:
        for model in manifest.models_for(method):
            if model.name in checkable:
                used.setdefault(model.name, (model, set()))[1].update(
                    name for name in method.datasets_used().values() if name in prompts)
    problems = []
    for model, names in used.values():
        limits = _context_and_tokenizer(model)
        if limits is None:
            continue
        positions, tokenizer = limits
        for name in sorted(names):
            records = prompts[name]
            encoded = tokenizer(render_chat(tokenizer, [p.prompt for p in records]), add_special_tokens=False)
            over = [(len(ids), p.id) for ids, p in zip(encoded["input_ids"], records) if len(ids) > positions]
            if over:
                longest, longest_id = max(over)
                problems.append(f"datasets.{name}: {len(over)} prompt(s) longer than model {model.name!r} can read: "
                                f"{longest_id!r} is {longest:,} tokens in its chat template, the model has "
                                f"{positions:,} positions (max_position_embeddings); shorten or drop them")
    return problems


def _context_and_tokenizer(model: ModelSpec) -> tuple[int, Any] | None:
    """(max_position_embeddings, tokenizer) of a model whose files are on this machine or in the
    hub cache; None for s3:// models (the check would download them) and a sandbox not built yet."""
    from transformers import AutoTokenizer

    from core.models import SANDBOX, load_config, resolve_path

    if model.path.startswith("s3://"):
        return None
    if model.path == SANDBOX:
        from core.sandbox import SandboxConfig, default_cache_dir

        built = default_cache_dir() / "sandbox" / SandboxConfig().cache_key()
        if not built.is_dir():
            return None
        path = str(built)
    else:
        path = resolve_path(model.path)
    positions = getattr(load_config(path, model.trust_remote_code), "max_position_embeddings", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError):  # no tokenizer files: the model cannot run anyway, and loading it says so
        return None
    if not positions or tokenizer.chat_template is None:
        return None
    return positions, tokenizer


def _check_out(root: str) -> None:
    """StoreError unless results can be written under `root`, leaving nothing behind: a local root
    that does not exist yet is not created here (a refused manifest writes nothing), only its
    nearest existing parent is checked; an existing root or an S3 prefix gets a probe file that
    is written and deleted."""
    store = ResultStore(root, read_only=True)  # refuses unsupported schemes; writes nothing
    if not store.is_local:
        store.check_writable()
        return
    path = Path(store.root)
    existing = next(p for p in (path, *path.parents) if p.exists())
    fix = "Fix: point the results root at a directory this user can create and write."
    if not existing.is_dir():
        raise StoreError(f"result root {store.root!r} is not writable: {str(existing)!r} is a file, not a directory. "
                         f"{fix}")
    if existing == path:
        store.check_writable()
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"result root {store.root!r} is not writable: this user cannot create it in "
                         f"{str(existing)!r}. {fix}")


def _model_config(model: ModelSpec) -> dict[str, Any]:
    """The model's config as a dict, without loading (or, for s3://, downloading) weights."""
    from core.models import SANDBOX, load_config, resolve_path

    if model.path == SANDBOX:
        from core.sandbox import SandboxConfig

        return {"model_type": "mixtral", **dataclasses.asdict(SandboxConfig())}
    # an s3:// prefix: its config.json only
    path = model.path if model.path.startswith("s3://") else resolve_path(model.path)
    return load_config(path, model.trust_remote_code, model.revision).to_dict()


def _experts(config: dict[str, Any]) -> tuple[int, int]:
    """(routed experts, top-k) of a supported MoE config."""
    from core.families import family_for
    from core.models import ModelLoadError

    family_for(config.get("model_type", "?"))
    count = next((config[key] for key in _EXPERT_COUNT_KEYS if config.get(key)), None)
    if count is None or not config.get("num_experts_per_tok"):
        raise ModelLoadError(f"its config names no expert count ({', '.join(_EXPERT_COUNT_KEYS)}) or "
                             f"num_experts_per_tok")
    if config["num_experts_per_tok"] > count:
        raise ModelLoadError(f"its config routes each token to num_experts_per_tok={config['num_experts_per_tok']} "
                             f"experts but has only {count}: top-k must not exceed the expert count")
    return count, config["num_experts_per_tok"]


def _first_paragraph(error: Exception) -> str:
    # transformers' config errors run to several paragraphs of advice; the first says what is wrong.
    return str(error).strip().split("\n\n")[0]
