"""Stage `evaluate`: base vs fine-tuned, closed-book vs RAG, on the test split.

    python stages/evaluate.py

Reads models/base/, models/adapter/, data/index/, data/split/questions_test.jsonl and params
`evaluate`, `build_sft` (prompt, context size) and `index`; writes metrics/eval.json,
reports/eval/ (predictions.jsonl, eval.md and the comparison plot eval_comparison.png).
"""

import dataclasses
import logging
import random
from pathlib import Path

from veritune.config import as_dict, load_params
from veritune.evaluation import MODES, prompts_for, score_all, summarize
from veritune.generation import generate
from veritune.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.modeling import load_model, load_tokenizer
from veritune.report import write_eval_report
from veritune.retrieval import Retriever

log = logging.getLogger("veritune.evaluate")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from peft import PeftModel

    p = load_params("evaluate")
    sp = load_params("build_sft")
    ip = load_params("index")
    questions = read_jsonl("data/split/questions_test.jsonl")
    if p.max_questions and len(questions) > p.max_questions:
        questions = random.Random(0).sample(questions, p.max_questions)
    with Retriever(ip.uri, ip.collection, ip.embedding_model) as retriever:
        hits = retriever.search([q["question"] for q in questions], k=sp.context_chunks)
    passages = [[dataclasses.asdict(h) for h in row] for row in hits]

    tokenizer = load_tokenizer("models/adapter")
    model = load_model("models/base")
    metrics: dict = {}
    predictions: list[dict] = [dict(id=q["id"], kind=q["kind"], doc_status=q.get("doc_status"),
                                    answers=q["answers"]) for q in questions]
    for variant in ("base", "finetuned"):
        if variant == "finetuned":
            # Merged for inference: same function, no per-layer adapter overhead while generating.
            model = PeftModel.from_pretrained(model, "models/adapter").merge_and_unload()
        model.eval()
        metrics[variant] = {}
        for mode in MODES:
            convs = prompts_for(questions, passages if mode == "rag" else None, sp.system_prompt, sp.question_position)
            replies = generate(model, tokenizer, convs, p.max_new_tokens, p.batch_size, desc=f"{variant}/{mode}")
            scores = score_all(replies, questions, passages if mode == "rag" else None)
            metrics[variant][mode] = summarize(questions, scores, p.bootstrap_samples)
            for row, reply in zip(predictions, replies):
                row[f"{variant}.{mode}"] = reply
    metrics["n_test_questions"] = len(questions)
    write_json("metrics/eval.json", metrics)
    with atomic_path("reports/eval") as out:
        out.mkdir()
        write_jsonl(out / "predictions.jsonl", predictions)
        write_eval_report(metrics, out)
        write_json(out / "eval_config.json", {"evaluate": as_dict(p), "build_sft": as_dict(sp), "index": as_dict(ip)})
    log.info("evaluate: fine-tuned RAG on unseen documents: %s", metrics["finetuned"]["rag"].get("answerable_unseen"))


if __name__ == "__main__":
    main()
