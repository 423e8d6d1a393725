"""params.yaml loads into each stage's dataclass, bad values are all reported at once, values
that must agree across sections are checked, no value has a second source in the code, and
every stage's dvc.yaml entry declares exactly the params and script it reads."""

import ast
import dataclasses
import re
import typing

import pytest
import yaml

from tests.conftest import REPO
from veritune.core.config import LINKS, STAGE_PARAMS, ParamsError, load_params, parse_params

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("section", sorted(STAGE_PARAMS))
def test_every_section_of_params_yaml_loads(section):
    params = load_params(section, REPO / "params.yaml")
    assert isinstance(params, STAGE_PARAMS[section])


def test_params_yaml_has_no_unknown_sections():
    assert set(PARAMS) == set(STAGE_PARAMS)


def test_every_knob_in_params_yaml_is_commented():
    text = (REPO / "params.yaml").read_text()
    uncommented = [
        line
        for line in text.splitlines()
        if re.match(r"^\s+\w+: \S", line) and "#" not in line and not line.strip().startswith(("- ",))
    ]
    # Keys whose meaning is plain from the name alone may go uncommented.
    plain = {
        "seed",
        "collection",
        "eval_ks",
        "lr_scheduler",
        "warmup_ratio",
        "target_modules",
        "num_layers",
        "hidden_size",
        "num_heads",
        "max_position_embeddings",
        "batch_size",
        "seq_len",
        "warmup_steps",
        "learning_rate",
        "logging_steps",
        "abstain_answer",
        "system_prompt",
        "max_question_chars",
        "unseen_val_doc_fraction",
        "seen_val_fraction",
        "bootstrap_samples",
    }
    missing = [line.strip() for line in uncommented if line.split(":")[0].strip() not in plain]
    assert not missing, f"params.yaml knobs without a trade-off comment: {missing}"


def test_all_problems_are_listed_together():
    with pytest.raises(ParamsError) as err:
        parse_params(
            "train", {**PARAMS["train"], "lora_r": 0, "lr": 1e-4, "quantization": "int3", "learning_rate": 2.0}
        )
    message = str(err.value)
    assert "train.lora_r must be > 0, got 0" in message
    assert "train.lr is not a known setting" in message
    assert "train.quantization must be one of" in message
    assert "train.learning_rate must be in (0, 1)" in message


def test_nested_sections_are_checked():
    with pytest.raises(ParamsError, match=r"base.tiny.hidden_size must be divisible by base.tiny.num_heads"):
        parse_params(
            "base",
            {
                **PARAMS["base"],
                "tiny": {**PARAMS["base"]["tiny"], "hidden_size": 100, "num_heads": 3, "num_kv_heads": 1},
            },
        )
    with pytest.raises(ParamsError, match=r"base.revision must pin a commit"):
        parse_params("base", {**PARAMS["base"], "model": "meta-llama/Llama-3.1-8B-Instruct"})


def test_wrong_types_are_rejected():
    with pytest.raises(ParamsError, match=r"index.chunk_words must be an integer, got 'many'"):
        parse_params("index", {**PARAMS["index"], "chunk_words": "many"})
    with pytest.raises(ParamsError, match=r"train.packing must be true or false"):
        parse_params("train", {"packing": "yes"})


def _sections_read_by(script):
    """Sections a stage script passes to load_params(...)."""
    tree = ast.parse(script.read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params"
    }


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_dvc_stage_declares_exactly_what_its_script_reads(stage):
    entry = DVC["stages"][stage]
    script = REPO / "stages" / f"{stage}.py"
    assert entry["cmd"] == f"python stages/{stage}.py"
    assert f"stages/{stage}.py" in entry["deps"]
    declared = {p if isinstance(p, str) else next(iter(p)) for p in entry.get("params", [])}
    assert declared == _sections_read_by(script)
    assert stage in STAGE_PARAMS, f"params.yaml has no section for stage {stage}"


def test_every_value_is_required_so_params_yaml_is_its_only_source():
    """No field has a default that could disagree with params.yaml; a missing key says so."""

    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (cls, f.name)
            hint = typing.get_type_hints(cls)[f.name]
            for inner in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(inner):
                    walk(inner)

    for cls in STAGE_PARAMS.values():
        walk(cls)
    train = {k: v for k, v in PARAMS["train"].items() if k != "lora_r"}
    with pytest.raises(ParamsError, match=r"train.lora_r is required: params.yaml sets every value"):
        parse_params("train", train)


def _write_params(tmp_path, **changes):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_linked_values_are_checked_at_load(tmp_path):
    """The 8B recipe shows more passages in training: the server must show as many."""
    assert {(link.left, link.right) for link in LINKS} >= {("serve.retrieval_k", "build_sft.context_chunks")}
    path = _write_params(tmp_path, build_sft__context_chunks=5)
    for section in ("build_sft", "serve"):
        with pytest.raises(ParamsError) as err:
            load_params(section, path)
        assert "serve.retrieval_k (2) must equal build_sft.context_chunks (5)" in str(err.value)
        assert "change them together" in str(err.value)
    load_params("evaluate", path)  # a section outside the link loads
    both = _write_params(tmp_path, build_sft__context_chunks=5, serve__retrieval_k=5)
    assert load_params("serve", both).retrieval_k == load_params("build_sft", both).context_chunks == 5
    with pytest.raises(ParamsError, match=r"stress.max_tokens \(99\) must be at most serve.max_new_tokens \(64\)"):
        load_params("stress", _write_params(tmp_path, stress__max_tokens=99))


def test_the_8b_recipe_in_params_yaml_changes_linked_values_together():
    header = [line for line in (REPO / "params.yaml").read_text().splitlines() if line.startswith("#")]
    recipe = "\n".join(header)
    for link in LINKS:
        if link.op == "==" and link.right in recipe:
            assert link.left in recipe, f"the recipe changes {link.right} but not {link.left}"
