"""Stage `rag_eval`: retrieval modes, multi-hop and iterative retrieval, answers vs k and vs
distractor noise, and resistance to instructions injected into retrieved passages.

    python stages/rag_eval.py

Reads models/base/, models/adapter/, data/index/ (the Milvus index and its chunks.jsonl),
data/split/questions_test.jsonl and params `rag_eval`, `build_sft` (system prompt, question
position, passages per prompt for the injection run) and `index` (where the index is).
Writes metrics/rag.json and reports/rag/ (rag.md, retrieval_recall.png, answers_vs_k.png,
answers_vs_noise.png, predictions.jsonl, rag_config.json).
"""

import dataclasses
import logging

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.eval.evaluation import prompts_for, score_all
from veritune.eval.injection import injection_cases, injection_messages, injection_resistance
from veritune.eval.rag_eval import (
    answer_summary,
    noisy_passages,
    per_question_recall,
    stratified_sample,
    write_rag_report,
)
from veritune.eval.scoring import paired_difference, with_ci
from veritune.infer.decode import generate
from veritune.model.modeling import load_model, load_tokenizer
from veritune.retrieval.metrics import retrieval_metrics
from veritune.retrieval.search import Retriever, iterative_search

log = logging.getLogger("veritune.rag_eval")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from peft import PeftModel

    p = load_params("rag_eval")
    sp = load_params("build_sft")
    ip = load_params("index")
    questions = read_jsonl("data/split/questions_test.jsonl")
    chunks = read_jsonl("data/index/chunks.jsonl")
    sample = stratified_sample(questions, p.max_questions, p.seed)
    multi_hop = [q for q in questions if q["kind"] == "multi_hop"]
    depth = max(p.ks)

    with Retriever(ip.uri, ip.collection, ip.embedding_model, batch_size=ip.batch_size, rrf_k=p.rrf_k) as retriever:
        hits = {m: retriever.search([q["question"] for q in questions], k=depth, mode=m) for m in p.modes}
        iterative = {
            m: iterative_search(retriever, [q["question"] for q in multi_hop], k=depth, mode=m) for m in p.modes
        }
        sample_hits = retriever.search([q["question"] for q in sample], k=depth, mode=p.answer_mode)

    # ----------------------------------------------------------------- retrieval
    unseen = [i for i, q in enumerate(questions) if q.get("doc_status") == "unseen"]
    splits = {"test": list(range(len(questions))), "test_unseen": unseen}
    retrieval: dict = {}
    hybrid_minus_dense: dict = {}
    hk = p.headline_k
    for split, idx in splits.items():
        gold = [questions[i]["doc_ids"] for i in idx]
        retrieval[split] = {}
        per_mode = {}
        for m in p.modes:
            split_hits = [hits[m][i] for i in idx]
            per_mode[m] = per_question_recall(split_hits, gold, hk)
            retrieval[split][m] = retrieval_metrics(split_hits, gold, p.ks)
            retrieval[split][m][f"recall@{hk}_ci"] = with_ci(per_mode[m], p.bootstrap_samples)
        hybrid_minus_dense[split] = {
            f"recall@{hk}": paired_difference(per_mode["hybrid"], per_mode["dense"], p.bootstrap_samples)
        }
        if "bm25" in per_mode:
            hybrid_minus_dense[split][f"hybrid_minus_bm25_recall@{hk}"] = paired_difference(
                per_mode["hybrid"], per_mode["bm25"], p.bootstrap_samples
            )
    mh_gold = [q["doc_ids"] for q in multi_hop]
    mh_index = {q["id"]: i for i, q in enumerate(questions)}
    mh: dict = {}
    for m in p.modes:
        one_round = [hits[m][mh_index[q["id"]]] for q in multi_hop]
        mh[m] = retrieval_metrics(one_round, mh_gold, p.ks)
        mh[f"{m}_iterative"] = retrieval_metrics(iterative[m], mh_gold, p.ks)
        mh[f"{m}_iterative_minus_one_round"] = paired_difference(
            per_question_recall(iterative[m], mh_gold, hk, need_all=True),
            per_question_recall(one_round, mh_gold, hk, need_all=True),
            p.bootstrap_samples,
        )
    retrieval["multi_hop_iterative"] = mh
    log.info("recall@%d on test: %s", hk, {m: retrieval["test"][m][f"recall@{hk}"] for m in p.modes})

    # ----------------------------------------------------------------- answers
    retrieved = [[dataclasses.asdict(h) for h in row] for row in sample_hits]
    injection = injection_cases(sample, [ps[: sp.context_chunks] for ps in retrieved], p.seed)
    tokenizer = load_tokenizer("models/adapter")
    model = load_model("models/base")
    answers: dict = {}
    injection_metrics: dict = {}
    predictions = [dict(id=q["id"], kind=q["kind"], answers=q["answers"]) for q in sample]

    def answer(name: str, variant: str, passages: list[list[dict]]) -> dict:
        convs = prompts_for(sample, passages, sp.system_prompt, sp.question_position)
        replies = generate(model, tokenizer, convs, p.max_new_tokens, p.batch_size, desc=f"{variant}/{name}")
        for row, reply in zip(predictions, replies):
            row[f"{variant}.{name}"] = reply
        return answer_summary(sample, score_all(replies, sample, passages), p.bootstrap_samples)

    for variant in ("base", "finetuned"):
        if variant == "finetuned":
            model = PeftModel.from_pretrained(model, "models/adapter").merge_and_unload()
        model.eval()
        replies = generate(
            model,
            tokenizer,
            injection_messages(injection, sp.system_prompt, sp.question_position),
            p.max_new_tokens,
            p.batch_size,
            desc=f"{variant}/injection",
        )
        for row, case, reply in zip(predictions, injection, replies):
            row["injection_template"] = case["template"]
            row[f"{variant}.injection"] = reply
        injection_metrics[variant] = injection_resistance(replies, injection, sp.system_prompt, p.bootstrap_samples)
        if variant == "base" and not p.base_sweeps:
            continue
        answers[variant] = {
            "k": {str(k): answer(f"k={k}", variant, [ps[:k] for ps in retrieved]) for k in p.ks},
            "noise": {
                str(n): answer(f"noise={n}", variant, noisy_passages(sample, chunks, n, p.seed)) for n in p.noise_levels
            },
        }

    metrics = {
        "retrieval": retrieval,
        "hybrid_minus_dense": hybrid_minus_dense,
        "answers": answers,
        "injection": injection_metrics,
        "ks": list(p.ks),
        "noise_levels": list(p.noise_levels),
        "answer_mode": p.answer_mode,
        "n_test_questions": len(questions),
        "n_answer_questions": len(sample),
        "bootstrap_samples": p.bootstrap_samples,
    }
    write_json("metrics/rag.json", metrics)
    with atomic_path("reports/rag") as out:
        out.mkdir()
        write_jsonl(out / "predictions.jsonl", predictions)
        write_rag_report(metrics, out, p.headline_k)
        write_json(out / "rag_config.json", {"rag_eval": as_dict(p), "build_sft": as_dict(sp), "index": as_dict(ip)})
    log.info(
        "rag_eval: hybrid - dense recall@%d on test: %s; injection resistance: %s",
        hk,
        hybrid_minus_dense["test"][f"recall@{hk}"],
        {v: m["mean"] for v, m in injection_metrics.items()},
    )


if __name__ == "__main__":
    main()
