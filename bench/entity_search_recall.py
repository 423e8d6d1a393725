"""Entity-aware search vs one ranked list: do the passages hold every supporting document?

    python bench/entity_search_recall.py [--k 2] [--out bench/results/entity_search_recall.json]

Reads the built index (`dvc repro index`) and the test split; searches every answerable test
question in `index.retrieval_mode` with `entity_search` off and on, at the k the model reads
(`build_sft.context_chunks`), and reports per question kind how many questions get all their
supporting documents, with a paired bootstrap interval of the difference (2-core CPU: ~1 min).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.core.config import load_params  # noqa: E402
from veritune.core.io import read_jsonl  # noqa: E402
from veritune.retrieval.search import Retriever  # noqa: E402


def paired_ci(a: list[int], b: list[int], samples: int = 2000, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(b[i] - a[i] for i in (rng.randrange(n) for _ in range(n))) / n for _ in range(samples))
    return [round(diffs[int(0.025 * samples)], 3), round(diffs[int(0.975 * samples) - 1], 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=0, help="passages (default: build_sft.context_chunks)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    ip, sp = load_params("index"), load_params("build_sft")
    k = args.k or sp.context_chunks
    questions = [q for q in read_jsonl("data/split/questions_test.jsonl") if q["answers"]]
    texts = [q["question"] for q in questions]
    found: dict[bool, list[int]] = {}
    shown: dict[bool, list[int]] = {}
    for entity_search in (False, True):
        with Retriever(
            ip.uri, ip.collection, ip.embedding_model, mode=ip.retrieval_mode, entity_search=entity_search
        ) as r:
            hits = r.search(texts, k=k)
        found[entity_search] = [int(set(q["doc_ids"]) <= {h.doc_id for h in row}) for q, row in zip(questions, hits)]
        shown[entity_search] = [len(row) for row in hits]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[q.get("subkind") or q["kind"]].append(i)
        groups["all"].append(i)
        if q["kind"] == "multi_hop":
            groups["multi_hop"].append(i)
    result = {"k": k, "mode": ip.retrieval_mode, "kinds": {}}
    for name, idx in sorted(groups.items()):
        plain, entity = [found[False][i] for i in idx], [found[True][i] for i in idx]
        result["kinds"][name] = {
            "n": len(idx),
            "all_docs_plain": sum(plain),
            "all_docs_entity": sum(entity),
            "difference_ci95": paired_ci(plain, entity),
            "mean_passages_entity": round(sum(shown[True][i] for i in idx) / len(idx), 2),
        }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
