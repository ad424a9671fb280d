"""Executors: run one work unit through its method's registry entry, as rows per result table.

Model units run on a model actor (`execute_unit`); driver units are arithmetic over the rows
earlier stages stored (`execute_driver_unit`). Both return {table: rows}; writing is the
caller's job, all tables of a unit together. Nothing here imports Ray or the manifest.
"""
from __future__ import annotations

from typing import Any, Mapping

from core.chat import JudgePanel, stored_answer
from core.method import Read, Rows, WorkUnit
from core.methods import get_method


def execute_unit(unit: WorkUnit, lm, judges: Mapping[str, Any], store_answers: str) -> Rows:
    """Run a model unit with its method entry's judges (the first decides); generated answers are
    kept, hashed or dropped per `store_answers`."""
    method = get_method(unit.method)
    panel = JudgePanel({name: judges[name] for name in unit.payload["judges"]})
    tables = method.kind(unit.kind).run(unit, lm, panel, method.build_params(unit.payload["params"]))
    if "generations" in tables:
        tables["generations"] = [stored_answer(g, store_answers) for g in tables["generations"]]
    return tables


def execute_driver_unit(unit: WorkUnit, read: Read) -> Rows:
    method = get_method(unit.method)
    return method.kind(unit.kind).run(unit, read, method.build_params(unit.payload["params"]))
