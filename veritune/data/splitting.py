"""Train / val / test split by document.

Documents are held out whole: a held-out ("unseen") document and every question that needs
it go to val or test, so the test split measures grounding on material the model never
trained on. Questions that only need training documents ("seen") are split by a stable
hash of their id, so test also measures domain knowledge the model did see.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections import Counter
from typing import Any

from veritune.core.params import SplitParams

SPLITS = ("train", "val", "test")


class SplitLeakError(RuntimeError):
    """A question or document crosses splits."""


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_documents(documents: list[dict], questions: list[dict], p: SplitParams) -> dict[str, str]:
    """Map each document id to the split whose questions may use it.

    Hub documents (referenced by far more questions than is typical, such as a returns
    policy) stay in training, so the test set is not dominated by one document.
    """
    uses = Counter(d for q in questions for d in set(q["doc_ids"]))
    counts = [uses[d["id"]] for d in documents]
    hub_limit = max(10, 3 * statistics.median(counts)) if counts else 0
    candidates = sorted(d["id"] for d in documents if uses[d["id"]] <= hub_limit)
    random.Random(p.seed).shuffle(candidates)
    n_test = round(p.unseen_test_doc_fraction * len(documents))
    n_val = round(p.unseen_val_doc_fraction * len(documents))
    doc_split = {d["id"]: "train" for d in documents}
    for doc_id in candidates[:n_test]:
        doc_split[doc_id] = "test"
    for doc_id in candidates[n_test : n_test + n_val]:
        doc_split[doc_id] = "val"
    return doc_split


def assign_questions(questions: list[dict], doc_split: dict[str, str], p: SplitParams) -> dict[str, list[dict]]:
    """Each question goes to exactly one split, tagged `doc_status` seen/unseen."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for q in questions:
        held = {doc_split[d] for d in q["doc_ids"]} - {"train"}
        if held:
            split, status = ("test" if "test" in held else "val"), "unseen"
        else:
            u = _unit_hash(p.seed, q["id"])
            status = "seen"
            if u < p.seen_test_fraction:
                split = "test"
            elif u < p.seen_test_fraction + p.seen_val_fraction:
                split = "val"
            else:
                split = "train"
        out[split].append({**q, "split": split, "doc_status": status})
    return out


def check_no_leak(split_questions: dict[str, list[dict]], doc_split: dict[str, str]) -> None:
    """Raise if a question id appears in two splits or training touches a held-out document."""
    seen: dict[str, str] = {}
    for split, qs in split_questions.items():
        for q in qs:
            if q["id"] in seen:
                raise SplitLeakError(f"question {q['id']} is in both {seen[q['id']]} and {split}")
            seen[q["id"]] = split
    for q in split_questions["train"]:
        held = [d for d in q["doc_ids"] if doc_split[d] != "train"]
        if held:
            raise SplitLeakError(f"train question {q['id']} uses held-out documents {held}")
    for split in ("val", "test"):
        for q in split_questions[split]:
            if q["doc_status"] == "unseen" and not any(doc_split[d] == split for d in q["doc_ids"]):
                raise SplitLeakError(f"{split} question {q['id']} is marked unseen but uses no {split} document")


def split_summary(split_questions: dict[str, list[dict]], doc_split: dict[str, str]) -> dict[str, Any]:
    summary: dict[str, Any] = {f"n_docs_{s}": sum(v == s for v in doc_split.values()) for s in SPLITS}
    for split, qs in split_questions.items():
        summary[f"n_questions_{split}"] = len(qs)
        for status in ("seen", "unseen"):
            summary[f"n_questions_{split}_{status}"] = sum(q["doc_status"] == status for q in qs)
    return summary
