"""Base vs fine-tuned, closed-book vs RAG, on the test split.

Each (model, mode) pair answers every test question; answers are scored per question
(veritune.scoring) and summarised by question kind and by whether the supporting documents
were seen in training. Headline numbers carry bootstrap 95% intervals.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from veritune import chat
from veritune.groundedness import score_groundedness
from veritune.scoring import bootstrap_ci, mean, score_answer

MODES = ("closed_book", "rag")


def prompts_for(questions: Sequence[dict], passages: Sequence[list[dict]] | None, system_prompt: str,
                question_position: str = "end") -> list[list[dict]]:
    if passages is None:
        return [chat.rag_messages(system_prompt, q["question"], None) for q in questions]
    return [chat.rag_messages(system_prompt, q["question"], ps, question_position)
            for q, ps in zip(questions, passages, strict=True)]


def groups_of(question: dict) -> list[str]:
    """The report slices one question counts in."""
    out = ["all", question["kind"]]
    if question["answers"]:
        out += ["answerable", f"answerable_{question.get('doc_status', 'seen')}"]
    return out


def summarize(questions: Sequence[dict], scores: Sequence[dict], bootstrap_samples: int) -> dict:
    by_group: dict[str, list[dict]] = defaultdict(list)
    for q, s in zip(questions, scores, strict=True):
        for g in groups_of(q):
            by_group[g].append(s)
    summary: dict[str, dict] = {}
    for group, rows in sorted(by_group.items()):
        entry: dict[str, float] = {"n": len(rows)}
        for key in ("em", "f1", "numeric_match", "abstained", "unsupported"):
            values = [r[key] for r in rows if key in r]
            if values:
                name = {"abstained": "abstention", "unsupported": "unsupported_rate"}.get(key, key)
                entry[name] = round(mean(values), 4)
        summary[group] = entry
    for group, key in (("answerable_unseen", "f1"), ("answerable", "f1"), ("unanswerable", "abstained")):
        values = [r[key] for r in by_group.get(group, []) if key in r]
        if values:
            lo, hi = bootstrap_ci(values, bootstrap_samples)
            name = "abstention" if key == "abstained" else key
            summary[group][f"{name}_ci95_low"], summary[group][f"{name}_ci95_high"] = round(lo, 4), round(hi, 4)
    return summary


def score_all(predictions: Sequence[str], questions: Sequence[dict],
              passages: Sequence[list[dict]] | None = None) -> list[dict]:
    """Per-question scores; with the passages the model read, also whether the answer makes
    claims that neither they nor the question support (veritune.groundedness)."""
    scores = [score_answer(p, q) for p, q in zip(predictions, questions, strict=True)]
    if passages is not None:
        for s, p, q, ps in zip(scores, predictions, questions, passages, strict=True):
            g = score_groundedness(q["question"], [c["text"] for c in ps], p)
            s["unsupported"] = float(g["label"] == "unsupported")
    return scores
