"""benchmarks/readme_figures.py rewrites the README's marked block from a quickstart run's tables."""
from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schemas import TABLES
from core.store import ResultStore
from jobs.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

RUN = load_manifest(REPO / "manifests" / "quickstart.yaml").run_id
OK = {"method": "x", "kind": "x", "status": "ok", "attempts": 1, "seconds": 2.0, "error": None}


def metric(method, metric, value, n=4, dataset="harmful", judge="refusal"):
    return {"dataset": dataset, "method": method, "metric": metric, "value": value, "n": n, "judge": judge,
            "params_hash": "0123"}


@pytest.fixture
def quickstart_root(tmp_path) -> str:
    """A finished run of the quickstart's id with a few rows of each table the figures read."""
    root = str(tmp_path / "results")
    store = ResultStore(root)
    store.write_run(RUN, "models: []\n", versions={"moesafe": "0.1.0", "torch": "2.13.0", "transformers": "5.1",
                                                   "ray": "2.60"})
    store.write_unit(RUN, "sandbox", "metrics-a", {"metrics": [
        metric("fsour", "asr_baseline", 0.0), metric("fsour", "asr", 0.75),
        metric("rosais", "asr_at_L0", 0.0), metric("rosais", "asr_at_L10", 1.0), metric("rosais", "asr_at_L2", 0.5),
        metric("safex", "refusal_before", 1.0, dataset="reg"), metric("safex", "refusal_after", 0.5, 2, "reg"),
        metric("safex", "refusal_after_random", 1.0, dataset="reg"),
        metric("steermoe", "asr_unsteered", 0.0), metric("steermoe", "asr_steered", 0.25)]}, OK)
    params = "{}"
    store.write_unit(RUN, "sandbox", "scores", {"rosais_scores": [
        {"prompt_id": "p", "dataset": "harmful", "layer": layer, "score": score, "baseline_logprob": -1.0,
         "best_mask_experts": [0, 1], "s1": 16, "seed": 42, "scope": "prompt", "params": params}
        for layer, score in ((0, 1.5), (1, 3.25))]}, OK)
    store.write_unit(RUN, "sandbox", "sets", {"safex_experts": [
        {"expert_set": "HCDG", "phase": "decode", "layer": 1, "expert": 6, "frequency": 1.0, "params": params},
        {"expert_set": "HRCG", "phase": "decode", "layer": None, "expert": None, "frequency": None, "params": params},
    ]}, OK)
    store.finish_run(RUN)
    return root


def readme(tmp_path, body: str = "") -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\ntext before\n\n{figures.BEGIN}\nold figures\n{figures.END}\n\ntext after\n{body}")
    return path


def test_block_is_rewritten_from_the_run_and_the_rest_is_kept(tmp_path, quickstart_root, capsys):
    path = readme(tmp_path)
    assert figures.main(["--out", quickstart_root, "--readme", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("# title\n\ntext before\n\n" + figures.BEGIN) and text.endswith(figures.END + "\n\ntext after\n")
    assert "old figures" not in text
    assert "| F-SOUR | ASR unattacked → attacked | 0.00 → 0.75 (n = 4) |" in text
    assert "| RoSais | ASR(L), L = 0, 2, 10 | 0.00, 0.50, 1.00 (n = 4) |" in text  # numeric order of L
    assert "| RoSais | layers by mean score (highest first) | 1 (3.25), 0 (1.50) |" in text
    assert "| SAFEx | HCDG / HRCG (layer:expert) | 1 (1:6) / **empty** |" in text
    assert "| SAFEx | refusal on reg: before → HRCG off → as many random off | 1.00 → 0.50 → 1.00 (n = 4/2) |" in text
    assert "| SteerMoE | ASR unsteered → steered | 0.00 → 0.25 (n = 4) |" in text
    assert f"Run `{RUN}`: 3 units, " in text and "(6 s summed over units)" in text and "torch 2.13.0, transformers 5.1, ray 2.60" in text
    assert " cores (" in text and "at commit " in text


def test_several_judges_give_one_value_each(tmp_path, quickstart_root):
    store = ResultStore(quickstart_root)
    store.write_unit(RUN, "sandbox", "metrics-a", {"metrics": [
        metric("fsour", "asr_baseline", 0.0), metric("fsour", "asr", 0.5),
        metric("fsour", "asr_baseline", 0.0, judge="strongreject"), metric("fsour", "asr", 0.25, judge="strongreject"),
    ]}, OK)
    block = figures.figures_block(quickstart_root, figures.finished_run(quickstart_root, RUN))
    assert ("| F-SOUR | ASR unattacked → attacked | refusal: 0.00 → 0.50 (n = 4); "
            "strongreject: 0.00 → 0.25 (n = 4) |") in block


def test_metrics_without_a_judge_column_read_as_one_judge(tmp_path, quickstart_root):
    """A run stored before metrics had `judge` (schema 1): rows are read by column name."""
    v1 = pa.schema([f for f in TABLES["metrics"].schema if f.name not in ("judge", "params_hash")])
    rows = [{"run_id": RUN, "model": "sandbox", "unit_id": "metrics-a", "schema_version": 1,
             **{k: v for k, v in metric("fsour", name, value).items() if k not in ("judge", "params_hash")}}
            for name, value in (("asr_baseline", 0.0), ("asr", 0.75))]
    pq.write_table(pa.Table.from_pylist(rows, schema=v1),
                   Path(quickstart_root) / "metrics" / "model=sandbox" / f"run={RUN}" / "metrics-a.parquet")
    block = figures.figures_block(quickstart_root, figures.finished_run(quickstart_root, RUN))
    assert "| F-SOUR | ASR unattacked → attacked | 0.00 → 0.75 (n = 4) |" in block


def test_a_root_without_the_run_or_a_readme_without_markers_is_refused(tmp_path, quickstart_root, capsys):
    assert figures.main(["--out", str(tmp_path / "nothing"), "--readme", str(readme(tmp_path))]) == 2
    assert f"holds no finished run {RUN} of quickstart.yaml: run `make quickstart`" in capsys.readouterr().err
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert figures.main(["--out", quickstart_root, "--readme", str(bare)]) == 2
    assert "needs exactly one block between" in capsys.readouterr().err and bare.read_text() == "# no markers\n"


@pytest.mark.slow
def test_the_sandbox_block_names_the_weights_and_the_machine_of_its_rates(tmp_path, sandbox_dir, monkeypatch):
    """benchmarks/sandbox_figures.py: the rates of the cached build, with its weights' sha256 and the CPU
    (another CPU's float kernels train another model), through the same command line as the run blocks."""
    spec = importlib.util.spec_from_file_location("sandbox_figures", REPO / "benchmarks" / "sandbox_figures.py")
    sandbox_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sandbox_figures)
    monkeypatch.setenv("MOESAFE_CACHE", str(sandbox_dir.parents[1]))  # the cached build, as `make figures` finds it
    path = tmp_path / "README.md"
    path.write_text(f"before\n{sandbox_figures.BEGIN}\n| 0.47 typed by hand |\n{sandbox_figures.END}\nafter\n")
    assert sandbox_figures.main(["--readme", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("before\n" + sandbox_figures.BEGIN) and text.endswith(sandbox_figures.END + "\nafter\n")
    assert "typed by hand" not in text
    weights = hashlib.sha256((sandbox_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"sha256 `{weights[:12]}`" in text and f"cache key `{sandbox_dir.name}`" in text
    assert re.search(r"\| refusal, harmful \(regular wordings\) \| [01]\.\d\d \(n = 66\) \|", text)
    assert len(re.findall(r"\| … wording “[^”]*\{task\}[^”]*” \| [01]\.\d\d \|", text)) == 3
    assert re.search(r"torch CPU kernels \w+", text) and "at commit " in text
    if Path("/proc/cpuinfo").exists():  # Linux names the CPU's SIMD flags
        assert re.search(r"avx512f (yes|no)", text)
