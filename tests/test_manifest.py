"""Manifests: every kind of mistake is refused before any work starts, with an error naming the
field, the bad value and what is allowed; every manifest shipped in manifests/ loads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from jobs.manifest import ManifestError, check_manifest, load_manifest, manifest_hash

REPO_ROOT = Path(__file__).resolve().parents[1]

GOOD = """
models:
  - {name: sandbox, path: sandbox, dtype: float32}
datasets:
  harmful: {source: sandbox, split: regular, limit: 4}
  jb: {source: sandbox, split: jailbreak, limit: 4}
  benign: {source: sandbox, split: benign, limit: 4}
judges:
  sr: {type: rubric, base_url: "http://127.0.0.1:8000/v1", model: judge-model, api_key_env: JUDGE_API_KEY}
methods:
  - {method: fsour, dataset: harmful, params: {candidates: 10, restarts: 2}}
  - {method: rosais, dataset: harmful, params: {s1: 4, affirmative: [Sure, Here]}}
  - {method: safex, datasets: {regular: harmful, jailbreak: jb, benign: benign}, params: {rounds: 10}}
  - {method: steermoe, dataset: harmful, judge: sr}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(text)
    return caught.value.problems


def edited(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def test_good_manifest_loads_with_defaults_and_params():
    manifest = load_manifest(GOOD)
    assert manifest.out == "results" and manifest.store_answers == "full"
    assert manifest.chunking.prompts_per_unit == 8
    assert list(manifest.judges) == ["refusal", "sr"]  # the offline default is always there
    assert manifest.judges["sr"].settings["api_key_env"] == "JUDGE_API_KEY"
    fsour = manifest.methods[0].build_params()
    assert (type(fsour).__name__, fsour.candidates, fsour.restarts, fsour.threshold) == ("FsourParams", 10, 2, 0.8)
    assert manifest.methods[2].datasets_used() == {"datasets.regular": "harmful", "datasets.jailbreak": "jb",
                                                   "datasets.benign": "benign"}
    assert [m.name for m in manifest.models_for(manifest.methods[0])] == ["sandbox"]


def test_run_id_follows_content_not_formatting(tmp_path):
    path = tmp_path / "my manifest.yaml"
    path.write_text(GOOD)
    manifest = load_manifest(path)
    assert re.fullmatch(r"my-manifest-[0-9a-f]{8}", manifest.run_id)
    assert manifest.run_id.endswith(manifest_hash(manifest)[:8])
    path.write_text("# a comment changes nothing\n" + yaml.safe_dump(yaml.safe_load(GOOD)))
    assert load_manifest(path).run_id == manifest.run_id
    path.write_text(GOOD.replace("candidates: 10", "candidates: 11"))
    assert load_manifest(path).run_id != manifest.run_id
    # run_id and out say where a run goes, not what it computes
    assert manifest_hash(load_manifest("run_id: other\nout: s3://b/p\n" + GOOD)) == manifest_hash(manifest)


@pytest.mark.parametrize("model", ["dtype: float32", "dtype: float32, shards: 2, transport: compiled"])
def test_to_yaml_round_trips(model):
    manifest = load_manifest(edited("dtype: float32", model))
    again = load_manifest(manifest.to_yaml())
    assert again == manifest and manifest_hash(again) == manifest_hash(manifest)


def test_a_sharded_model_picks_its_transport():
    default = load_manifest(edited("dtype: float32", "shards: 2"))
    assert default.models[0].transport is None  # plain actor calls
    # a manifest that does not set it is stored, and hashed, as before the field existed
    assert "transport" not in default.to_yaml()
    compiled = load_manifest(edited("dtype: float32", "shards: 2, transport: compiled"))
    assert compiled.models[0].transport == "compiled" and "transport: compiled" in compiled.to_yaml()


@pytest.mark.parametrize("text, expected", [
    # malformed YAML, with its line
    ("models:\n  - {name: a, path: sandbox\n", r"^invalid YAML at line 3, column 1: expected ',' or '}'"),
    ("models: []\nmodels: []\n", r"^invalid YAML at line 2, column 1: found key 'models' twice"),
    # no code is ever run from a manifest
    ("models: !!python/object/apply:os.system [echo pwned]\n",
     r"^invalid YAML at line 1, column 9: could not determine a constructor for the tag "
     r"'tag:yaml.org,2002:python/object/apply:os.system' \(a manifest is plain data"),
    ("- a\n- b\n", r"^a manifest is a YAML mapping .* this one is list"),
    # unknown keys, top level and nested, with what is allowed
    ("modle: x\n" + GOOD, r"^unknown key 'modle' at the top level \(did you mean 'models'\?\); allowed: run_id, out, "),
    (edited("dtype: float32", "dtype: float32, modle: 3"),
     r"^unknown key 'modle' in models\[0\]; allowed: name, path, dtype, "),
    (edited("limit: 4}", "limit: 4, columns: {prompt: goal, tgt: target}}"),
     r"^unknown key 'tgt' in datasets.harmful.columns \(did you mean 'target'\?\); allowed: prompt, target, category, id"),
    (edited("api_key_env: JUDGE_API_KEY", "modle: x"),
     r"^unknown key 'modle' in judges.sr \(did you mean 'model'\?\); allowed: type, base_url, model, api_key_env, "),
    (edited("rounds: 10", "rounds: 10, bogus: 1"),
     r"^unknown key 'bogus' in methods\[2\].params; allowed: rounds, alpha, pi, seed, "),
    # wrong types and values
    (edited("dtype: float32", "dtype: fp8"), r"^models\[0\].dtype: 'fp8' is not one of auto, float32, float64, "),
    (edited("dtype: float32", "replicas: '2'"), r"^models\[0\].replicas: '2' is not allowed: input should be a valid integer"),
    (edited("dtype: float32", "replicas: 0"), r"^models\[0\].replicas: 0 is not allowed: input should be greater than 0"),
    (edited("dtype: float32", "num_gpus: -1"), r"^models\[0\].num_gpus: -1 is not allowed"),
    # a transport is how a sharded replica's stages talk: named, and only with shards
    (edited("dtype: float32", "shards: 2, transport: grpc"),
     r"^models\[0\].transport: 'grpc' is not one of actors, compiled: actors \(plain Ray actor calls, the default\)"),
    # a value of another type gets the choices too, not only "input should be a valid string"
    (edited("dtype: float32", "shards: 2, transport: 1"), r"^models\[0\].transport: 1 is not one of actors, compiled: "),
    (edited("dtype: float32", "shards: 2, transport: [actors, compiled]"),
     r"^models\[0\].transport: \['actors', 'compiled'\] is not one of actors, compiled: "),
    (edited("dtype: float32", "transport: compiled"),
     r"^models\[0\].transport: 'compiled' is not allowed: .* this model is not sharded: set `shards: 2` or more, "
     r"or drop `transport`"),
    (edited("dtype: float32", "shards: 1, transport: actors"), r"^models\[0\].transport: 'actors' is not allowed: "),
    (edited("name: sandbox,", "name: Qwen/x,"),
     r"^models\[0\].name: 'Qwen/x' is not allowed: cannot name result directories: .* \(e.g. 'Qwen--x'\)"),
    (edited("candidates: 10", "candidates: abc"),
     r"^methods\[0\].params.candidates: 'abc' is not allowed: input should be a valid integer"),
    ("run_id: 'a b'\n" + GOOD, r"^run_id: 'a b' is not allowed: use letters, digits"),
    (edited("models:", "store_answers: some\nmodels:"),
     r"^store_answers: 'some' is not one of 'full', 'hash' or 'none'"),
    (edited("source: sandbox, split: regular", "source: jbbb"),
     r"^datasets.harmful.source: 'jbbb' is not one of jbb, advbench, advbench50, sandbox, nor a path to a "),
    # a local copy without naming what it is a copy of: both working forms are named
    (edited("source: sandbox, split: regular", "path: /local/copy.csv"),
     r"^datasets.harmful.source: required, but missing. Either name a dataset, `source: jbb` .* with "
     r"`path: /local/copy.csv` for a local copy of it; or give your own file as `source: ./prompts.csv`"),
    # required sections
    ("models: []\ndatasets: {}\n", r"^models: \[\] is not allowed: list should have at least 1 item"),
    # unknown method, judge type, and names that resolve to nothing
    (edited("method: steermoe", "method: steermo"),
     r"^methods\[3\].method: 'steermo' is not one of 'fsour', .*'rosais', .*'steermoe'"),  # the registry's names
    (edited("type: rubric", "type: rubrik"),
     r"^judges.sr.type: 'rubrik' is not one of refusal, rubric, classifier"),
    (edited("type: rubric", "type: strongreject"),
     r"^judges.sr.type: judge type 'strongreject' is now 'rubric': .* not comparable with published "
     r"StrongREJECT figures; write `type: rubric`, and add `rubric_file:`"),
    (edited("method: fsour, dataset: harmful", "method: fsour, dataset: harmfull"),
     r"^methods\[0\].dataset: 'harmfull' is not a dataset in this manifest; defined: harmful, jb, benign"),
    (edited("jailbreak: jb", "jailbreak: jbb"),
     r"^methods\[2\].datasets.jailbreak: 'jbb' is not a dataset in this manifest; defined: harmful, jb, benign"),
    (edited("judge: sr", "judge: srr"), r"^methods\[3\].judge: 'srr' is not a judge in this manifest; defined: refusal, sr"),
    (edited("dataset: harmful, judge: sr", "dataset: harmful, models: [sandbx]"),
     r"^methods\[3\].models\[0\]: 'sandbx' is not a model in this manifest; defined: sandbox"),
    (edited("{name: sandbox, path: sandbox, dtype: float32}", "{name: sandbox, path: sandbox}\n  - {name: sandbox, path: x}"),
     r"^models\[1\].name: 'sandbox' is already the name of models\[0\]: model names must be unique"),
    # methods' dataset shapes
    (edited("{regular: harmful, jailbreak: jb, benign: benign}", "{regular: harmful}"),
     r"^methods\[2\].datasets.jailbreak: required, but missing"),
    (edited("method: safex, datasets: {regular: harmful, jailbreak: jb, benign: benign}", "method: safex, dataset: harmful"),
     r"^methods\[2\]: safex takes prompt groups, not `dataset`"),
    # judge settings checked by the judge itself, without contacting it
    (edited("api_key_env: JUDGE_API_KEY", "timeout_s: -1"), r"^judges.sr: rubric judge: timeout_s must be > 0, got -1"),
    (edited("api_key_env: JUDGE_API_KEY", "max_tokens: 0"), r"^judges.sr: rubric judge: max_tokens must be > 0, got 0"),
    (edited("api_key_env: JUDGE_API_KEY", "rubric_file: /nonexistent/rubric.txt"),
     r"^judges.sr: rubric judge: rubric_file '/nonexistent/rubric.txt' does not exist: give the path"),
])
def test_mistake_names_its_field(text, expected):
    found = problems(text)
    assert any(re.search(expected, line) for line in found), found


@pytest.mark.parametrize("method, params, expected", [
    ("fsour", "candidates: -1", r"^methods\[0\].params.candidates: -1 is not allowed: fsour.candidates must be a positive integer"),
    ("fsour", "candidates: 0", r"^methods\[0\].params.candidates: 0 is not allowed: fsour.candidates must be a positive"),
    ("fsour", "restarts: 0", r"^methods\[0\].params.restarts: 0 is not allowed: fsour.restarts must be a positive integer"),
    ("rosais", "s1: 0", r"^methods\[1\].params.s1: 0 is not allowed: rosais.s1 must be a positive integer"),
    ("rosais", "allowed: -2", r"^methods\[1\].params.allowed: -2 is not allowed: rosais.allowed must be a positive"),
    ("rosais", "affirmative: []", r"^methods\[1\].params.affirmative: \[\] is not allowed: rosais.affirmative must be a non-empty"),
    ("safex", "rounds: 0", r"^methods\[2\].params.rounds: 0 is not allowed: rounds, .* must be positive"),  # S
    ("safex", "alpha: 0", r"^methods\[2\].params.alpha: 0 is not allowed: alpha and pi must be in \(0, 1\]"),
    ("steermoe", "top_n: 0", r"^methods\[3\].params.top_n: 0 is not allowed: top_n, .* must be positive"),
    ("steermoe", "mode: sideways", r"^methods\[3\].params.mode: 'sideways' is not allowed: mode must be one of"),
])
def test_method_params_are_checked_by_their_dataclass(method, params, expected):
    pytest.importorskip(f"core.{method}")  # the params module of a method still being written
    index = ["fsour", "rosais", "safex", "steermoe"].index(method)
    data = yaml.safe_load(GOOD)
    data["methods"][index]["params"] = yaml.safe_load("{" + params + "}")
    found = problems(yaml.safe_dump(data))
    assert any(re.search(expected, line) for line in found), found


def test_a_secret_is_refused_and_not_echoed():
    found = problems(edited("api_key_env: JUDGE_API_KEY", "api_key: sk-live-0123456789"))
    assert found == [found[0]] and found[0].startswith("judges.sr: key 'api_key' would hold a secret")
    assert "api_key_env" in found[0] and "sk-live" not in found[0]
    # the variable's name instead of its value is the fix, and fine
    assert load_manifest(GOOD).judges["sr"].settings == {"base_url": "http://127.0.0.1:8000/v1",
                                                        "model": "judge-model", "api_key_env": "JUDGE_API_KEY"}
    # a setting that merely mentions tokens is not a secret
    assert load_manifest(edited("api_key_env:", "max_tokens: 32, api_key_env:")).judges["sr"].settings["max_tokens"] == 32


def test_missing_file_is_named():
    with pytest.raises(ManifestError, match=r"cannot read manifest 'nowhere/x.yaml': No such file"):
        load_manifest("nowhere/x.yaml")


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_manifest_loads(path):
    manifest = load_manifest(path)
    assert manifest.run_id and manifest.methods
    for method in manifest.methods:
        method.build_params()


# ---------------------------------------------------------------------------------------------
# check_manifest: what the manifest points at

@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Model directories and dataset files, good and bad."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.configs import save_tiny_model

    root = tmp_path_factory.mktemp("world")
    save_tiny_model("mixtral", root / "tiny-mixtral")  # 8 experts, top-2
    # a real model, but not a mixture of experts
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(root / "tiny-llama")
    (root / "unknown-type").mkdir()
    (root / "unknown-type" / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    files = {"good.csv": "goal,target\nDo x,Sure\nDo y,Sure\n", "empty.csv": "prompt,target\n",
             "no-prompt.csv": "goal,target\nx,y\n", "dup-ids.csv": "id,prompt,target\na,x,y\na,z,w\n",
             "no-target.csv": "prompt\nx\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "a-file").write_text("not a directory")
    return root


def checked(text: str, out: str) -> list[str]:
    manifest = load_manifest(text)
    try:
        check_manifest(manifest, out=out)
    except ManifestError as error:
        return error.problems
    return []


def test_check_passes_a_good_manifest_and_starts_no_work(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOESAFE_CACHE", str(cache))
    text = GOOD.replace("{name: sandbox, path: sandbox, dtype: float32}",
                        f"{{name: sandbox, path: sandbox}}\n  - {{name: tiny, path: {world}/tiny-mixtral}}")
    text += "  - {method: fsour, dataset: good}\n"
    text = text.replace("datasets:\n", f"datasets:\n  good: {{source: {world}/good.csv, columns: {{prompt: goal}}}}\n", 1)
    assert checked(text, str(tmp_path / "out")) == []
    assert not cache.exists()  # the sandbox model was not built to check it


@pytest.mark.parametrize("models, datasets, methods, expected", [
    ("{name: llama, path: WORLD/tiny-llama}", "", "",
     r"^models\[1\] \(llama\): path '.*tiny-llama': model_type 'llama' is not a supported MoE family; "
     r"supported: deepseek_v2, deepseek_v3, gpt_oss, mixtral, "),
    ("{name: odd, path: WORLD/unknown-type}", "", "",
     r"^models\[1\] \(odd\): path '.*unknown-type': .*model type `frobnicator`"),
    ("{name: gone, path: WORLD/no-such-model}", "", "",
     r"^models\[1\] \(gone\): path '.*no-such-model': model path '.*' does not exist"),
    ("", "{source: WORLD/no-prompt.csv}", "",
     r"^datasets.extra: .*no-prompt.csv has no prompt column \(looked for \['prompt'\]\); its columns are \['goal', 'target'\]"),
    ("", "{source: WORLD/empty.csv}", "", r"^datasets.extra: .*empty.csv has no rows"),
    ("", "{source: WORLD/dup-ids.csv}", "", r"^datasets.extra: .*dup-ids.csv: ids repeat \('a' ×2\)"),
    ("", "{source: WORLD/no-target.csv}", "{method: fsour, dataset: extra}",
     r"^methods\[4\].dataset: fsour needs a target reply for every prompt, but dataset 'extra' has 1 without one "
     r"\(e.g. 'no-target-0000'\)"),
    # top-k related: a RoSais mask cannot allow more experts than the model has
    ("{name: tiny, path: WORLD/tiny-mixtral}", "", "{method: rosais, dataset: harmful, models: [tiny], params: {allowed: 9}}",
     r"^methods\[4\].params.allowed: 9 is not allowed for model 'tiny': rosais.allowed must be between the model's "
     r"top-k \(2\) and its number of experts \(8\), got 9"),
    ("", "", "{method: rosais, dataset: harmful, params: {allowed: 12}}",
     r"^methods\[4\].params.allowed: 12 is not allowed for model 'sandbox': .*number of experts \(8\)"),
])
def test_check_names_the_model_dataset_and_field(world, tmp_path, models, datasets, methods, expected):
    pytest.importorskip("core.rosais")
    text = GOOD
    if models:
        text = text.replace("dtype: float32}", "dtype: float32}\n  - " + models.replace("WORLD", str(world)))
    if datasets:
        text = text.replace("datasets:\n", f"datasets:\n  extra: {datasets.replace('WORLD', str(world))}\n", 1)
    if methods:
        text += f"  - {methods}\n"
    found = checked(text, str(tmp_path / "out"))
    assert any(re.search(expected, line) for line in found), found


def test_only_the_roles_a_method_optimises_towards_need_targets(world, tmp_path):
    """route_monitor attacks its harmful prompts towards their targets; its benign prompts are only answered."""
    text = GOOD.replace("datasets:\n", f"datasets:\n  plain: {{source: {world}/no-target.csv}}\n", 1)
    benign_plain = text + "  - {method: route_monitor, datasets: {harmful: harmful, benign: plain}}\n"
    assert checked(benign_plain, str(tmp_path / "out")) == []
    harmful_plain = text + "  - {method: route_monitor, datasets: {harmful: plain, benign: benign}}\n"
    found = checked(harmful_plain, str(tmp_path / "out"))
    assert len(found) == 1 and re.match(
        r"^methods\[4\].datasets.harmful: route_monitor needs a target reply for every harmful prompt, but dataset "
        r"'plain' has 1 without one \(e.g. 'no-target-0000'\): map its target column in datasets.plain.columns.target$",
        found[0]), found


def test_check_refuses_an_unwritable_output_root(world):
    found = checked(GOOD, str(world / "a-file" / "results"))
    assert len(found) == 1 and re.match(r"^--out: result root '.*a-file/results' is not writable", found[0]), found
    manifest = load_manifest(f"out: {world}/a-file/results\n" + GOOD)
    with pytest.raises(ManifestError, match=r"^out: result root .* is not writable"):
        check_manifest(manifest)


def test_a_method_whose_module_is_missing_is_named(monkeypatch):
    import core.methods

    monkeypatch.setitem(core.methods.METHODS, "steermoe", "core.not_written_yet")
    core.methods.get_method.cache_clear()
    try:
        found = problems(GOOD)
    finally:
        core.methods.get_method.cache_clear()
    assert found == ["methods[3].params: method 'steermoe' is not available: module core.not_written_yet is missing"]
