"""Would abstaining below a confidence threshold make the fine-tuned model pass the gate?

    python bench/selective_answering.py     # after `dvc repro train` (2-core CPU: ~1 min)

Answers every val and test question greedily with the two retrieved passages, as `evaluate`
does, keeping each answer's token log-probabilities, and scores the log-probability of the
abstention ("The documents don't say.") on the same prompt. Two confidences per answer:
`sum_logprob` (of the answer's tokens) and `margin` (that minus the abstention's). Reports
how well each separates correct answers (token F1 >= 0.5) and supported ones (no claim the
passages do not back) from the rest among the answers given (AUROC), and what abstaining
below each decile of `sum_logprob` would give on the test split: abstention on unanswerable
questions, unsupported claims and wrong refusals on answerable ones, F1 on held-out
documents. Writes `bench/results/selective_answering.json` and prints the table.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from groundedness_auroc import auroc  # noqa: E402

from veritune.core.chat import stop_token_ids  # noqa: E402
from veritune.core.config import load_params  # noqa: E402
from veritune.core.io import read_jsonl, write_json  # noqa: E402
from veritune.eval.evaluation import prompts_for, score_all  # noqa: E402
from veritune.model.modeling import load_model, load_tokenizer  # noqa: E402
from veritune.retrieval.search import Retriever  # noqa: E402

BATCH = 32
MAX_NEW_TOKENS = 24  # as evaluate.max_new_tokens


@torch.inference_mode()
def answer_with_confidence(model, tokenizer, conversations, abstain: str) -> list[dict]:
    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer)
    abstain_ids = torch.tensor(tokenizer(abstain, add_special_tokens=False)["input_ids"])
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    rows = []
    for start in range(0, len(prompts), BATCH):
        enc = tokenizer(prompts[start : start + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
        n = len(logprobs)
        ids = torch.cat([enc["input_ids"], abstain_ids.expand(n, -1)], 1)
        mask = torch.cat([enc["attention_mask"], torch.ones(n, len(abstain_ids), dtype=torch.long)], 1)
        forced = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, width - 1 : -1].float(), -1)
        abstain_lp = forced.gather(-1, abstain_ids.expand(n, -1).unsqueeze(-1)).sum((1, 2))
        for i, row in enumerate(out.sequences[:, width:]):
            total = 0.0
            for t, token in enumerate(row.tolist()):
                total += float(logprobs[i, t, token])
                if token in stops:
                    break
            rows.append(
                {
                    "reply": tokenizer.decode(row, skip_special_tokens=True).strip(),
                    "sum_logprob": total,
                    "margin": total - float(abstain_lp[i]),
                }
            )
    return rows


def operating_point(rows: list[dict], questions: list[dict], threshold: float) -> dict:
    keep = [not r["abstained"] and r["sum_logprob"] >= threshold for r in rows]
    answerable = [(k, r, q) for k, r, q in zip(keep, rows, questions) if q["answers"]]
    unanswerable = [k for k, q in zip(keep, questions) if not q["answers"]]
    unseen = [r["f1"] if k else 0.0 for k, r, q in answerable if q.get("doc_status") == "unseen"]
    return {
        "threshold": round(threshold, 3),
        "abstention_unanswerable": round(sum(not k for k in unanswerable) / len(unanswerable), 3),
        "unsupported_answerable": round(
            sum(k and r["unsupported"] == 1 for k, r, _ in answerable) / len(answerable), 3
        ),
        "wrong_refusal_answerable": round(sum(not k for k, _, _ in answerable) / len(answerable), 3),
        "f1_unseen": round(sum(unseen) / len(unseen), 3),
    }


def main() -> None:
    from peft import PeftModel

    sp, ip = load_params("build_sft"), load_params("index")
    tokenizer = load_tokenizer(REPO / "models/adapter")
    model = (
        PeftModel.from_pretrained(load_model(REPO / "models/base"), REPO / "models/adapter").merge_and_unload().eval()
    )
    results: dict = {}
    for split in ("val", "test"):
        questions = read_jsonl(REPO / f"data/split/questions_{split}.jsonl")
        with Retriever(ip.uri, ip.collection, ip.embedding_model) as retriever:
            hits = retriever.search([q["question"] for q in questions], k=sp.context_chunks)
        passages = [[dataclasses.asdict(h) for h in row] for row in hits]
        rows = answer_with_confidence(
            model,
            tokenizer,
            prompts_for(questions, passages, sp.system_prompt, sp.question_position),
            sp.abstain_answer,
        )
        for row, score in zip(rows, score_all([r["reply"] for r in rows], questions, passages)):
            row.update(score)
        answered = [(r, q) for r, q in zip(rows, questions) if not r["abstained"]]
        split_out = {"n": len(questions), "n_answered": len(answered), "auroc": {}}
        for feature in ("sum_logprob", "margin"):
            correct = [r[feature] for r, q in answered if q["answers"] and r["f1"] >= 0.5]
            wrong = [r[feature] for r, q in answered if not (q["answers"] and r["f1"] >= 0.5)]
            supported = [r[feature] for r, q in answered if q["answers"] and not r["unsupported"]]
            not_supported = [r[feature] for r, q in answered if not (q["answers"] and not r["unsupported"])]
            split_out["auroc"][feature] = {
                "correct_vs_not": round(auroc(correct, wrong), 3),
                "supported_vs_not": round(auroc(supported, not_supported), 3),
            }
        confidences = sorted(r["sum_logprob"] for r, _ in answered)
        split_out["thresholds"] = [
            operating_point(rows, questions, confidences[int(d / 10 * (len(confidences) - 1))]) for d in range(10)
        ]
        results[split] = split_out
    write_json(REPO / "bench/results/selective_answering.json", results)
    for split in ("val", "test"):
        r = results[split]
        print(f"{split}: {r['n_answered']} of {r['n']} answered; AUROC {r['auroc']}")
    print("test, abstain below threshold: threshold  abstention(unanswerable)  unsupported  wrong refusal  F1 unseen")
    for p in results["test"]["thresholds"]:
        print(
            f"  {p['threshold']:8.2f}  {p['abstention_unanswerable']:.2f}  {p['unsupported_answerable']:.2f}"
            f"  {p['wrong_refusal_answerable']:.2f}  {p['f1_unseen']:.3f}"
        )


if __name__ == "__main__":
    main()
