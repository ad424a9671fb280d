"""Packaging: the wheel `pip install .` builds and the editable one `make setup` builds (through
setuptools' build backend, offline, in a copy of the project) carry the three packages and the
`moesafe` command, and the editable build says nothing about folders shadowing the packages."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "actors", "jobs")

# pip calls each hook of the build backend in a process of its own
BUILD = "import sys; from setuptools import build_meta; print('built', getattr(build_meta, sys.argv[1])(sys.argv[2]))"


def build(hook: str, project: Path, out: Path) -> tuple[zipfile.ZipFile, str]:
    """The wheel that setuptools' `hook` builds from `project`, and what the build printed to stderr."""
    done = subprocess.run([sys.executable, "-c", BUILD, hook, str(out)], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (name,) = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("built ")]
    return zipfile.ZipFile(out / name), done.stderr


def test_wheel_and_editable_wheel_carry_the_packages_and_the_command(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / "tests").mkdir()  # a folder beside the packages that must stay out of the wheel
    (project / "tests" / "__init__.py").touch()
    wheel, _ = build("build_wheel", project, tmp_path / "wheel")
    editable, said = build("build_editable", project, tmp_path / "editable")
    assert "Editable installation" not in said, said[-4000:]

    files = set(wheel.namelist())
    sources = {path.relative_to(project).as_posix() for package in PACKAGES
               for path in (project / package).rglob("*") if path.is_file()}
    assert sources <= files and "jobs/report.html.jinja" in files
    assert {name.split("/")[0] for name in files} == {*PACKAGES, "moesafe-0.1.0.dist-info"}
    for built in (wheel, editable):
        entry_points = built.read("moesafe-0.1.0.dist-info/entry_points.txt").decode()
        assert "moesafe = jobs.cli:main" in entry_points

    # The editable wheel puts the project's root on sys.path: every package imports from it.
    (pth,) = [name for name in editable.namelist() if name.endswith(".pth")]
    assert editable.read(pth).decode().split() == [str(project.resolve())]
    imported = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "import core.method, actors.judge_worker, jobs.cli; print(jobs.cli.__file__)",
                               str(project)], capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0 and imported.stdout.strip() == str(project / "jobs" / "cli.py"), imported.stderr
