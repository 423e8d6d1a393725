"""Search over the index: one `Retriever` for every user of it (build_sft, evaluation, rag_eval,
csat, the server and the agent's search_kb), opened by `open_retriever` in `index.retrieval_mode`.

    from veritune.retrieval.search import Retriever
    with Retriever("data/index/milvus.db", "veritune_chunks", "all-MiniLM-L6-v2", mode="hybrid") as r:
        hits = r.search(["How do I reset the X200?"], k=5)[0]

Three modes: `dense` (embeddings), `bm25` (keywords: exact SKUs, error codes, rare names) or
`hybrid` (both, fused by reciprocal rank fusion in `client.hybrid_search`).
`iterative_search` retrieves twice for multi-hop questions (retrieve, read the top hit,
retrieve again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veritune.core.params import RETRIEVAL_MODES
from veritune.retrieval.embedding import embed, embedding_dim, load_embedder
from veritune.retrieval.milvus import LEXICAL_METRIC, MAX_TOPK, METRIC_TYPE, connect, disconnect, is_local_uri

RRF_K = 60  # reciprocal rank fusion constant from Cormack et al. 2009; larger flattens rank differences
HYBRID_CANDIDATES = 20  # each of dense and BM25 proposes max(k, this) chunks before fusion


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    title: str
    text: str
    score: float  # higher is closer: cosine (dense), BM25 score (bm25), reciprocal-rank-fusion score (hybrid)


_HIT_FIELDS = ("chunk_id", "doc_id", "title", "text")


class Retriever:
    """Search an index built by `build_index`. Close it (or use `with`) to free the db.

    `mode` is the default for `search`: "dense" (embeddings, cosine), "bm25" (Milvus full-text
    search) or "hybrid" (both, fused by reciprocal rank fusion with constant `rrf_k`).
    """

    def __init__(
        self,
        uri: str,
        collection: str,
        embedding_model: str,
        batch_size: int = 64,
        mode: str = "dense",
        rrf_k: int = RRF_K,
    ):
        _check_mode(mode)
        if rrf_k < 1:
            raise ValueError(f"rrf_k must be >= 1, got {rrf_k}")
        if is_local_uri(uri) and not Path(uri).exists():
            raise FileNotFoundError(f"no Milvus Lite index at {uri}: build it with `dvc repro index`")
        self.uri, self.collection, self.batch_size = uri, collection, batch_size
        self.mode, self.rrf_k = mode, rrf_k
        self.embedder = load_embedder(embedding_model)
        self._client = connect(uri)
        try:
            if not self._client.has_collection(collection):
                raise LookupError(
                    f"index {uri} has no collection {collection!r} "
                    f"(has {self._client.list_collections()}): build it with `dvc repro index`"
                )
            fields = {f["name"]: f for f in self._client.describe_collection(collection)["fields"]}
            index_dim = int(fields["embedding"]["params"]["dim"])
            model_dim = embedding_dim(self.embedder)
            if index_dim != model_dim:
                raise ValueError(
                    f"index {uri}:{collection} holds {index_dim}-dim vectors but {embedding_model!r} "
                    f"makes {model_dim}-dim ones: open it with the model it was built with"
                )
            self.has_lexical = "sparse" in fields
            if mode != "dense" and not self.has_lexical:
                raise LookupError(
                    f"index {uri}:{collection} has no full-text (BM25) field, which mode {mode!r} "
                    "needs: it was built before hybrid search; rebuild it with `dvc repro index`"
                )
            self._client.load_collection(collection)  # a reopened collection starts released
        except BaseException:
            self.close()
            raise

    def search(self, queries: Sequence[str], k: int, mode: str | None = None) -> list[list[Hit]]:
        """The `k` best chunks for each query, best first, in `mode` (default: the retriever's).

        BM25 finds only chunks that share a term with the query, so a `bm25` list can be
        shorter than `k` (empty for a query of unknown words).
        """
        if self._client is None:
            raise RuntimeError("Retriever is closed")
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be in [1, {MAX_TOPK}], got {k}")
        mode = self.mode if mode is None else mode
        _check_mode(mode)
        if mode != "dense" and not self.has_lexical:
            raise LookupError(
                f"index {self.uri}:{self.collection} has no full-text (BM25) field, which mode "
                f"{mode!r} needs: rebuild it with `dvc repro index`"
            )
        results: list[list[Hit]] = []
        batches = range(0, len(queries), self.batch_size)
        for start in tqdm(batches, desc=f"search ({mode})", unit="batch", disable=len(batches) <= 1):
            batch = list(queries[start : start + self.batch_size])
            if mode == "bm25":
                found = self._client.search(
                    self.collection,
                    data=batch,
                    limit=k,
                    anns_field="sparse",
                    output_fields=list(_HIT_FIELDS),
                    search_params={"metric_type": LEXICAL_METRIC},
                )
            else:
                vectors = [list(v) for v in embed(self.embedder, batch, self.batch_size)]
                if mode == "dense":
                    found = self._client.search(
                        self.collection,
                        data=vectors,
                        limit=k,
                        anns_field="embedding",
                        output_fields=list(_HIT_FIELDS),
                        search_params={"metric_type": METRIC_TYPE},
                    )
                else:
                    found = self._hybrid(batch, vectors, k)
            for hits in found:
                results.append(
                    [
                        Hit(score=_score(float(h["distance"]), mode), **{f: h["entity"][f] for f in _HIT_FIELDS})
                        for h in hits
                    ]
                )
        return results

    def _hybrid(self, queries: list[str], vectors: list[list[float]], k: int) -> list[Any]:
        from pymilvus import AnnSearchRequest, RRFRanker

        candidates = min(MAX_TOPK, max(k, HYBRID_CANDIDATES))
        requests = [
            AnnSearchRequest(
                data=vectors, anns_field="embedding", param={"metric_type": METRIC_TYPE}, limit=candidates
            ),
            AnnSearchRequest(
                data=queries, anns_field="sparse", param={"metric_type": LEXICAL_METRIC}, limit=candidates
            ),
        ]
        return self._client.hybrid_search(
            self.collection, requests, ranker=RRFRanker(self.rrf_k), limit=k, output_fields=list(_HIT_FIELDS)
        )

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            disconnect(client, self.uri)

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_retriever(index_params: Any, **kwargs: Any) -> Retriever:
    """The retriever every consumer of the index uses (build_sft, evaluate, csat, serve, the
    agent's search): params `index`, searching in `index.retrieval_mode`, so what users get is
    what rag_eval measured best, set in one place. `kwargs` go to `Retriever`."""
    kwargs.setdefault("mode", index_params.retrieval_mode)
    return Retriever(index_params.uri, index_params.collection, index_params.embedding_model, **kwargs)


def _check_mode(mode: str) -> None:
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval mode must be one of {list(RETRIEVAL_MODES)}, got {mode!r}")


def _score(distance: float, mode: str) -> float:
    # Milvus Lite reports BM25 scores negated (most negative first); a server reports them positive.
    return abs(distance) if mode == "bm25" else distance


def follow_up_query(question: str, hit: Hit) -> str:
    """The second-round query of iterative retrieval: the question plus the title of the top
    hit, so a bridge entity found in round one -- the product behind a SKU -- leads to the
    document that answers the question."""
    return f"{question}\n{hit.title}"


def iterative_search(
    retriever: Retriever, questions: Sequence[str], k: int, mode: str | None = None
) -> list[list[Hit]]:
    """Retrieve, read the top hit, retrieve again; merge.

    Round one searches with the question, round two with `follow_up_query(question, top hit)`.
    The merged list takes the best chunk not yet taken from each round in turn (round one
    first), so round one's best chunks stay near the top while round two's new ones enter it.
    On the validation split (48 multi-hop questions) this alternation beat appending round
    two's new documents after the top half of round one in every mode; adding the hit's first
    words to the title helped dense retrieval and hurt BM25, so the query keeps the title only.
    """
    first = retriever.search(questions, k=k, mode=mode)
    follow_ups = [follow_up_query(q, hits[0]) if hits else q for q, hits in zip(questions, first)]
    second = retriever.search(follow_ups, k=k, mode=mode)
    return [_alternate(one, two, k) for one, two in zip(first, second)]


def _alternate(one: Sequence[Hit], two: Sequence[Hit], k: int) -> list[Hit]:
    """Take the best chunk not yet taken from each list in turn, `one` first."""
    out: list[Hit] = []
    seen: set[str] = set()
    queues = [list(one), list(two)]
    turn = 0
    while len(out) < k and any(queues):
        queue = queues[turn % 2]
        while queue and queue[0].chunk_id in seen:
            queue.pop(0)
        if queue:
            hit = queue.pop(0)
            seen.add(hit.chunk_id)
            out.append(hit)
        turn += 1
    return out
