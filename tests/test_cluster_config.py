"""cluster.yaml against Ray's own cluster-launcher validation (its JSON schema and checks), as
`ray up` applies it: defaults filled in by prepare_config, then validate_config. No cloud is
contacted."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_cluster_yaml(config):
    validate_config(config)  # as written
    prepared = prepare_config(copy.deepcopy(config))  # as `ray up` sees it
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    gpu_types = {name for name, node in prepared["available_node_types"].items()
                 if node["resources"].get("GPU", 0) > 0}
    assert {"gpu_1x_h100", "gpu_8x_a100"} <= gpu_types
    assert any(command.endswith("pip install --quiet -e ~/moesafe") for command in prepared["setup_commands"])
    assert "~/moesafe" in prepared["file_mounts"]


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.pop("provider"), r"'provider' is a required property"),
    (lambda c: c.update(max_worker=4), r"Additional properties are not allowed \('max_worker' was unexpected\)"),
    (lambda c: c["available_node_types"]["gpu_8x_a100"].pop("resources"), r"'resources' is a required property"),
    (lambda c: c["available_node_types"]["gpu_8x_a100"]["resources"].update(GPU="8"), r"'8' is not of type 'integer'"),
])
def test_ray_rejects_a_broken_copy(config, break_it, error):
    break_it(config)
    with pytest.raises(jsonschema.ValidationError, match=error):
        validate_config(config)


def test_ray_rejects_an_unknown_head_node_type(config):
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="`head_node_type` must be one of `available_node_types`"):
        validate_config(config)
