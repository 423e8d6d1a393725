"""Stage `evaluate`: base vs fine-tuned; closed-book vs RAG vs oracle context; on the test split.

    python stages/evaluate.py

Reads models/base/, models/adapter/, data/index/, data/validated/documents.jsonl (oracle
context), data/split/{questions_test.jsonl,doc_split.json} and data/sft/ (leakage check), and
params `evaluate`, `build_sft` (prompt, context size) and `index`; writes metrics/eval.json
(nested per variant/mode/group, plus a flat `headline` block and `leakage`), reports/eval/
(predictions.jsonl, leakage.json, eval.md and the comparison plot eval_comparison.png).

Fails before any model is loaded if a test question, or a held-out document's text, is in the
fine-tuning data.
"""

import dataclasses
import logging
import random

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from veritune.eval.evaluation import (
    CONTEXT_MODES,
    headline,
    leakage_check,
    leakage_passed,
    leakage_violations,
    oracle_documents,
    prompts_for,
    score_all,
    summarize_scores,
)
from veritune.eval.judge import judge_answers, load_judge, summarize_judge
from veritune.eval.report import write_eval_report
from veritune.infer.decode import generate
from veritune.model.modeling import load_model, load_tokenizer
from veritune.retrieval.search import open_retriever

log = logging.getLogger("veritune.evaluate")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from peft import PeftModel

    p = load_params("evaluate")
    sp = load_params("build_sft")
    ip = load_params("index")
    questions = read_jsonl("data/split/questions_test.jsonl")
    documents = {d["id"]: d for d in read_jsonl("data/validated/documents.jsonl")}
    doc_split = read_json("data/split/doc_split.json")
    heldout = [documents[d] for d, s in sorted(doc_split.items()) if s == "test"]
    sft = read_jsonl("data/sft/train.jsonl") + read_jsonl("data/sft/val.jsonl")
    leakage = leakage_check(questions, heldout, sft, p.leakage_ngram, p.leakage_doc_share)
    problems, warnings = leakage_violations(leakage, p.heldout_docs_in_sft_context)
    for message in warnings:
        log.warning("LEAKAGE WARNING: %s (evaluate.heldout_docs_in_sft_context: warn)", message)
    if problems:
        raise SystemExit(
            "evaluate: test data leaked into data/sft; scores would overstate the model:\n  - "
            + "\n  - ".join(problems)
        )
    examples = leakage.pop("examples")
    leakage["passed"] = leakage_passed(leakage)  # false after a warned-only leak: the gate must see it
    if p.max_questions and len(questions) > p.max_questions:
        questions = random.Random(0).sample(questions, p.max_questions)
    with open_retriever(ip) as retriever:
        hits = retriever.search([q["question"] for q in questions], k=sp.context_chunks)
    # RAG (what users get, what the gate reads) on every question for the fine-tuned model; the
    # explaining contexts, and the base beside it, on samples (params say how large).
    n = len(questions)
    every = list(range(n))

    def sample(size: int, seed: int) -> list[int]:
        return sorted(random.Random(seed).sample(every, size)) if 0 < size < n else every

    context_rows, base_rows = sample(p.context_modes_max_questions, 1), sample(p.base_max_questions, 2)
    rows = {
        "finetuned": {"rag": every, "closed_book": context_rows, "oracle": context_rows},
        "base": {"rag": base_rows, "closed_book": context_rows, "oracle": context_rows},
    }
    rag = [[dataclasses.asdict(h) for h in row] for row in hits]
    passages = {"closed_book": None, "rag": rag, "oracle": oracle_documents(questions, documents, rag)}
    asked = {v: {m: [questions[i] for i in r] for m, r in by_mode.items()} for v, by_mode in rows.items()}
    contexts = {
        v: {m: None if passages[m] is None else [passages[m][i] for i in r] for m, r in by_mode.items()}
        for v, by_mode in rows.items()
    }

    tokenizer = load_tokenizer("models/adapter")
    model = load_model("models/base")
    metrics: dict = {}
    scores: dict[str, dict[str, list[dict]]] = {}
    predictions: list[dict] = [
        dict(id=q["id"], kind=q["kind"], subkind=q.get("subkind"), doc_status=q.get("doc_status"), answers=q["answers"])
        for q in questions
    ]
    for variant in ("base", "finetuned"):
        if variant == "finetuned":
            # Merged for inference: same function, no per-layer adapter overhead while generating.
            model = PeftModel.from_pretrained(model, "models/adapter").merge_and_unload()
        model.eval()
        metrics[variant], scores[variant] = {}, {}
        for mode in CONTEXT_MODES:
            qs, ctx = asked[variant][mode], contexts[variant][mode]
            convs = prompts_for(qs, ctx, sp.system_prompt, sp.question_position)
            replies = generate(model, tokenizer, convs, p.max_new_tokens, p.batch_size, desc=f"{variant}/{mode}")
            scores[variant][mode] = score_all(replies, qs, ctx)
            metrics[variant][mode] = summarize_scores(qs, scores[variant][mode], p.bootstrap_samples)
            for i, reply in zip(rows[variant][mode], replies):
                predictions[i][f"{variant}.{mode}"] = reply
    del model
    if p.judge.model:
        judge, judge_tokenizer = load_judge(p.judge.model, p.judge.revision)
        for variant in ("base", "finetuned"):
            replies = [predictions[i][f"{variant}.rag"] for i in rows[variant]["rag"]]
            judged = judge_answers(
                judge,
                judge_tokenizer,
                asked[variant]["rag"],
                contexts[variant]["rag"],
                replies,
                p.judge.max_new_tokens,
                p.judge.batch_size,
                desc=f"judge {variant}/rag",
            )
            metrics[variant]["rag"]["judge"] = summarize_judge(judged)
            for i, j in zip(rows[variant]["rag"], judged):
                predictions[i][f"{variant}.rag.judge"] = j
    metrics["n_test_questions"] = len(questions)
    metrics["n_context_mode_questions"], metrics["n_base_questions"] = len(context_rows), len(base_rows)
    metrics["headline"] = headline(scores, asked, p.bootstrap_samples)
    metrics["leakage"] = leakage
    write_json("metrics/eval.json", metrics)
    with atomic_path("reports/eval") as out:
        out.mkdir()
        write_jsonl(out / "predictions.jsonl", predictions)
        write_json(out / "leakage.json", {**leakage, "examples": examples})
        write_eval_report(metrics, out)
        write_json(out / "eval_config.json", {"evaluate": as_dict(p), "build_sft": as_dict(sp), "index": as_dict(ip)})
    log.info("evaluate: fine-tuned RAG on unseen documents: %s", metrics["finetuned"]["rag"].get("answerable_unseen"))


if __name__ == "__main__":
    main()
