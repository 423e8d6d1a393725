"""Does a re-ranking step pay on top of hybrid retrieval? Late interaction, measured.

    python bench/rerank_maxsim.py          # after `dvc repro index` (2-core CPU: ~1 min)

No cross-encoder re-ranker can be installed here (none ships in a package, and models are
never downloaded), so the re-ranker measured is the one the index's own embedding model
allows: late interaction (ColBERT's MaxSim) over all-MiniLM-L6-v2's token embeddings. The
hybrid top 20 of each question is re-scored by the mean over the question's tokens of the
best cosine with any token of the chunk (title + text, as embedded), then ranked by that
score alone and by reciprocal rank fusion of it with the hybrid rank. Reads the index,
`data/split/questions_{val,test}.jsonl` and params `index`; writes
`bench/results/rerank_maxsim.json` and prints a table. Recall@2 is what the default answers
from (`build_sft.context_chunks: 2`); differences carry a paired bootstrap 95% interval.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from veritune.core.config import load_params  # noqa: E402
from veritune.core.io import read_jsonl, write_json  # noqa: E402
from veritune.eval.scoring import bootstrap_ci  # noqa: E402
from veritune.retrieval.chunking import embedding_text  # noqa: E402
from veritune.retrieval.metrics import retrieval_metrics  # noqa: E402
from veritune.retrieval.search import Retriever  # noqa: E402

CANDIDATES = 20
KS = (1, 2, 3, 5, 10)
RRF_K = 60


def token_embeddings(embedder, texts: list[str]) -> list[torch.Tensor]:
    out = embedder.encode(texts, output_value="token_embeddings", batch_size=32, convert_to_numpy=False)
    return [torch.nn.functional.normalize(t.float()[1:-1], dim=-1) for t in out]  # no [CLS] / [SEP]


def maxsim(query: torch.Tensor, chunk: torch.Tensor) -> float:
    return float((query @ chunk.T).max(dim=-1).values.mean())


def first_gold_rank(hits, gold: set[str]) -> int | None:
    return next((r for r, h in enumerate(hits, start=1) if h.doc_id in gold), None)


def main() -> None:
    ip = load_params("index")
    results: dict = {"candidates": CANDIDATES, "rrf_k": RRF_K, "embedding_model": ip.embedding_model}
    start = time.time()
    for split in ("val", "test"):
        questions = [q for q in read_jsonl(REPO / f"data/split/questions_{split}.jsonl") if q["doc_ids"]]
        with Retriever(ip.uri, ip.collection, ip.embedding_model, mode="hybrid") as retriever:
            hybrid = retriever.search([q["question"] for q in questions], k=CANDIDATES)
            embedder = retriever.embedder
        chunks = {h.chunk_id: h for row in hybrid for h in row}
        chunk_vectors = dict(
            zip(
                chunks,
                token_embeddings(
                    embedder, [embedding_text({"title": h.title, "text": h.text}) for h in chunks.values()]
                ),
            )
        )
        query_vectors = token_embeddings(embedder, [q["question"] for q in questions])
        ranked = {"hybrid": hybrid, "maxsim": [], "hybrid+maxsim (RRF)": []}
        for query, row in zip(query_vectors, hybrid):
            scores = [maxsim(query, chunk_vectors[h.chunk_id]) for h in row]
            order = sorted(range(len(row)), key=lambda i: -scores[i])
            ranked["maxsim"].append([row[i] for i in order])
            rank = {i: r for r, i in enumerate(order)}
            fused = sorted(range(len(row)), key=lambda i: -(1 / (RRF_K + i) + 1 / (RRF_K + rank[i])))
            ranked["hybrid+maxsim (RRF)"].append([row[i] for i in fused])
        gold = [set(q["doc_ids"]) for q in questions]
        split_out = {}
        for name, rows in ranked.items():
            split_out[name] = retrieval_metrics(rows, [q["doc_ids"] for q in questions], KS)
            if name != "hybrid":
                diff = [
                    float(bool((r := first_gold_rank(a, g)) and r <= 2))
                    - float(bool((s := first_gold_rank(b, g)) and s <= 2))
                    for a, b, g in zip(rows, hybrid, gold)
                ]
                lo, hi = bootstrap_ci(diff, 1000)
                split_out[name]["recall@2_minus_hybrid"] = round(sum(diff) / len(diff), 4)
                split_out[name]["recall@2_minus_hybrid_ci95"] = [round(lo, 4), round(hi, 4)]
        results[split] = split_out
    results["seconds"] = round(time.time() - start, 1)
    write_json(REPO / "bench/results/rerank_maxsim.json", results)
    print(f"{'split':5s} {'ranking':22s} " + " ".join(f"R@{k:<5d}" for k in KS) + "  MRR    R@2 - hybrid (95% CI)")
    for split in ("val", "test"):
        for name, m in results[split].items():
            d = (
                f"{m['recall@2_minus_hybrid']:+.3f} ({m['recall@2_minus_hybrid_ci95'][0]:+.3f}, "
                f"{m['recall@2_minus_hybrid_ci95'][1]:+.3f})"
                if "recall@2_minus_hybrid" in m
                else ""
            )
            print(
                f"{split:5s} {name:22s} " + " ".join(f"{m[f'recall@{k}']:.3f} " for k in KS) + f" {m['mrr']:.3f}  {d}"
            )
    print(
        f"n = {results['val']['hybrid']['n']} val, {results['test']['hybrid']['n']} test questions; "
        f"{results['seconds']} s"
    )


if __name__ == "__main__":
    main()
