"""How well the groundedness score separates gold answers from hallucinated ones (AUROC).

    python bench/groundedness_auroc.py

Reads `data/raw/documents.jsonl` and `data/raw/questions.jsonl`. For every answerable
(single_hop, multi_hop) question the contexts are the texts of its `doc_ids` documents plus
one other random document as a distractor. Positives are the gold answer (`answers[0]`);
negatives perturb it deterministically (seed 0):
  swapped_number  one number's value changed,
  swapped_entity  an entity replaced by another entity of the corpus absent from the contexts,
  invented_fact   a fabricated clause appended,
  other_answer    the gold answer of another question of the same attribute, absent from the contexts.
A kind is skipped for a question where it does not apply (no number, no entity, ...).
Writes `bench/results/groundedness_auroc.json` and prints a table.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from veritune.core.io import read_jsonl, write_json  # noqa: E402
from veritune.eval.claims import extract_claims  # noqa: E402
from veritune.eval.groundedness import score_groundedness  # noqa: E402
from veritune.eval.scoring import normalize_answer  # noqa: E402

SEED = 0
THRESHOLD = 0.8
KINDS = ("swapped_number", "swapped_entity", "invented_fact", "other_answer")
INVENTED = [
    "and it includes a free 5-year service plan",
    "and it ships with a complimentary travel case",
    "which earned it the Golden Whisk award in 2019",
    "and Larkspur refunds the difference within 48 hours",
    "and it comes with a second glass jug at no extra cost",
]
_NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?")  # not codes (LK-4821, K3)


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Mann-Whitney U / (n_pos * n_neg), ties counted half via average ranks."""
    scored = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        average_rank = (i + 1 + j) / 2  # ranks i+1 .. j
        rank_sum += average_rank * sum(label for _, label in scored[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    if not n_pos or not n_neg:
        return float("nan")
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def swap_number(answer: str, rng: random.Random) -> str | None:
    match = _NUMBER.search(answer)
    if not match:
        return None
    text = match.group(0)
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(text)
    step = max(10**-decimals, round(abs(value) * rng.choice([0.1, 0.2, 0.3]), decimals))
    new = value + rng.choice([-1, 1]) * step
    if new <= 0:
        new = value + step
    return answer[: match.start()] + f"{new:.{decimals}f}" + answer[match.end() :]


def swap_entity(answer: str, context_text: str, entities: list[str], rng: random.Random) -> str | None:
    mine = [c.text for c in extract_claims(answer) if c.kind == "entity"]
    if not mine:
        return None
    target = mine[0]
    size, last = len(target.split()), target.split()[-1]
    pool = [e for e in entities if e not in context_text and len(e.split()) == size and e != target]
    alike = [e for e in pool if e.split()[-1] == last]  # "Aurora K3 Kettle" -> "Brio X5 Kettle"
    if not (alike or pool):
        return None
    return answer.replace(target, rng.choice(alike or pool), 1)


def build(documents: list[dict], questions: list[dict], rng: random.Random) -> list[dict]:
    texts = {d["id"]: d["text"] for d in documents}
    entities = sorted({c.text for d in documents for c in extract_claims(d["text"]) if c.kind == "entity"})
    answerable = [q for q in questions if q["kind"] in ("single_hop", "multi_hop") and q["answers"]]
    by_attribute = defaultdict(list)
    for q in answerable:
        by_attribute[q["attribute"]].append(q["answers"][0])
    doc_ids = sorted(texts)

    records = []
    for q in answerable:
        distractor = rng.choice([d for d in doc_ids if d not in q["doc_ids"]])
        contexts = [texts[d] for d in q["doc_ids"]] + [texts[distractor]]
        context_text = "\n".join(contexts)
        gold = q["answers"][0]
        base = {"id": q["id"], "question": q["question"], "contexts": contexts, "hop": q["kind"]}
        records.append({**base, "answer": gold, "label": 1, "perturbation": "gold"})

        negatives = {
            "swapped_number": swap_number(gold, rng),
            "swapped_entity": swap_entity(gold, context_text, entities, rng),
            "invented_fact": f"{gold.rstrip('.')}, {rng.choice(INVENTED)}.",
        }
        others = sorted(
            {
                a
                for a in by_attribute[q["attribute"]]
                if normalize_answer(a) != normalize_answer(gold)
                and normalize_answer(a) not in normalize_answer(context_text)
            }
        )
        negatives["other_answer"] = rng.choice(others) if others else None
        for kind in KINDS:
            if negatives[kind] is not None and negatives[kind] != gold:
                records.append({**base, "answer": negatives[kind], "label": 0, "perturbation": kind})
    return records


def main() -> None:
    started = time.perf_counter()
    rng = random.Random(SEED)
    records = build(read_jsonl(REPO / "data/raw/documents.jsonl"), read_jsonl(REPO / "data/raw/questions.jsonl"), rng)
    for r in records:
        r["score"] = score_groundedness(r["question"], r["contexts"], r["answer"], THRESHOLD)["score"]
    seconds = time.perf_counter() - started

    positives = [r["score"] for r in records if r["label"] == 1]
    negatives = [r for r in records if r["label"] == 0]
    per_kind = {
        kind: {
            "n_negatives": sum(r["perturbation"] == kind for r in negatives),
            "auroc": round(auroc(positives, [r["score"] for r in negatives if r["perturbation"] == kind]), 4),
        }
        for kind in KINDS
    }
    correct = sum((r["score"] >= THRESHOLD) == (r["label"] == 1) for r in records)
    gold_by_hop = {
        hop: round(sum(r["score"] for r in rs) / len(rs), 4)
        for hop in ("single_hop", "multi_hop")
        if (rs := [r for r in records if r["label"] == 1 and r["hop"] == hop])
    }
    result = {
        "n_positives": len(positives),
        "n_negatives": len(negatives),
        "auroc": round(auroc(positives, [r["score"] for r in negatives]), 4),
        "auroc_by_perturbation": per_kind,
        "threshold": THRESHOLD,
        "threshold_accuracy": round(correct / len(records), 4),
        "gold_share_grounded": round(sum(s >= THRESHOLD for s in positives) / len(positives), 4),
        "gold_mean_score_by_hop": gold_by_hop,
        "seed": SEED,
        "seconds": round(seconds, 2),
        "machine": "2-core CPU",
        "command": "python bench/groundedness_auroc.py",
    }
    write_json(REPO / "bench/results/groundedness_auroc.json", result)

    print(f"{'negatives':<16}{'n':>6}{'AUROC':>8}")
    for kind, row in per_kind.items():
        print(f"{kind:<16}{row['n_negatives']:>6}{row['auroc']:>8.3f}")
    print(f"{'all':<16}{len(negatives):>6}{result['auroc']:>8.3f}")
    print(
        f"positives {len(positives)}; accuracy at {THRESHOLD}: {result['threshold_accuracy']:.3f}; "
        f"gold grounded {result['gold_share_grounded']:.3f}; mean gold score {gold_by_hop}; {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
