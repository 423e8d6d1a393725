"""The release gate: thresholds from params, a decision naming each failing criterion, and the
release artifact (adapter + release.json + MODEL_CARD.md) built only when every criterion passes.

A criterion reads one number from a metrics file: `eval.json:finetuned.rag.unanswerable.abstention`
is `metrics/eval.json` -> ["finetuned"]["rag"]["unanswerable"]["abstention"]. A missing file or key
fails the criterion (a gate must not pass on absent evidence). The same criteria are evaluated for
the base model by mapping `finetuned` to `base` in the key, so the report shows what the
fine-tuning bought.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from veritune.core.io import atomic_path, write_json

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def read_metric(metrics_dir: str | Path, spec: str) -> float | None:
    """The number `spec` ("file.json:dotted.key") names, or None if the file or key is absent."""
    file, _, key = spec.partition(":")
    path = Path(metrics_dir) / file
    if not path.is_file():
        return None
    node = json.loads(path.read_text(encoding="utf-8"))
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or isinstance(node, (int, float)):
        return float(node)
    return None


def for_variant(spec: str, variant: str) -> str:
    """The same criterion for another model: `finetuned` in the key (a segment, or a flat
    headline prefix such as `finetuned_rag_f1_unseen`) becomes `variant`."""
    file, _, key = spec.partition(":")
    return f"{file}:" + re.sub(r"(?<![A-Za-z0-9])finetuned(?=[._]|$)", variant, key)


def check_criteria(criteria: Sequence, metrics_dir: str | Path, variant: str = "finetuned") -> list[dict]:
    rows = []
    for c in criteria:
        spec = c.metric if variant == "finetuned" else for_variant(c.metric, variant)
        value = read_metric(metrics_dir, spec)
        passed = value is not None and OPS[c.op](value, c.value)
        rows.append(
            {
                "metric": spec,
                "op": c.op,
                "threshold": c.value,
                "value": value,
                "passed": passed,
                "why": c.why,
                **({} if value is not None else {"problem": "metric missing"}),
            }
        )
    return rows


def describe_failure(row: dict) -> str:
    got = "missing" if row["value"] is None else f"{row['value']:.4g}"
    return f"{row['metric']} = {got}, needs {row['op']} {row['threshold']:g} ({row['why']})"


def directory_hash(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def base_model_identity(base_dir: str | Path) -> dict:
    """Which base the adapter belongs on: hub id + revision for a real checkpoint, the embedded
    tiny config otherwise (models/base/base_config.json is written by the base stage)."""
    config_path = Path(base_dir) / "base_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return {
        "base_model": config.get("model", "unknown"),
        "base_revision": config.get("revision", ""),
        "base_dir": str(base_dir),
        "base_hash": directory_hash(base_dir),
    }


def model_card(release: dict, gate: dict, headline: dict, csat: dict | None) -> str:
    """MODEL_CARD.md: what the adapter is, what it was measured to do, what it must not be used for."""
    lines = [
        "# veritune release: grounded customer-support QA adapter",
        "",
        f"LoRA adapter for `{release['base_model']}`"
        + (f" at revision `{release['base_revision']}`" if release["base_revision"] else "")
        + f". Adapter sha256 (files + paths): `{release['adapter_hash']}`.",
        "",
        "## Intended use",
        "",
        "Answering customers' questions about the company's products and policies **from retrieved "
        'documents** (RAG with the veritune index and prompt), and saying "The documents don\'t say." '
        "when the passages do not hold the answer.",
        "",
        "## Release criteria (all passed)",
        "",
        "| criterion | value | threshold | why |",
        "|---|---|---|---|",
    ]
    for row in gate["finetuned"]:
        lines.append(f"| `{row['metric']}` | {row['value']:.4g} | {row['op']} {row['threshold']:g} | {row['why']} |")
    lines += ["", "## Measured on the test split", "", "| metric | value | 95% interval | n |", "|---|---|---|---|"]
    for key in sorted(k for k in headline if k.startswith("finetuned_") and not k.endswith(("_n", "_low", "_high"))):
        lines.append(
            f"| {key.removeprefix('finetuned_')} | {headline[key]:.3f} | "
            f"{headline.get(key + '_ci95_low', float('nan')):.3f}-{headline.get(key + '_ci95_high', float('nan')):.3f}"
            f" | {headline.get(key + '_n', '')} |"
        )
    if csat:
        lines += [
            "",
            f"Simulated customer satisfaction: mean CSAT {csat['csat_mean']:.2f} "
            f"(95% interval {csat['csat_ci95_low']:.2f}-{csat['csat_ci95_high']:.2f}, n={csat['n']}), "
            f"resolution rate {csat['resolution_rate']:.2f}, wrong-refusal rate {csat['wrong_refusal_rate']:.2f}.",
        ]
    lines += [
        "",
        "## Limitations",
        "",
    ]
    if "finetuned_rag_f1_unseen" in headline:
        lines.append(
            f"- Measured helpfulness: token F1 {headline['finetuned_rag_f1_unseen']:.2f} on questions about "
            "documents held out of training, and it declines "
            f"{headline.get('finetuned_rag_wrong_refusal_answerable', float('nan')):.0%} of questions the "
            "documents do answer. The criteria above are what this release was required to meet."
        )
    lines += [
        "- Use it only with retrieval: closed-book answers are not grounded in anything.",
        "- The numbers above are what it does; read the accuracy rows, not only the gate: a model can "
        "pass a refusal-and-groundedness gate while still answering few answerable questions (the "
        "wrong-refusal rate says how often it declines a question the documents do answer).",
        "- Measured on the synthetic sample catalogue; re-evaluate on real traffic before relying on it.",
        "- Groundedness is checked lexically (claims, numbers, entities found in the passages), not by "
        "entailment; a paraphrased wrong claim can pass.",
        "",
        "Full report: reports/release/report.md.",
        "",
    ]
    return "\n".join(lines)


def build_release(
    release_dir: str | Path,
    adapter_dir: str | Path,
    base_dir: str | Path,
    gate: dict,
    headline: dict,
    csat: dict | None,
) -> dict:
    """Write the release directory in one rename: adapter/, release.json, MODEL_CARD.md."""
    release = {
        **base_model_identity(base_dir),
        "adapter_hash": directory_hash(adapter_dir),
        "adapter_dir": str(adapter_dir),
        "criteria": len(gate["finetuned"]),
    }
    with atomic_path(release_dir) as tmp:
        tmp.mkdir()
        shutil.copytree(adapter_dir, tmp / "adapter")
        write_json(tmp / "release.json", release)
        (tmp / "MODEL_CARD.md").write_text(model_card(release, gate, headline, csat), encoding="utf-8")
    return release


def withdraw_release(release_dir: str | Path) -> None:
    """A blocked model must not leave an earlier release lying where it could be shipped."""
    release_dir = Path(release_dir)
    if release_dir.exists():
        shutil.rmtree(release_dir)
