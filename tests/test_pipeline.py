"""The whole pipeline through real DVC on a tiny corpus and a tiny model, offline.

A throwaway project (this repo's dvc.yaml, params.yaml, stages/ and veritune/, a small
consistent slice of data/raw, params shrunk for speed) is reproduced once per session and
then exercised the way a user would: a no-op rerun, a remote round trip to a fresh clone, an
experiment that changes one training param, and a corrupt export that must stop the
pipeline before anything trains. Every `dvc` call is a subprocess, so this is the real CLI.

    .venv/bin/python -m pytest tests/test_pipeline.py -x -q      # a few minutes on 2 cores
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = VENV_BIN / "dvc"

STAGES = (
    "validate",
    "split",
    "index",
    "agent_db",
    "build_sft",
    "base",
    "train",
    "export",
    "evaluate",
    "rag_eval",
    "agent_eval",
    "csat",
    "gate",
    "stress",
)
METRICS = {
    "evaluate": "metrics/eval.json",
    "rag_eval": "metrics/rag.json",
    "agent_eval": "metrics/agent.json",
}  # else metrics/<stage>.json
N_DOCUMENTS = 40  # the first 20 products (spec sheet + guide each)
N_GROUNDED_QUESTIONS = 80  # questions whose documents are all among those kept
N_NO_DOCUMENT_QUESTIONS = 20  # unanswerable questions about products that do not exist

# Small enough that each stage is dominated by its imports; every split stays non-empty.
PARAM_OVERRIDES = {
    "base": {
        "model": "tiny",
        "tiny": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 128,
            "vocab_size": 600,
        },
        "pretrain": {"steps": 3, "batch_size": 2, "seq_len": 64},
    },
    # logging_steps 1: with 3 steps the default of 10 would log no loss curve at all
    "train": {"max_steps": 3, "batch_size": 4, "save_steps": 2, "logging_steps": 1},
    "evaluate": {"max_questions": 12, "bootstrap_samples": 50, "max_new_tokens": 8},
    "csat": {"conversations": 5, "max_turns": 2, "impatient_turns": 1, "max_new_tokens": 8, "bootstrap_samples": 50},
    # A 3-step model meets no real release bar; these check the plumbing: evidence present, no leak.
    "gate": {
        "criteria": [
            {"metric": "eval.json:leakage.passed", "op": "==", "value": 1, "why": "no test data in SFT"},
            {"metric": "csat.json:finetuned.n", "op": ">=", "value": 5, "why": "CSAT ran"},
        ]
    },
    "rag_eval": {
        "max_questions": 8,
        "ks": [1, 3],
        "headline_k": 3,
        "noise_levels": [0, 2],
        "bootstrap_samples": 100,
        "max_new_tokens": 8,
    },
    "agent_eval": {"max_tasks": 2, "trials": 2, "max_new_tokens": 8, "max_steps": 2, "batch_size": 4},
    "stress": {"clients": 4, "duration_s": 3, "max_tokens": 8},
}

DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: any attempt to go online fails at once
LOCAL = "localhost,127.0.0.1,::1"  # Milvus Lite's own gRPC server must stay reachable


def project_env(project: Path) -> dict[str, str]:
    """The environment of every subprocess: offline, no progress bars, this project's code."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the stages' `python` is the venv's
            # the copied veritune/ is what DVC hashes as a dep, so it is what the stages must import
            # (ahead of the editable install, which points at a working tree others are editing)
            "PYTHONPATH": str(project),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "DVC_NO_ANALYTICS": "1",
            "HTTP_PROXY": DEAD_PROXY,
            "HTTPS_PROXY": DEAD_PROXY,
            "ALL_PROXY": DEAD_PROXY,
            "http_proxy": DEAD_PROXY,
            "https_proxy": DEAD_PROXY,
            "all_proxy": DEAD_PROXY,
            "NO_PROXY": LOCAL,
            "no_proxy": LOCAL,
            "GIT_AUTHOR_NAME": "veritune tests",
            "GIT_AUTHOR_EMAIL": "tests@example.invalid",
            "GIT_COMMITTER_NAME": "veritune tests",
            "GIT_COMMITTER_EMAIL": "tests@example.invalid",
        }
    )
    return env


def sh(project: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in `project`; on an unexpected failure the assertion shows its output."""
    cmd = [str(a) for a in args]
    result = subprocess.run(cmd, cwd=project, env=project_env(project), capture_output=True, text=True)
    if check:
        assert result.returncode == 0, (
            f"`{' '.join(cmd)}` exited {result.returncode} in {project}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def dvc(project: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    return sh(project, DVC, *args, check=check)


def git(project: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return sh(project, "git", *args)


def tiny_corpus() -> tuple[list[dict], list[dict]]:
    """The first products' documents and only the questions answerable (or not) within them."""
    documents = [json.loads(line) for line in (REPO / "data/raw/documents.jsonl").open(encoding="utf-8")]
    questions = [json.loads(line) for line in (REPO / "data/raw/questions.jsonl").open(encoding="utf-8")]
    documents = documents[:N_DOCUMENTS]
    kept_ids = {d["id"] for d in documents}
    grounded = [q for q in questions if q["doc_ids"] and set(q["doc_ids"]) <= kept_ids]
    no_document = [q for q in questions if not q["doc_ids"]]
    return documents, grounded[:N_GROUNDED_QUESTIONS] + no_document[:N_NO_DOCUMENT_QUESTIONS]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def deep_update(base: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict):
            deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value


def make_project(path: Path, questions_extra: Sequence[dict] = ()) -> Path:
    """A fresh git + DVC project with this repo's pipeline, the tiny corpus and tiny params."""
    path.mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", path / "dvc.yaml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "stages", path / "stages", ignore=ignore)
    shutil.copytree(REPO / "veritune", path / "veritune", ignore=ignore)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    deep_update(params, PARAM_OVERRIDES)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    documents, questions = tiny_corpus()
    write_jsonl(path / "data/raw/documents.jsonl", documents)
    write_jsonl(path / "data/raw/questions.jsonl", questions + list(questions_extra))
    shutil.copytree(REPO / "data/raw/business", path / "data/raw/business")
    shutil.copy2(REPO / "data/raw/agent_tasks.jsonl", path / "data/raw/agent_tasks.jsonl")
    (path / ".gitignore").write_text("__pycache__/\n*.pyc\n/models/checkpoints/\n", encoding="utf-8")
    git(path, "init", "--quiet", "--initial-branch", "main")
    git(path, "config", "user.email", "tests@example.invalid")
    git(path, "config", "user.name", "veritune tests")
    dvc(path, "init", "--quiet")
    dvc(path, "config", "core.analytics", "false")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "tiny veritune project")
    return path


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (relative path -> hash)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f.relative_to(path)) if f != path else f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    }


def running_stages(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The tiny project after one offline `dvc repro`, committed so experiments can branch off it."""
    path = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    result = dvc(path, "repro")
    assert running_stages(result.stdout) == set(STAGES), result.stdout
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "dvc repro")
    return path


def test_repro_writes_every_declared_output_offline(project):
    """One `dvc repro` with a dead proxy and the hub offline builds everything dvc.yaml declares."""
    for out in (
        "data/validated/documents.jsonl",
        "data/validated/questions.jsonl",
        "reports/validation.json",
        "data/split/questions_train.jsonl",
        "data/split/questions_val.jsonl",
        "data/split/questions_test.jsonl",
        "data/split/doc_split.json",
        "data/index/milvus.db",
        "data/index/chunks.jsonl",
        "data/sft/train.jsonl",
        "data/sft/val.jsonl",
        "models/base/config.json",
        "models/base/tokenizer.json",
        "models/base/tokenizer_config.json",
        "models/adapter/adapter_config.json",
        "models/adapter/adapter_model.safetensors",
        "reports/eval/eval.md",
        "reports/eval/eval_comparison.png",
        "reports/eval/predictions.jsonl",
        "metrics/train/metrics.json",
        "metrics/train/plots/metrics/loss.tsv",
        "data/agent/business.sqlite",
        "reports/agent/agent.md",
        "reports/agent/episodes.jsonl",
    ):
        assert (project / out).exists(), f"{out} missing after dvc repro"
    for stage in STAGES:
        metrics = METRICS.get(stage, f"metrics/{stage}.json")
        assert (project / metrics).is_file(), f"{metrics} missing"

    # each artifact carries the config that made it
    for config, section, expected in (
        ("models/base/base_config.json", "tiny", PARAM_OVERRIDES["base"]["tiny"]),
        ("models/adapter/train_config.json", None, PARAM_OVERRIDES["train"]),
        ("data/index/index_config.json", "params", {"uri": "data/index/milvus.db"}),
    ):
        saved = json.loads((project / config).read_text(encoding="utf-8"))
        saved = saved[section] if section else saved
        assert {k: saved.get(k) for k in expected} == expected, f"{config} does not hold the params it ran with"

    split = json.loads((project / "metrics/split.json").read_text(encoding="utf-8"))
    assert all(split[f"n_questions_{s}"] > 0 for s in ("train", "val", "test")), split
    train = json.loads((project / "metrics/train.json").read_text(encoding="utf-8"))
    assert train["steps"] == PARAM_OVERRIDES["train"]["max_steps"], train
    evaluation = json.loads((project / "metrics/eval.json").read_text(encoding="utf-8"))
    for variant in ("base", "finetuned"):
        assert set(evaluation[variant]) == {"closed_book", "rag", "oracle"}, evaluation.keys()
    assert evaluation["n_test_questions"] == PARAM_OVERRIDES["evaluate"]["max_questions"]
    gate = json.loads((project / "metrics/gate.json").read_text(encoding="utf-8"))
    assert gate["passed"] and (project / "models/release/release.json").is_file(), gate
    assert (project / "reports/release/report.html").is_file() and (
        project / "reports/csat/csat_histogram.png"
    ).is_file()
    agent = json.loads((project / "metrics/agent.json").read_text(encoding="utf-8"))
    assert agent["oracle"]["success"] == 1.0, agent
    # 2 tasks x agent_eval.trials (2) for the fine-tuned model, x base_trials (params.yaml: 1) for the base
    assert agent["finetuned"]["episodes"] == 4 and agent["base"]["episodes"] == 2 * agent["base_trials"], agent


def test_second_repro_has_nothing_to_do(project):
    """Nothing changed, so nothing reruns: outputs are not touched by later readers (the index)."""
    status = dvc(project, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    start = time.monotonic()
    result = dvc(project, "repro")
    seconds = time.monotonic() - start
    assert running_stages(result.stdout) == set(), result.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in result.stdout, result.stdout
    assert seconds < 60, f"a no-op dvc repro took {seconds:.0f}s"


def test_remote_round_trip_restores_a_clone(project, tmp_path):
    """push to a remote, then a fresh clone pulls byte-identical artifacts and needs no rerun."""
    dvc(project, "remote", "add", "--default", "local", tmp_path / "remote")
    git(project, "add", ".dvc/config")
    git(project, "commit", "--quiet", "-m", "default remote")
    dvc(project, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", project, clone)
    assert not (clone / "models/adapter").exists(), "the adapter must come from DVC, not from git"
    dvc(clone, "pull")
    for artifact in ("models/adapter/adapter_model.safetensors", "data/index/milvus.db", "models/base"):
        assert digest(clone / artifact) == digest(project / artifact), f"{artifact} differs after dvc pull"
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout


def test_train_param_experiment_reruns_only_train_and_evaluate(project):
    """`dvc exp run -S train.learning_rate=...` retrains and re-evaluates, nothing upstream."""
    result = dvc(project, "exp", "run", "--name", "lr-1e-3", "-S", "train.learning_rate=0.001")
    assert running_stages(result.stdout) == {
        "train",
        "export",
        "evaluate",
        "rag_eval",
        "agent_eval",
        "csat",
        "gate",
        "stress",
    }, result.stdout

    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    train_diff = diff.get("metrics/train.json", {})
    assert {"train_loss", "val_loss"} & set(train_diff), f"no train loss changed: {diff}"


def loss_plot(project: Path, out_dir: Path) -> list[dict]:
    """The points of dvc.yaml's `train_loss` plot as `dvc plots show` renders them."""
    shown = json.loads(dvc(project, "plots", "show", "--json", "-o", out_dir).stdout)
    assert not shown.get("errors"), shown["errors"]
    assert "train_loss" in shown["data"], shown["data"].keys()
    return [point for plot in shown["data"]["train_loss"] for point in plot["content"]["data"]["values"]]


def test_plots_render(project, tmp_path):
    """`dvc plots show` renders every plot dvc.yaml declares without an error."""
    assert loss_plot(project, tmp_path / "plots"), "the train_loss plot has no points"


def test_loss_plot_is_the_training_curve(project, tmp_path):
    """One point per logged step (train.logging_steps is 1 here), not just the run's mean."""
    steps = {point["step"] for point in loss_plot(project, tmp_path / "plots")}
    assert len(steps) == PARAM_OVERRIDES["train"]["max_steps"], steps


def test_bad_records_stop_the_pipeline_before_training(tmp_path):
    """A dangling document id and an e-mail address fail `validate`; nothing downstream exists."""
    bad = [
        {
            "id": "q-bad-link",
            "question": "What does the Juniper T6 Kettle cost?",
            "answers": ["$79"],
            "doc_ids": ["doc-9999"],
            "kind": "single_hop",
        },
        {
            "id": "q-bad-email",
            "question": "Can jane.doe@example.com return the Juniper T6 Kettle?",
            "answers": [],
            "doc_ids": [],
            "kind": "unanswerable",
        },
    ]
    path = make_project(tmp_path / "project", questions_extra=bad)
    result = dvc(path, "repro", check=False)
    assert result.returncode != 0, result.stdout
    report = result.stdout + result.stderr
    assert "id=q-bad-link field=doc_ids[0]" in report and "doc-9999" in report, report
    assert "id=q-bad-email field=question" in report, report
    for out in ("data/validated", "data/split", "data/index", "data/sft", "models/base", "models/adapter"):
        assert not (path / out).exists(), f"{out} was written although validation failed"


def test_rag_eval_compares_retrieval_modes_and_writes_its_report(project):
    """The `rag_eval` stage ran in the same `dvc repro`: hybrid vs dense, answers, injection."""
    rag = json.loads((project / "metrics/rag.json").read_text(encoding="utf-8"))
    headline = f"recall@{PARAM_OVERRIDES['rag_eval']['headline_k']}"
    assert set(rag["retrieval"]["test"]) == {"dense", "bm25", "hybrid"}
    assert rag["hybrid_minus_dense"]["test"][headline]["n"] > 0
    assert set(rag["answers"]["finetuned"]["k"]) == {"1", "3"}
    n_sampled = PARAM_OVERRIDES["rag_eval"]["max_questions"]
    assert rag["injection"]["finetuned"]["n"] == rag["n_answer_questions"] == n_sampled
    for name in ("rag.md", "retrieval_recall.png", "answers_vs_k.png", "answers_vs_noise.png"):
        assert (project / "reports/rag" / name).is_file(), name
