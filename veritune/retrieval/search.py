"""Search over the index: one `Retriever` for every user of it (build_sft, evaluation, rag_eval,
csat, the server and the agent's search_kb), opened by `open_retriever` in `index.retrieval_mode`.

    from veritune.retrieval.search import Retriever
    with Retriever("data/index/milvus.db", "veritune_chunks", "all-MiniLM-L6-v2", mode="hybrid") as r:
        hits = r.search(["How do I reset the X200?"], k=5)[0]

Three modes: `dense` (embeddings), `bm25` (keywords: exact SKUs, error codes, rare names) or
`hybrid` (both, fused by reciprocal rank fusion in `client.hybrid_search`).
`iterative_search` retrieves twice for multi-hop questions (retrieve, read the top hit,
retrieve again).

Entity-aware search (`entity_search=True`, params `index.entity_search`): a question that
names two or more of the index's entities (the products its documents describe, field
`entity`) or an identifier of one (a SKU such as "LK-2422", found verbatim in a chunk) gets
the best chunk of each such entity first, then the best of the whole index for the question
with the entity names added, up to `k` (at least one chunk per entity, at most
`MAX_ENTITIES`). "Which is lighter, the A or the B?" then reads both spec sheets, and "my SKU
LK-2422 shows E3" the guide of the product behind the SKU, where one ranked list spends both
slots on the product the question names most strongly. Questions naming one product or none
are searched as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from veritune.core.params import RETRIEVAL_MODES
from veritune.retrieval.embedding import embed, embedding_dim, load_embedder
from veritune.retrieval.milvus import LEXICAL_METRIC, MAX_TOPK, METRIC_TYPE, connect, disconnect, is_local_uri

MAX_ENTITIES = 4  # entity-aware search: chunks reserved for at most this many named entities
# Identifiers: a code that starts with a letter and has a digit after a hyphen ("LK-2422",
# "HX-7B"); not "30-day", "2-in-1" or "Wi-Fi". Only one found verbatim in a chunk counts.
IDENTIFIER = re.compile(r"\b[A-Za-z][A-Za-z0-9]*-\d[A-Za-z0-9]*(?:-[A-Za-z0-9]+)*\b")
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
        entity_search: bool = False,
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
            self.entities: dict[str, str] = {}  # lower-cased name -> name, longest first
            if entity_search:
                if "entity" not in fields:
                    raise LookupError(
                        f"index {uri}:{collection} has no entity field, which index.entity_search needs: "
                        "it was built before entity-aware search; rebuild it with `dvc repro index`"
                    )
                self.entities = self._entity_names()
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
            for query, hits in zip(batch, found):
                entities = self._entity_plan(query) if self.entities else []
                results.append(
                    self._entity_search(query, entities, k, mode)
                    if entities
                    else [
                        Hit(score=_score(float(h["distance"]), mode), **{f: h["entity"][f] for f in _HIT_FIELDS})
                        for h in hits
                    ]
                )
        return results

    def _hybrid(self, queries: list[str], vectors: list[list[float]], k: int, expr: str = "") -> list[Any]:
        from pymilvus import AnnSearchRequest, RRFRanker

        candidates = min(MAX_TOPK, max(k, HYBRID_CANDIDATES))
        requests = [
            AnnSearchRequest(
                data=vectors, anns_field="embedding", param={"metric_type": METRIC_TYPE}, limit=candidates, expr=expr
            ),
            AnnSearchRequest(
                data=queries, anns_field="sparse", param={"metric_type": LEXICAL_METRIC}, limit=candidates, expr=expr
            ),
        ]
        return self._client.hybrid_search(
            self.collection, requests, ranker=RRFRanker(self.rrf_k), limit=k, output_fields=list(_HIT_FIELDS)
        )

    def _search_one(self, query: str, k: int, mode: str, expr: str = "") -> list[Hit]:
        """One query's `k` best chunks in `mode` among those matching the filter `expr`."""
        kwargs = {"limit": k, "output_fields": list(_HIT_FIELDS), "filter": expr}
        if mode == "bm25":
            found = self._client.search(
                self.collection,
                data=[query],
                anns_field="sparse",
                search_params={"metric_type": LEXICAL_METRIC},
                **kwargs,
            )
        else:
            vectors = [list(v) for v in embed(self.embedder, [query], self.batch_size)]
            if mode == "dense":
                found = self._client.search(
                    self.collection,
                    data=vectors,
                    anns_field="embedding",
                    search_params={"metric_type": METRIC_TYPE},
                    **kwargs,
                )
            else:
                found = self._hybrid([query], vectors, k, expr)
        return [
            Hit(score=_score(float(h["distance"]), mode), **{f: h["entity"][f] for f in _HIT_FIELDS}) for h in found[0]
        ]

    def _entity_names(self) -> dict[str, str]:
        names: set[str] = set()
        iterator = self._client.query_iterator(
            self.collection, batch_size=1000, filter='entity != ""', output_fields=["entity"]
        )
        try:
            while batch := iterator.next():
                names.update(row["entity"] for row in batch)
        finally:
            iterator.close()
        return {n.lower(): n for n in sorted(names, key=lambda n: (-len(n), n))}

    def named_entities(self, query: str) -> list[str]:
        """The entities `query` names, in the order it names them, then those behind
        identifiers it quotes (`_identified`). Empty without entity search."""
        named = self._named(query)
        return named + [e for e in self._identified(query) if e not in named]

    def _named(self, query: str) -> list[str]:
        # Longest names first, each match blanked out, so "Orca Kettle Pro" is not also
        # "Orca Kettle", while "the Orca Kettle Pro or the Orca Kettle" names both.
        low = query.lower()
        found: list[tuple[int, str]] = []
        for lower, name in self.entities.items():
            at = low.find(lower)
            if at >= 0:
                found.append((at, name))
                while at >= 0:
                    low = low[:at] + " " * len(lower) + low[at + len(lower) :]
                    at = low.find(lower)
        return [name for _, name in sorted(found)]

    def _identified(self, query: str) -> list[str]:
        """Entities of the chunks that hold an identifier of `query` verbatim (as written or
        upper-cased: catalogues print codes in capitals)."""
        if not self.entities:
            return []
        out: list[str] = []
        for code in dict.fromkeys(IDENTIFIER.findall(query)):
            forms = " or ".join(f'text like "%{c}%"' for c in dict.fromkeys((code, code.upper())))
            rows = self._client.query(
                self.collection, filter=f'({forms}) and entity != ""', output_fields=["entity"], limit=8
            )
            out += [row["entity"] for row in rows if row["entity"] not in out]
        return out

    def _entity_plan(self, query: str) -> list[str]:
        """The entities to retrieve for separately: two or more named, or any behind an
        identifier; [] searches as one ranked list."""
        if not self.entities:
            return []
        named, identified = self._named(query), self._identified(query)
        if len(named) >= 2 or identified:  # identified: also the SKU of the one product it names
            return (named + [e for e in identified if e not in named])[:MAX_ENTITIES]
        return []

    def _entity_search(self, query: str, entities: list[str], k: int, mode: str) -> list[Hit]:
        out: list[Hit] = []
        taken: set[str] = set()
        for name in entities:
            for hit in self._search_one(query, 1 + len(out), mode, f"entity == {json.dumps(name, ensure_ascii=False)}"):
                if hit.chunk_id not in taken:
                    out.append(hit)
                    taken.add(hit.chunk_id)
                    break
        want = max(k, len(out))
        expanded = query + "\n" + "\n".join(entities)
        for hit in self._search_one(expanded, min(MAX_TOPK, want + len(out)), mode):
            if len(out) >= want:
                break
            if hit.chunk_id not in taken:
                out.append(hit)
                taken.add(hit.chunk_id)
        return out

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
    kwargs.setdefault("entity_search", index_params.entity_search)
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
