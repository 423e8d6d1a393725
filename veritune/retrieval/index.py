"""Building the index (`index` stage): every chunk embedded and full-text indexed in one Milvus collection.

Embeddings are searched with the COSINE metric on an exact (FLAT) index; a few thousand chunks
need nothing approximate. The same `title + "\\n" + text` is also indexed for Milvus
full-text search: a VARCHAR field with the standard analyzer feeds a BM25 `Function` that fills
a sparse vector field, searched through a SPARSE_INVERTED_INDEX with the BM25 metric.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from veritune.retrieval.chunking import embedding_text
from veritune.retrieval.embedding import embed, embedding_dim
from veritune.retrieval.milvus import LEXICAL_METRIC, METRIC_TYPE, connect, disconnect

logger = logging.getLogger(__name__)

INDEX_TYPE = "FLAT"  # exact search; Milvus Lite also offers AUTOINDEX (HNSW via faiss) and IVF_FLAT
# Milvus caps VARCHAR at 65,535; a server counts bytes, Milvus Lite characters, so we check bytes.
MAX_TEXT_BYTES = 65_535
MAX_TITLE_BYTES = 4_096
MAX_ID_BYTES = 512
SPARSE_INDEX_TYPE = "SPARSE_INVERTED_INDEX"
# English stop words (NLTK's list): without them BM25 ranks "What should I do if..." FAQ pages
# over the one spec sheet holding the SKU the question asks about.
STOP_WORDS = sorted(
    set(
        """
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split()
    )
)
# The standard tokenizer splits on non-word characters ("LK-2422" -> "lk", "2422"). Milvus Lite
# implements only the stop filter (it always lower-cases); a Milvus server applies both filters.
ANALYZER_PARAMS = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": STOP_WORDS}]}


def _check_chunks(chunks: Sequence[dict[str, Any]]) -> None:
    seen = set()
    limits = {"chunk_id": MAX_ID_BYTES, "doc_id": MAX_ID_BYTES, "title": MAX_TITLE_BYTES, "text": MAX_TEXT_BYTES}
    optional = {"entity": MAX_TITLE_BYTES}
    for chunk in chunks:
        chunk_id = chunk.get("chunk_id")
        if chunk_id in seen:
            raise ValueError(f"chunk {chunk_id!r} appears twice: document ids must be unique")
        seen.add(chunk_id)
        for field, limit in [*limits.items(), *((f, n) for f, n in optional.items() if f in chunk)]:
            value = chunk.get(field)
            if not isinstance(value, str):
                raise ValueError(f"chunk {chunk_id!r}: field {field!r} must be a string, got {value!r}")
            size = len(value.encode("utf-8"))
            if size > limit:
                raise ValueError(
                    f"chunk {chunk_id!r}: {field} is {size} bytes, over the index limit of {limit}; "
                    + (
                        "lower index.chunk_words or fix the document's whitespace"
                        if field == "text"
                        else "shorten it in the source documents"
                    )
                )
        size = len(embedding_text(chunk).encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            raise ValueError(
                f"chunk {chunk_id!r}: title + text is {size} bytes, over the full-text field limit of "
                f"{MAX_TEXT_BYTES}; lower index.chunk_words"
            )


def _schema(client: Any, dim: int) -> tuple[Any, Any]:
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
    schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    # The product (or other entity) the chunk's document describes, "" for none: entity-aware
    # search (`veritune.retrieval.search`) retrieves per named entity by filtering on it.
    schema.add_field("entity", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    # Full-text search: Milvus tokenizes `lexical_text` and its BM25 function fills `sparse`
    # (term frequencies; idf is kept by the index), so inserts carry only the text.
    schema.add_field(
        "lexical_text",
        DataType.VARCHAR,
        max_length=MAX_TEXT_BYTES,
        enable_analyzer=True,
        analyzer_params=ANALYZER_PARAMS,
    )
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name="bm25",
            function_type=FunctionType.BM25,
            input_field_names=["lexical_text"],
            output_field_names=["sparse"],
        )
    )
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="embedding", index_type=INDEX_TYPE, metric_type=METRIC_TYPE)
    index_params.add_index(field_name="sparse", index_type=SPARSE_INDEX_TYPE, metric_type=LEXICAL_METRIC)
    return schema, index_params


def build_index(
    chunks: Sequence[dict[str, Any]], uri: str, collection: str, embedder: Any, batch_size: int
) -> dict[str, Any]:
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
                batch = chunks[start : start + batch_size]
                vectors = embed(embedder, [embedding_text(c) for c in batch], batch_size)
                rows = [
                    {
                        "chunk_id": c["chunk_id"],
                        "doc_id": c["doc_id"],
                        "title": c["title"],
                        "text": c["text"],
                        "entity": c.get("entity", ""),
                        "embedding": v,
                        "lexical_text": embedding_text(c),
                    }
                    for c, v in zip(batch, vectors)
                ]
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
