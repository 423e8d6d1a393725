"""Stage `index`: chunk every document, embed the chunks into Milvus, measure retrieval.

Run from the project root: `python stages/index.py` (or `dvc repro index`).

Reads  params.yaml (`index:`), data/validated/documents.jsonl (all documents: the knowledge
       base includes those held out of training), data/split/questions_{val,test}.jsonl.
Writes data/index/ — milvus.db (when index.uri is a Milvus Lite path; a server URL gets the
       collection instead), chunks.jsonl, index_config.json — and metrics/index.json:
       recall@k / all_recall@k / mrr over questions that have gold documents, for val, test
       and the test questions on documents never trained on (test_unseen).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json
from veritune.retrieval.chunking import chunk_document
from veritune.retrieval.embedding import load_embedder
from veritune.retrieval.index import build_index
from veritune.retrieval.metrics import retrieval_metrics
from veritune.retrieval.milvus import is_local_uri
from veritune.retrieval.search import Retriever

DOCUMENTS = Path("data/validated/documents.jsonl")
QUESTIONS = {"val": Path("data/split/questions_val.jsonl"), "test": Path("data/split/questions_test.jsonl")}
INDEX_DIR = Path("data/index")
METRICS = Path("metrics/index.json")

logger = logging.getLogger("stages.index")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing reads like errors
    p = load_params("index")
    local = is_local_uri(p.uri)
    if local and Path(p.uri).parent.resolve() != INDEX_DIR.resolve():
        raise ValueError(
            f"params.index.uri must be a Milvus Lite file directly in {INDEX_DIR}/ "
            f"(e.g. {INDEX_DIR}/milvus.db) or a server URL like http://host:19530, got {p.uri!r}"
        )

    documents = read_jsonl(DOCUMENTS)
    questions = {split: read_jsonl(path) for split, path in QUESTIONS.items()}
    chunks = [c for doc in documents for c in chunk_document(doc, p.chunk_words, p.chunk_overlap_words, p.entity_field)]
    logger.info("%d documents -> %d chunks of <= %d words", len(documents), len(chunks), p.chunk_words)

    embedder = load_embedder(p.embedding_model)
    with atomic_path(INDEX_DIR) as tmp_dir:
        tmp_dir.mkdir()
        build_uri = str(tmp_dir / Path(p.uri).name) if local else p.uri
        built = build_index(chunks, build_uri, p.collection, embedder, p.batch_size)  # closes the db
        with (tmp_dir / "chunks.jsonl").open("w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(json.dumps(chunk, ensure_ascii=False) + "\n")
        config = {
            "params": as_dict(p),
            **built,
            "n_documents": len(documents),
            # the on-disk db format belongs to milvus-lite's major version
            "versions": {pkg: version(pkg) for pkg in ("pymilvus", "milvus-lite", "sentence-transformers")},
        }
        (tmp_dir / "index_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # Searched on the renamed index, which also proves it opens where later stages look.
    with Retriever(
        p.uri, p.collection, p.embedding_model, batch_size=p.batch_size, entity_search=p.entity_search
    ) as retriever:
        hits = {
            split: retriever.search([q["question"] for q in qs], k=max(p.eval_ks)) for split, qs in questions.items()
        }
    unseen = [i for i, q in enumerate(questions["test"]) if q.get("doc_status") == "unseen"]
    scored = {
        "val": (questions["val"], hits["val"]),
        "test": (questions["test"], hits["test"]),
        "test_unseen": ([questions["test"][i] for i in unseen], [hits["test"][i] for i in unseen]),
    }
    metrics: dict = {}
    for name, (qs, qs_hits) in scored.items():
        metrics[name] = retrieval_metrics(qs_hits, [q["doc_ids"] for q in qs], p.eval_ks)
        logger.info("%s: %s", name, metrics[name])
    metrics["n_chunks"] = len(chunks)
    write_json(METRICS, metrics)


if __name__ == "__main__":
    main()
