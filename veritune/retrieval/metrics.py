"""Document-level retrieval quality: recall@k, all-recall@k (every supporting document) and MRR."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from veritune.retrieval.search import Hit


def retrieval_metrics(
    hits_per_question: Sequence[Sequence[Hit | str]],
    gold_doc_ids_per_question: Sequence[Iterable[str]],
    ks: Iterable[int],
) -> dict[str, Any]:
    """Document-level retrieval quality of ranked chunk lists.

    For each k, over the top k retrieved chunks (a hit may be a `Hit` or a bare doc_id):
    `recall@k` is the share of questions with at least one gold document among them,
    `all_recall@k` the share with every gold document (what multi-hop questions need).
    `mrr` is the mean reciprocal rank of the first chunk from a gold document (0 when none
    is retrieved). Questions with no gold documents (unanswerable) are skipped and counted
    in `n_skipped`; with no scored question the rates are None.
    """
    if len(hits_per_question) != len(gold_doc_ids_per_question):
        raise ValueError(f"{len(hits_per_question)} hit lists for {len(gold_doc_ids_per_question)} questions")
    ks = sorted(set(ks))
    any_found = dict.fromkeys(ks, 0)
    all_found = dict.fromkeys(ks, 0)
    reciprocal_ranks = 0.0
    n = n_skipped = 0
    for hits, gold_ids in zip(hits_per_question, gold_doc_ids_per_question):
        gold = set(gold_ids)
        if not gold:
            n_skipped += 1
            continue
        n += 1
        ranked = [h if isinstance(h, str) else h.doc_id for h in hits]
        for k in ks:
            top = set(ranked[:k])
            any_found[k] += bool(top & gold)
            all_found[k] += gold <= top
        first = next((rank for rank, doc_id in enumerate(ranked, start=1) if doc_id in gold), None)
        reciprocal_ranks += 1.0 / first if first else 0.0

    def rate(count: float) -> float | None:
        return round(count / n, 4) if n else None

    out: dict[str, Any] = {f"recall@{k}": rate(any_found[k]) for k in ks}
    out.update({f"all_recall@{k}": rate(all_found[k]) for k in ks})
    out.update({"mrr": rate(reciprocal_ranks), "n": n, "n_skipped": n_skipped})
    return out
