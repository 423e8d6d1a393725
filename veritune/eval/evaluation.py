"""Base vs fine-tuned, closed-book vs RAG vs oracle context, on the test split.

Each (model, mode) pair answers every test question; answers are scored per question
(veritune.eval.scoring) and summarised by question kind, unanswerable subtype (false premise,
not stated, nonexistent entity) and whether the supporting documents were seen in training.
Headline numbers carry bootstrap 95% intervals. `leakage_check` proves the test questions and
held-out documents never reached the fine-tuning data.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from veritune.core import chat
from veritune.eval.groundedness import score_groundedness
from veritune.eval.scoring import bootstrap_ci, mean, normalize_answer, score_answer

CONTEXT_MODES = (
    "closed_book",
    "rag",
    "oracle",
)  # what a question is shown: nothing, retrieved passages, its own documents

# (flat name, mode, group, per-question score): the numbers a release decision rests on.
HEADLINE = [
    ("rag_f1_unseen", "rag", "answerable_unseen", "f1"),
    ("rag_f1_answerable", "rag", "answerable", "f1"),
    ("rag_em_answerable", "rag", "answerable", "em"),
    ("rag_numeric_match_answerable", "rag", "answerable", "numeric_match"),
    ("rag_abstention_unanswerable", "rag", "unanswerable", "abstained"),
    ("rag_abstention_false_premise", "rag", "unanswerable_false_premise", "abstained"),
    ("rag_wrong_refusal_answerable", "rag", "answerable", "abstained"),
    ("rag_unsupported_answerable", "rag", "answerable", "unsupported"),
    ("closed_book_f1_answerable", "closed_book", "answerable", "f1"),
    ("oracle_f1_answerable", "oracle", "answerable", "f1"),
    ("oracle_abstention_unanswerable", "oracle", "unanswerable", "abstained"),
]


def oracle_documents(
    questions: Sequence[dict], documents: dict[str, dict], retrieved: Sequence[list[dict]]
) -> list[list[dict]]:
    """The context a perfect retriever would give: each question's own supporting documents,
    whole. Unanswerable questions that name related documents (not stated, false premise) get
    those, which lack the answer by construction; ones about entities that do not exist have
    no document at all, so their "oracle" is their retrieved passages."""
    out = []
    for q, hits in zip(questions, retrieved, strict=True):
        if not q["doc_ids"]:
            out.append(list(hits))
            continue
        missing = [d for d in q["doc_ids"] if d not in documents]
        if missing:
            raise KeyError(
                f"question {q['id']}: doc_ids {missing} are not in the documents: rerun `dvc repro validate`"
            )
        out.append(
            [
                {
                    "chunk_id": f"{d}#oracle",
                    "doc_id": d,
                    "title": documents[d]["title"],
                    "text": documents[d]["text"],
                    "score": 1.0,
                }
                for d in q["doc_ids"]
            ]
        )
    return out


def prompts_for(
    questions: Sequence[dict], passages: Sequence[list[dict]] | None, system_prompt: str, question_position: str = "end"
) -> list[list[dict]]:
    if passages is None:
        return [chat.rag_messages(system_prompt, q["question"], None) for q in questions]
    return [
        chat.rag_messages(system_prompt, q["question"], ps, question_position)
        for q, ps in zip(questions, passages, strict=True)
    ]


def groups_of(question: dict) -> list[str]:
    """The report slices one question counts in."""
    out = ["all", question["kind"]]
    if question["kind"] == "unanswerable" and question.get("subkind"):
        out.append(f"unanswerable_{question['subkind']}")
    if question["answers"]:
        out += ["answerable", f"answerable_{question.get('doc_status', 'seen')}"]
    return out


def summarize_scores(questions: Sequence[dict], scores: Sequence[dict], bootstrap_samples: int) -> dict:
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
        answered = [r["unsupported"] for r in rows if "unsupported" in r and not r["abstained"]]
        if answered:
            # The share above counts refusals as supported; this one asks "when it does answer, is it grounded?"
            entry["unsupported_rate_when_answering"] = round(mean(answered), 4)
            entry["n_answered"] = len(answered)
        summary[group] = entry
    for group, key in (
        ("answerable_unseen", "f1"),
        ("answerable", "f1"),
        ("unanswerable", "abstained"),
        ("unanswerable_false_premise", "abstained"),
    ):
        values = [r[key] for r in by_group.get(group, []) if key in r]
        if values:
            lo, hi = bootstrap_ci(values, bootstrap_samples)
            name = "abstention" if key == "abstained" else key
            summary[group][f"{name}_ci95_low"], summary[group][f"{name}_ci95_high"] = round(lo, 4), round(hi, 4)
    return summary


def score_all(
    predictions: Sequence[str], questions: Sequence[dict], passages: Sequence[list[dict]] | None = None
) -> list[dict]:
    """Per-question scores; with the passages the model read, also whether the answer makes
    claims that neither they nor the question support (veritune.eval.groundedness). A reply counts
    as an abstention only if it declines and asserts nothing unsupported (`abstains`), so a
    hedge around an invented fact is scored as the answer it is."""
    if passages is not None and len(passages) != len(predictions):
        raise ValueError(f"{len(passages)} passage lists for {len(predictions)} predictions")
    scores = []
    for i, (p, q) in enumerate(zip(predictions, questions, strict=True)):
        contexts = [c["text"] for c in passages[i]] if passages is not None else []
        g = score_groundedness(q.get("question", ""), contexts, p)
        s = score_answer(p, q, abstained=g["label"] == "abstained")
        if passages is not None:
            s["unsupported"] = float(g["label"] == "unsupported")
        scores.append(s)
    return scores


def headline(
    scores: dict[str, dict[str, list[dict]]],
    questions: Sequence[dict] | dict[str, dict[str, Sequence[dict]]],
    bootstrap_samples: int,
) -> dict:
    """Flat `<variant>_<name>` keys with n and a bootstrap 95% interval each, for `dvc metrics diff`.
    `questions`: the scored questions, or {variant: {mode: questions}} where they ran on different samples."""
    out: dict[str, float] = {}
    for variant, by_mode in scores.items():
        for name, mode, group, key in HEADLINE:
            if mode not in by_mode:
                continue
            asked = questions[variant][mode] if isinstance(questions, dict) else questions
            values = [s[key] for q, s in zip(asked, by_mode[mode], strict=True) if group in groups_of(q) and key in s]
            if not values:
                continue
            lo, hi = bootstrap_ci(values, bootstrap_samples)
            flat = f"{variant}_{name}"
            out[flat] = round(mean(values), 4)
            out[f"{flat}_n"] = len(values)
            out[f"{flat}_ci95_low"], out[f"{flat}_ci95_high"] = round(lo, 4), round(hi, 4)
    return out


# --------------------------------------------------------------------------- leakage

_QUESTION_LINE = re.compile(r"^Question: (.*)$", re.MULTILINE)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize_answer(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def leakage_check(
    test_questions: Sequence[dict],
    heldout_docs: Sequence[dict],
    sft_examples: Sequence[dict],
    ngram: int,
    doc_share: float,
) -> dict:
    """Do test questions or held-out documents appear in the fine-tuning data?

    - a test question is leaked if its normalised text equals an SFT question, or one of its
      `ngram`-word n-grams (long questions only) occurs in any SFT message;
    - a held-out document is leaked into the targets if `doc_share` of its n-grams occur in
      SFT assistant replies (what the model is trained to say), and into the context if they
      occur in SFT prompts (shown as passages, not trained on).
    """
    sft_questions, prompt_grams, target_grams = set(), set(), set()
    for ex in sft_examples:
        for m in ex["messages"]:
            if m["role"] in ("user", "ipython"):  # passages and tool results are both read, not trained on
                sft_questions.update(normalize_answer(q) for q in _QUESTION_LINE.findall(m["content"]))
                prompt_grams |= _ngrams(m["content"], ngram)
            elif m["role"] == "assistant":
                target_grams |= _ngrams(m["content"], ngram)
    questions_leaked = sorted(
        q["id"]
        for q in test_questions
        if normalize_answer(q["question"]) in sft_questions
        or _ngrams(q["question"], ngram) & (prompt_grams | target_grams)
    )

    def share(doc: dict, grams: set) -> float:
        own = _ngrams(doc["text"], ngram)
        return len(own & grams) / len(own) if own else 0.0

    in_targets = sorted(d["id"] for d in heldout_docs if share(d, target_grams) >= doc_share)
    in_context = sorted(d["id"] for d in heldout_docs if share(d, prompt_grams) >= doc_share)
    return {
        "n_test_questions": len(test_questions),
        "n_heldout_docs": len(heldout_docs),
        "n_sft_examples": len(sft_examples),
        "test_questions_in_sft": len(questions_leaked),
        "heldout_docs_in_sft_targets": len(in_targets),
        "heldout_docs_in_sft_context": len(in_context),
        "examples": {
            "questions": questions_leaked[:10],
            "docs_in_targets": in_targets[:10],
            "docs_in_context": in_context[:10],
        },
    }


def leakage_violations(result: dict, heldout_context: str) -> tuple[list[str], list[str]]:
    """(violations that must stop the evaluation, warnings) from `leakage_check`'s result.
    `heldout_context` ("fail" | "warn") is the policy for held-out documents seen only as passages."""
    examples = result["examples"]
    problems = [
        f"{result[k]} {k.replace('_', ' ')} (e.g. {examples[e]})"
        for k, e in (("test_questions_in_sft", "questions"), ("heldout_docs_in_sft_targets", "docs_in_targets"))
        if result[k]
    ]
    warnings = []
    if result["heldout_docs_in_sft_context"]:
        message = (
            f"{result['heldout_docs_in_sft_context']} held-out test documents appear as passages in SFT prompts "
            f"(e.g. {examples['docs_in_context']}): build_sft draws distractors from the whole index"
        )
        (problems if heldout_context == "fail" else warnings).append(message)
    return problems, warnings


def leakage_passed(result: dict) -> bool:
    """`leakage.passed` in metrics/eval.json, which the gate requires: false whenever any test
    question or held-out document reached the SFT data, also where the policy only warned
    (`heldout_docs_in_sft_context: warn` lets the stage run on, not the release pass)."""
    return not any(
        result[k] for k in ("test_questions_in_sft", "heldout_docs_in_sft_targets", "heldout_docs_in_sft_context")
    )
