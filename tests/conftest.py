"""Shared fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# One sandbox cache for the test process and every Ray worker it starts (they inherit the
# environment): the git-ignored `.cache/moesafe` of the repository unless MOESAFE_CACHE is set.
os.environ.setdefault("MOESAFE_CACHE", str(REPO_ROOT / ".cache" / "moesafe"))
# Tiny models gain nothing from intra-op threads, and the test process plus its Ray workers
# would oversubscribe two cores (seen: 10-90x slower tiny forwards). Read by torch at import.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sandbox_dir() -> Path:
    """The sandbox model directory, built once (later sessions reuse the cache; its key changes
    with the build config and SANDBOX_VERSION)."""
    from core.sandbox import build_sandbox

    return build_sandbox()
