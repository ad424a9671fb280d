"""The registry of methods: name -> the module whose `METHOD` defines it (core.method.Method).

Manifest validation, planning, execution and the CLI all read methods from here. Adding a method
is its science module with a `METHOD = Method(...)` entry, plus one line below. Modules are
imported when a method is first used, so reading a manifest needs no torch until it names a
method, and a method whose module is missing fails only the manifests that use it.
"""
from __future__ import annotations

import functools
import importlib

from core.method import Method

METHODS: dict[str, str] = {
    "fsour": "core.fsour",
    "rosais": "core.rosais",
    "safex": "core.safex",
    "steermoe": "core.steermoe",
    "universal_route": "core.universal_route",
}


@functools.cache
def get_method(name: str) -> Method:
    """The registered method `name`: KeyError for an unknown name, ModuleNotFoundError for a missing module."""
    method = importlib.import_module(METHODS[name]).METHOD
    if method.name != name:
        raise ValueError(f"{METHODS[name]}.METHOD is named {method.name!r}, registered as {name!r}")
    return method
