"""An optional LLM judge that scores answers 1-5 beside the deterministic metrics.

Off by default (`evaluate.judge.model: ""`). Set it to a local checkpoint directory or a hub id
(e.g. the base Llama 3.1 8B Instruct on a GPU) and the evaluate stage asks it, with the fixed
prompt below, how correct and how grounded each RAG answer is. Its numbers sit beside EM, F1,
abstention and the groundedness scorer in metrics/eval.json under `judge`; they never replace
them, and a reply it cannot parse is counted (`parse_rate`), not guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from veritune.core.chat import format_context
from veritune.eval.scoring import mean

JUDGE_SYSTEM = "You grade answers of a customer-support assistant. Reply with the two scores only."
JUDGE_TEMPLATE = """Documents:
{context}

Question: {question}
Reference answer: {reference}
Assistant's answer: {answer}

Rate the assistant's answer on two 1-5 scales.
Correctness: 5 = says what the reference says (or rightly says the documents don't answer when the reference is "none"), 1 = wrong.
Groundedness: 5 = every claim is in the documents or the question, 1 = mostly invented.
Reply exactly as:
Correctness: <1-5>
Groundedness: <1-5>"""  # noqa: E501

_SCORE = {
    name: re.compile(rf"{name}\s*[:=]\s*\**\s*([1-5])\b", re.IGNORECASE) for name in ("correctness", "groundedness")
}


def judge_messages(question: dict, passages: Sequence[dict], answer: str) -> list[dict]:
    reference = " / ".join(question["answers"]) if question["answers"] else "none (the documents do not answer it)"
    user = JUDGE_TEMPLATE.format(
        context=format_context(passages) if passages else "(none)",
        question=question["question"],
        reference=reference,
        answer=answer or "(empty)",
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_scores(reply: str) -> dict[str, int | None]:
    """{'correctness': 1-5 or None, 'groundedness': 1-5 or None} from the judge's reply."""
    out: dict[str, int | None] = {}
    for name, pattern in _SCORE.items():
        m = pattern.search(reply)
        out[name] = int(m.group(1)) if m else None
    return out


def judge_answers(
    model,
    tokenizer,
    questions: Sequence[dict],
    passages: Sequence[Sequence[dict]],
    answers: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "judge",
) -> list[dict]:
    from veritune.infer.decode import generate

    convs = [judge_messages(q, ps, a) for q, ps, a in zip(questions, passages, answers, strict=True)]
    replies = generate(model, tokenizer, convs, max_new_tokens, batch_size, desc=desc)
    return [{**parse_scores(r), "reply": r} for r in replies]


def summarize_judge(judged: Sequence[dict]) -> dict:
    """Mean 1-5 scores over the replies that parsed, and the share that did."""
    out: dict[str, float] = {"n": len(judged)}
    for name in ("correctness", "groundedness"):
        values = [j[name] for j in judged if j[name] is not None]
        out[f"{name}_parse_rate"] = round(len(values) / len(judged), 4) if judged else 0.0
        if values:
            out[f"{name}_mean"] = round(mean(values), 4)
    return out


def load_judge(name: str, revision: str = ""):
    """(model, tokenizer) of the judge: a local directory, or a hub id pinned to `revision`."""
    from pathlib import Path

    from veritune.model.modeling import load_model, load_tokenizer

    if Path(name).is_dir():
        return load_model(name).eval(), load_tokenizer(name)
    if not revision:
        raise ValueError(f"evaluate.judge.model {name!r} is a hub id: pin evaluate.judge.revision to a commit sha")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = (
        {"dtype": torch.bfloat16, "device_map": {"": torch.cuda.current_device()}} if torch.cuda.is_available() else {}
    )
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
