"""Chunking, the packaged embedder, a real Milvus Lite index, metrics, and the `index` stage."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import PARAMS_YAML
from veritune.retrieval.chunking import chunk_document
from veritune.retrieval.embedding import load_embedder
from veritune.retrieval.index import build_index
from veritune.retrieval.metrics import retrieval_metrics
from veritune.retrieval.search import Hit, Retriever, open_retriever

DOCS = [
    {
        "id": "kettle",
        "title": "Aquila K2 Kettle",
        "text": "The Aquila K2 kettle boils 1.7 litres of water in three minutes. Descale it monthly with citric acid.",
    },
    {
        "id": "router",
        "title": "Nimbus R7 Router",
        "text": "To reset the Nimbus R7 router, hold the pinhole button for ten seconds until the LED blinks amber.",
    },
    {
        "id": "drill",
        "title": "Torque D18 Drill",
        "text": "The Torque D18 cordless drill ships with two 18 volt lithium batteries and a keyless chuck.",
    },
    {
        "id": "leave",
        "title": "Parental Leave Policy",
        "text": "Employees receive sixteen weeks of paid parental leave, "
        "which may be split into two blocks within the first year.",
    },
    {
        "id": "expenses",
        "title": "Travel Expense Policy",
        "text": "Hotel stays are reimbursed up to 180 euros per night; receipts must be filed within thirty days.",
    },
    {
        "id": "vpn",
        "title": "Corporate VPN Setup",
        "text": "Install the WireGuard client, import the profile from the IT "
        "portal and sign in with your badge number.",
    },
    {
        "id": "fridge",
        "title": "Polar F9 Refrigerator",
        "text": "The Polar F9 fridge keeps the vegetable drawer at four "
        "degrees Celsius and alarms when the door stays open.",
    },
    {
        "id": "printer",
        "title": "Inkwell P3 Printer",
        "text": "Replace the Inkwell P3 toner cartridge when the display "
        "shows error E-42; recycled cartridges void the warranty.",
    },
]
QUESTIONS = [  # question, gold doc ids
    ("How long do I hold the button to reset the Nimbus router?", ["router"]),
    ("How many weeks of paid parental leave do employees get?", ["leave"]),
    ("What does error E-42 on the Inkwell printer mean?", ["printer"]),
    ("What is the nightly hotel limit when travelling?", ["expenses"]),
]


def words(text: str) -> list[str]:
    return text.split()


# --------------------------------------------------------------------------- chunking


def test_short_document_is_one_chunk_with_its_own_text():
    doc = {"id": "d1", "title": "T", "text": "  Just a few words.\nAnd a second line.  ", "extra": 1}
    chunks = chunk_document(doc, chunk_words=50, overlap_words=10)
    assert chunks == [
        {
            "chunk_id": "d1#0",
            "doc_id": "d1",
            "title": "T",
            "text": "Just a few words.\nAnd a second line.",
            "entity": "",
        }
    ]


def test_long_document_chunks_end_at_sentences_and_overlap_by_whole_sentences():
    sentences = [f"Sentence {i} has exactly six words." for i in range(20)]  # 6 words each
    doc = {"id": "long", "title": "Long", "text": " ".join(sentences)}
    chunks = chunk_document(doc, chunk_words=30, overlap_words=12)

    assert [c["chunk_id"] for c in chunks] == [f"long#{i}" for i in range(len(chunks))]
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(words(chunk["text"])) <= 30
        assert chunk["text"].startswith("Sentence ") and chunk["text"].endswith("words.")
    for prev, nxt in zip(chunks, chunks[1:]):
        assert words(prev["text"])[-12:] == words(nxt["text"])[:12]  # two whole sentences carried over
    # every sentence is kept, in order
    seen = []
    for chunk in chunks:
        seen += [s for s in re.findall(r"Sentence \d+", chunk["text"]) if s not in seen]
    assert seen == [f"Sentence {i}" for i in range(20)]


def test_run_on_text_is_cut_into_windows_with_exact_overlap():
    tokens = [f"w{i}" for i in range(100)]
    chunks = chunk_document({"id": "x", "title": "", "text": " ".join(tokens)}, chunk_words=40, overlap_words=10)
    pieces = [words(c["text"]) for c in chunks]
    assert all(len(p) <= 40 for p in pieces)
    for prev, nxt in zip(pieces, pieces[1:]):
        assert prev[-10:] == nxt[:10]
    assert pieces[0][0] == "w0" and pieces[-1][-1] == "w99"

    no_overlap = chunk_document({"id": "x", "title": "", "text": " ".join(tokens)}, chunk_words=40, overlap_words=0)
    assert [words(c["text"]) for c in no_overlap] == [tokens[:40], tokens[40:80], tokens[80:]]


def test_bad_document_and_bad_sizes_are_rejected_by_id():
    with pytest.raises(ValueError, match="'broken'.*'text'"):
        chunk_document({"id": "broken", "title": "T"}, chunk_words=20, overlap_words=0)
    with pytest.raises(ValueError, match="overlap_words"):
        chunk_document(DOCS[0], chunk_words=20, overlap_words=20)


# --------------------------------------------------------------------------- embedder


def test_packaged_embedder_loads_offline_and_is_cached():
    model = load_embedder("all-MiniLM-L6-v2")
    assert model is load_embedder("all-MiniLM-L6-v2")
    assert model.get_embedding_dimension() == 384


def test_missing_embedder_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers directory"):
        load_embedder(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- index + search


@pytest.fixture(scope="module")
def lite_index(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("idx") / "milvus.db")
    chunks = [c for d in DOCS for c in chunk_document(d, chunk_words=120, overlap_words=20)]
    built = build_index(chunks, uri, "chunks", load_embedder("all-MiniLM-L6-v2"), batch_size=3)
    assert built == {"n_chunks": 8, "embedding_dim": 384, "index_type": "FLAT", "metric_type": "COSINE"}
    return uri


def test_search_puts_the_right_document_first(lite_index):
    with Retriever(lite_index, "chunks", "all-MiniLM-L6-v2", batch_size=3) as retriever:  # 2 batches of queries
        results = retriever.search([q for q, _ in QUESTIONS], k=3)
    assert [hits[0].doc_id for hits in results] == [gold[0] for _, gold in QUESTIONS]
    top = results[0][0]
    assert top == Hit(
        chunk_id="router#0", doc_id="router", title="Nimbus R7 Router", text=DOCS[1]["text"], score=top.score
    )
    for hits in results:
        assert len(hits) == 3
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert -1.0 <= hits[2].score <= 1.0 + 1e-5


def test_every_consumer_retrieves_in_the_one_params_mode(lite_index):
    """build_sft, evaluate, csat, serve and the agent's search open the index through
    `open_retriever`, which searches in `index.retrieval_mode`: hybrid, what rag_eval measured
    best, unless params say otherwise (issue 14: they all searched dense)."""
    import ast
    from pathlib import Path

    from tests.conftest import params
    from veritune.core.config import load_params

    repo = Path(__file__).resolve().parents[1]
    assert load_params("index", repo / "params.yaml").retrieval_mode == "hybrid"
    for path in (
        "stages/build_sft.py",
        "stages/evaluate.py",
        "stages/csat.py",
        "stages/agent_eval.py",
        "veritune/serve/service.py",
        "veritune/cli.py",
    ):
        calls = {
            node.func.id
            for node in ast.walk(ast.parse((repo / path).read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert "open_retriever" in calls and "Retriever" not in calls, path

    queries = [q for q, _ in QUESTIONS]
    with Retriever(lite_index, "chunks", "all-MiniLM-L6-v2", mode="hybrid") as hybrid:
        expected = hybrid.search(queries, k=3)
    with open_retriever(params("index", uri=lite_index, collection="chunks")) as retriever:
        assert retriever.mode == "hybrid" and retriever.search(queries, k=3) == expected
    with open_retriever(params("index", uri=lite_index, collection="chunks", retrieval_mode="dense")) as retriever:
        assert retriever.mode == "dense"


def test_retriever_reopens_after_close_and_frees_the_db(lite_index):
    from milvus_lite import MilvusLite

    retriever = Retriever(lite_index, "chunks", "all-MiniLM-L6-v2")
    retriever.close()
    retriever.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        retriever.search(["x"], k=1)
    MilvusLite(lite_index).close()  # the LOCK is free: nothing in this process holds the db

    first, second = (Retriever(lite_index, "chunks", "all-MiniLM-L6-v2") for _ in range(2))
    first.close()  # the db stays served while another retriever uses it
    assert second.search(["VPN WireGuard profile"], k=1)[0][0].doc_id == "vpn"
    second.close()
    with Retriever(lite_index, "chunks", "all-MiniLM-L6-v2") as again:
        assert again.search(["Polar fridge drawer temperature"], k=1)[0][0].doc_id == "fridge"
        assert again.search([], k=5) == []


def test_retriever_errors_name_the_fix(lite_index, tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro index"):
        Retriever(str(tmp_path / "missing.db"), "chunks", "all-MiniLM-L6-v2")
    with pytest.raises(LookupError, match="no collection 'other'"):
        Retriever(lite_index, "other", "all-MiniLM-L6-v2")
    with Retriever(lite_index, "chunks", "all-MiniLM-L6-v2") as retriever:  # failed opens released the db
        assert retriever.search(["drill batteries"], k=1)[0][0].doc_id == "drill"


def test_build_rejects_oversized_and_duplicate_chunks(tmp_path):
    embedder = load_embedder("all-MiniLM-L6-v2")
    huge = {"chunk_id": "big#0", "doc_id": "big", "title": "Big", "text": "x" * 70_000}
    with pytest.raises(ValueError, match="'big#0'.*text is 70000 bytes"):
        build_index([huge], str(tmp_path / "m.db"), "c", embedder, batch_size=8)
    dup = {"chunk_id": "a#0", "doc_id": "a", "title": "A", "text": "t"}
    with pytest.raises(ValueError, match="'a#0' appears twice"):
        build_index([dup, dup], str(tmp_path / "m.db"), "c", embedder, batch_size=8)


# --------------------------------------------------------------------------- metrics


def test_metrics_of_a_perfect_retriever_are_one():
    hits = [["a", "x", "y"], ["b", "c", "z"]]
    m = retrieval_metrics(hits, [["a"], ["b", "c"]], ks=[1, 3])
    assert m == {
        "recall@1": 1.0,
        "recall@3": 1.0,
        "all_recall@1": 0.5,
        "all_recall@3": 1.0,
        "mrr": 1.0,
        "n": 2,
        "n_skipped": 0,
    }


def test_metrics_of_a_reversed_ranking_and_skipped_questions():
    ranking = ["d4", "d3", "d2", "d1"]  # gold is always last: rank 4
    hits = [[Hit(f"{d}#0", d, "", "", 0.0) for d in ranking], ranking, ["d1"]]
    m = retrieval_metrics(hits, [["d1"], ["d1"], []], ks=[1, 3, 4])
    assert m["recall@1"] == 0.0 and m["recall@3"] == 0.0 and m["recall@4"] == 1.0
    assert m["mrr"] == 0.25
    assert (m["n"], m["n_skipped"]) == (2, 1)
    # chunks of one document count once: two hits on the same doc do not make multi-hop recall
    m = retrieval_metrics([["a", "a", "b"]], [["a", "b"]], ks=[2, 3])
    assert (m["all_recall@2"], m["all_recall@3"]) == (0.0, 1.0)
    assert retrieval_metrics([[]], [[]], ks=[1]) == {
        "recall@1": None,
        "all_recall@1": None,
        "mrr": None,
        "n": 0,
        "n_skipped": 1,
    }


# --------------------------------------------------------------------------- stage


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_index_stage_end_to_end(tmp_path, monkeypatch):
    from stages import index as index_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "index": {
                    **PARAMS_YAML["index"],
                    "uri": "data/index/milvus.db",
                    "collection": "kb",
                    "embedding_model": "all-MiniLM-L6-v2",
                    "chunk_words": 12,
                    "chunk_overlap_words": 4,
                    "batch_size": 4,
                    "eval_ks": [1, 3, 5],
                }
            }
        )
    )
    write_jsonl(tmp_path / "data/validated/documents.jsonl", DOCS)
    questions = [
        {
            "id": f"q{i}",
            "question": q,
            "answers": ["?"],
            "doc_ids": gold,
            "kind": "single_hop",
            "split": "test",
            "doc_status": "unseen" if i % 2 else "seen",
        }
        for i, (q, gold) in enumerate(QUESTIONS)
    ]
    questions.append(
        {
            "id": "qx",
            "question": "What is the CEO's shoe size?",
            "answers": [],
            "doc_ids": [],
            "kind": "unanswerable",
            "split": "test",
            "doc_status": "seen",
        }
    )
    write_jsonl(tmp_path / "data/split/questions_val.jsonl", [dict(q, split="val") for q in questions[:2]])
    write_jsonl(tmp_path / "data/split/questions_test.jsonl", questions)
    (tmp_path / "data/index").mkdir()
    (tmp_path / "data/index/stale.txt").write_text("from an earlier run")

    index_stage.main()

    index_dir = tmp_path / "data/index"
    assert sorted(p.name for p in index_dir.iterdir()) == ["chunks.jsonl", "index_config.json", "milvus.db"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["index", "split", "validated"]  # no temp left
    chunks = [json.loads(line) for line in (index_dir / "chunks.jsonl").read_text().splitlines()]
    assert len(chunks) > len(DOCS) and all(len(c["text"].split()) <= 12 for c in chunks)
    config = json.loads((index_dir / "index_config.json").read_text())
    assert config["embedding_dim"] == 384 and config["n_chunks"] == len(chunks) and config["n_documents"] == 8
    assert config["params"]["chunk_words"] == 12

    metrics = json.loads((tmp_path / "metrics/index.json").read_text())
    assert set(metrics) == {"val", "test", "test_unseen", "n_chunks"}
    assert metrics["n_chunks"] == len(chunks)
    assert (metrics["test"]["n"], metrics["test"]["n_skipped"], metrics["test_unseen"]["n"]) == (4, 1, 2)
    assert metrics["val"]["n"] == 2
    assert metrics["test"]["recall@5"] == 1.0 and {"recall@1", "all_recall@3", "mrr"} <= set(metrics["val"])

    # the renamed db opens where later stages look for it
    with Retriever("data/index/milvus.db", "kb", "all-MiniLM-L6-v2") as retriever:
        assert retriever.search(["Aquila kettle descaling"], k=1)[0][0].doc_id == "kettle"


def test_index_stage_rejects_a_lite_db_outside_the_index_dir(tmp_path, monkeypatch):
    from stages import index as index_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"index": {**PARAMS_YAML["index"], "uri": "elsewhere/milvus.db"}})
    )
    with pytest.raises(ValueError, match="data/index/milvus.db"):
        index_stage.main()
