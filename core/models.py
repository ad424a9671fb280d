"""Model loading: a local directory, a hub id or an s3:// prefix, with route control installed once.

One path for every model, the sandbox included: `AutoConfig` first (so a non-MoE or unsupported
model is refused before any weights load), then `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from core.families import UnsupportedModelError, family_for
from core.routing import RouteControl

DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


DEVICES = ("auto", "cpu", "cuda")


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    """A model ready for the methods: weights, tokenizer and its route control."""

    name: str
    model: PreTrainedModel
    tokenizer: Any
    control: RouteControl

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device (a sharded model's driver says its own)."""
        if not isinstance(self.model, PreTrainedModel):
            return self.model.device
        return self.model.get_input_embeddings().weight.device


def cache_root() -> Path:
    return Path(os.environ.get("MOESAFE_CACHE", Path.home() / ".cache" / "moesafe"))


SANDBOX = "sandbox"  # the embedded default model's name in manifests


def resolve_model_path(path: str, weights_sha256: str | None = None) -> str:
    """`sandbox` -> the sandbox model's directory on this node (trained once, then cached); anything
    else as given. `weights_sha256`: the sandbox build a run planned with, which this node's must be."""
    if path == SANDBOX:
        from core.sandbox import build_sandbox

        resolved = str(build_sandbox())
        check_sandbox_weights(path, resolved, weights_sha256)
        return resolved
    return path


def sandbox_weights(path: str, resolved: str) -> str | None:
    """The sha256 of the sandbox's weights when `path` names the sandbox, else None. A hub model's
    revision or a local path names its weights; the sandbox's name does not: a build on another CPU
    trains other weights under the same name."""
    if path != SANDBOX:
        return None
    from core.sandbox import weights_sha256

    return weights_sha256(resolved)


def check_sandbox_weights(path: str, resolved: str, expected: str | None) -> None:
    """Raises when this process's sandbox build is not the one the run planned with (a node of
    another CPU type built its own)."""
    found = sandbox_weights(path, resolved)
    if expected is not None and found != expected:
        raise ModelLoadError(
            f"this node's sandbox build (weights sha256 {found[:12]}) is not the driver's ({expected[:12]}): "
            "sandbox builds differ between CPU types. Run on nodes of the driver's CPU type, or copy the "
            f"driver's build ({resolved}) to every node and give its directory as the model's path")


@dataclass(frozen=True)
class ModelShape:
    family: str
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int


def describe_model(path: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelShape:
    """A model's MoE shape from its config alone: built on the meta device, so no weights load
    (for an s3:// prefix only its config.json is read: planning on the driver downloads no weights)."""
    config = load_config(path if path.startswith("s3://") else resolve_path(path), trust_remote_code, revision)
    family = family_for(getattr(config, "model_type", "?")).model_type
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    control = RouteControl(model)
    control.remove()
    return ModelShape(family, control.num_layers, control.num_experts, control.top_k)


def resolve_path(path: str) -> str:
    """A local directory for `path`: as is if local, downloaded once if s3://, else a hub id."""
    if path.startswith("s3://"):
        return str(_download_s3(path))
    if path.startswith(("/", ".", "~")) or os.path.sep in path and Path(path).expanduser().exists():
        local = Path(path).expanduser()
        if not local.is_dir():
            raise ModelLoadError(f"model path {path!r} does not exist (or is not a directory): "
                                 "point `path` at a saved model directory")
        return str(local)
    return path  # a hub id


def _s3_cache_dir(prefix: str, kind: str) -> Path:
    return cache_root() / kind / hashlib.sha256(prefix.rstrip("/").encode()).hexdigest()[:16]


def _download_s3(prefix: str) -> Path:
    """The model under `prefix`, downloaded once per node into the node-local cache.

    Replicas on one node share the copy: the first takes the file lock and downloads, the others
    wait on the lock and then find the download complete."""
    import s3fs
    from filelock import FileLock

    target = _s3_cache_dir(prefix, "models")
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            fs = s3fs.S3FileSystem()
            if not fs.exists(prefix):
                raise ModelLoadError(f"model path {prefix!r} does not exist on S3")
            if target.exists():  # a download that died half-way
                shutil.rmtree(target)
            fs.get(prefix.rstrip("/") + "/", str(target), recursive=True)
            done.touch()
    return target


def _s3_config_dir(prefix: str) -> Path:
    """A directory holding only the config.json of the model under `prefix`, read afresh (one
    small GET: the prefix may hold another model since the last look); no weights are read."""
    import s3fs

    target = _s3_cache_dir(prefix, "configs")
    config_file = prefix.rstrip("/") + "/config.json"
    try:
        data = s3fs.S3FileSystem().cat_file(config_file)
    except FileNotFoundError:
        raise ModelLoadError(f"{config_file} does not exist: point `path` at a saved model's prefix") from None
    except Exception as error:  # botocore's credential and permission errors share no useful base
        raise ModelLoadError(f"cannot read {config_file}: {type(error).__name__}: {error}") from None
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".config.json.{os.getpid()}.{threading.get_ident()}"
    tmp.write_bytes(data)
    os.replace(tmp, target / "config.json")
    return target


def load_config(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's config (for an s3:// prefix, its config.json alone), with a clear error for
    unreachable hubs and remote code."""
    if path.startswith("s3://"):
        path = str(_s3_config_dir(path))
    elif not os.path.isdir(path):
        from core.hub import hub_unreachable

        endpoint = hub_unreachable()
        if endpoint:
            raise ModelLoadError(f"cannot fetch {path!r}: {endpoint} is unreachable (no network?): point `path` "
                                 "at a local copy of the model directory, or an s3:// prefix; or set "
                                 "HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(f"model {path!r} needs custom code from its repository; it runs only if the "
                                 "manifest sets `trust_remote_code: true` for this model") from e
        raise
    except OSError as e:
        if os.path.isdir(path):
            raise ModelLoadError(f"{path!r} has no readable config.json: is it a saved transformers model?") from e
        raise ModelLoadError(f"cannot fetch {path!r} from the hub (no network?): point `path` at a local "
                             "copy of the model directory, or an s3:// prefix") from e


def load_model(path: str, *, name: str | None = None, dtype: str = "auto", device_map: str | dict | None = None,
               experts_implementation: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, revision: str | None = None,
               device: str = "auto") -> LoadedModel:
    """Load a supported MoE model and install route control on it.

    device: "auto" = "cuda" if any GPU is visible, else the CPU; "cpu" even when GPUs are visible
    (debugging, or tests on nodes that only claim GPUs); "cuda" refuses to fall back to the CPU.
    device_map: None keeps the model on that one device; "auto" spreads a model larger than one
    GPU over the GPUs given to the process. revision: a hub model's branch, tag or commit.
    """
    if device not in DEVICES:
        raise ModelLoadError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model {name or path!r} asks for device: cuda, but this process sees no GPU "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): give it "
                             "num_gpus, or set device: cpu")
    local = resolve_path(path)
    config = load_config(local, trust_remote_code, revision)
    family_for(getattr(config, "model_type", "?"))  # refuses non-MoE and unsupported families early
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    kwargs: dict[str, Any] = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, revision=revision)
    if experts_implementation is None and dtype == "float64":
        experts_implementation = "eager"  # grouped_mm kernels take no float64
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load weights for {path!r}: {e}") from e
    if device_map is None and device != "cpu" and torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        control = RouteControl(model)
    except UnsupportedModelError as e:
        raise ModelLoadError(str(e)) from e
    return LoadedModel(name or path, model, tokenizer, control)
