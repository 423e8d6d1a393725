"""Stage `gate`: the release decision, the manager-readable report, and the release artifact.

    python stages/gate.py

Reads metrics/eval.json, metrics/csat.json, metrics/index.json (retrieval curve), any other
metrics files listed in params `gate.report_metrics` that exist (e.g. rag.json, agent.json;
their PNGs from reports/<name>/), reports/eval/eval_comparison.png, reports/csat/csat_histogram.png, models/base/ and
models/adapter/, and params `gate` (criteria) and `csat` (the rubric, quoted in the report).
Writes metrics/gate.json (passed, every criterion's value/threshold/pass for the fine-tuned
model and the same criteria for the base), reports/release/ (report.md + PNGs, report.html
self-contained) and, only when every criterion passes, models/release/ (adapter/,
release.json, MODEL_CARD.md), built in a temporary directory and renamed into place.

A blocked release still writes the decision and the report, replaces models/release/ by a
BLOCKED.md that names the failing criteria (no model, no card), prints them, and with
`gate.fail_on_block` (CI) exits 1 so `dvc repro` stops there.
"""

import logging
import re
import sys
from pathlib import Path

from veritune.core.config import load_params
from veritune.core.io import atomic_path, read_json, write_json
from veritune.eval.csat import rubric_text
from veritune.eval.gate import build_release, check_criteria, describe_failure, withdraw_release
from veritune.eval.release_report import plot_retrieval_curve, release_blocks, write_release_report

log = logging.getLogger("veritune.gate")


def _by_key(rows: list[dict]) -> dict:
    return {re.sub(r"[^A-Za-z0-9]+", "_", r["metric"]).strip("_"): r for r in rows}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("gate")
    cp = load_params("csat")
    gate = {"finetuned": check_criteria(p.criteria, "metrics"), "base": check_criteria(p.criteria, "metrics", "base")}
    gate["passed"] = all(r["passed"] for r in gate["finetuned"])
    evaluation = read_json("metrics/eval.json")
    csat = read_json("metrics/csat.json") if Path("metrics/csat.json").is_file() else None
    retrieval = read_json("metrics/index.json") if Path("metrics/index.json").is_file() else None
    extras = {
        name: read_json(Path("metrics") / name) for name in p.report_metrics if (Path("metrics") / name).is_file()
    }
    images = {
        key: path
        for key, path in (
            ("eval_comparison", Path("reports/eval/eval_comparison.png")),
            ("csat_histogram", Path("reports/csat/csat_histogram.png")),
        )
        if path.is_file()
    }
    for name in extras:
        for png in sorted((Path("reports") / Path(name).stem).glob("*.png")):
            images[f"{Path(name).stem}/{png.name}"] = png

    failing = [describe_failure(r) for r in gate["finetuned"] if not r["passed"]]
    if gate["passed"]:
        release = build_release(
            "models/release",
            "models/adapter",
            "models/base",
            gate,
            evaluation.get("headline", {}),
            (csat or {}).get("finetuned"),
        )
        log.info(
            "gate: RELEASE: all %d criteria pass; models/release/ adapter sha256 %s",
            len(gate["finetuned"]),
            release["adapter_hash"],
        )
    else:
        withdraw_release("models/release")
        # The declared output holds the decision only: no model, no model card, nothing to ship.
        with atomic_path("models/release") as out:
            out.mkdir()
            (out / "BLOCKED.md").write_text(
                "# Release blocked\n\nNo model is released. Failing criteria:\n\n"
                + "".join(f"- {f}\n" for f in failing),
                encoding="utf-8",
            )
    write_json(
        "metrics/gate.json",
        {
            "passed": gate["passed"],
            "n_criteria": len(gate["finetuned"]),
            "n_failed": sum(not r["passed"] for r in gate["finetuned"]),
            "base_passed": all(r["passed"] for r in gate["base"]),
            "base_n_failed": sum(not r["passed"] for r in gate["base"]),
            "finetuned": _by_key(gate["finetuned"]),
            "base": _by_key(gate["base"]),
        },
    )
    with atomic_path("reports/release") as out:
        out.mkdir()
        if retrieval:
            plot_retrieval_curve(retrieval, out / "retrieval_curve.png")
            images["retrieval_curve"] = out / "retrieval_curve.png"
        blocks = release_blocks(gate, evaluation, csat, rubric_text(cp.rubric), extras, images, retrieval)
        write_release_report(blocks, out)
    if not gate["passed"]:
        print("gate: RELEASE BLOCKED, failing criteria:\n  - " + "\n  - ".join(failing), file=sys.stderr)
        if p.fail_on_block:
            sys.exit(1)


if __name__ == "__main__":
    main()
