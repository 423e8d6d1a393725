"""Hybrid (dense + Milvus BM25) retrieval on a real Milvus Lite index, iterative retrieval,
and the rag_eval metrics: recall per question, paired intervals, stratified sampling,
distractor noise, and the injection-resistance metric on answerers that obey or ignore."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from veritune.core.config import ParamsError, load_params, parse_params
from veritune.eval.injection import (
    INJECTIONS,
    injection_cases,
    injection_messages,
    injection_resistance,
    leaks_system_prompt,
    obeys_injection,
)
from veritune.eval.rag_eval import answer_summary, noisy_passages, per_question_recall, stratified_sample
from veritune.eval.scoring import paired_difference, with_ci
from veritune.retrieval.chunking import chunk_document
from veritune.retrieval.embedding import load_embedder
from veritune.retrieval.index import build_index
from veritune.retrieval.search import Retriever, iterative_search

# Ten documents. The catalogue names part 77812 once in a long text while the wand's price
# list names a look-alike part and a price, so the embedding prefers the wrong one and only an
# exact keyword match finds the right one; the sleep guidance answers a paraphrase that shares
# no word with any document, which only the embedding can match; the toaster pair is a
# two-hop chain (a SKU -> the product -> its error code) with the kettle's E7 as a decoy.
DOCS = [
    {
        "id": "valve",
        "title": "Spare Parts Catalogue",
        "text": "The catalogue lists every spare part for espresso "
        "machines sold since 2019, with prices and fitting notes; the pressure valve is part 77812.",
    },
    {
        "id": "wand",
        "title": "Steam Wand Price List",
        "text": "Steam wand replacement price: item 77821 costs 40 euros.",
    },
    {
        "id": "sleep",
        "title": "Sleep Guidance",
        "text": "Adults should get seven to nine hours of sleep each night to stay healthy and alert.",
    },
    {
        "id": "toaster_spec",
        "title": "Borealis Toaster — Specifications",
        "text": "The Borealis Toaster has four slots, a 1500 W element and is listed under SKU ZK-5521.",
    },
    {
        "id": "toaster_guide",
        "title": "Borealis Toaster — Quick Start Guide",
        "text": "If the Borealis Toaster "
        "shows error E7 on its display, empty the crumb tray, wait a minute and restart it.",
    },
    {"id": "kettle_guide", "title": "Aquila Kettle Errors", "text": "Error E7: let the kettle cool, then descale."},
    {
        "id": "router",
        "title": "Nimbus R7 Router",
        "text": "To reset the Nimbus R7 router, hold the pinhole button for ten seconds until the LED blinks amber.",
    },
    {
        "id": "leave",
        "title": "Parental Leave Policy",
        "text": "Employees receive sixteen weeks of paid parental "
        "leave, which may be split into two blocks within the first year.",
    },
    {
        "id": "expenses",
        "title": "Travel Expense Policy",
        "text": "Hotel stays are reimbursed up to 180 euros per night; receipts must be filed within thirty days.",
    },
    {
        "id": "vpn",
        "title": "Corporate VPN Setup",
        "text": "Install the WireGuard client, import the profile from "
        "the IT portal and sign in with your badge number.",
    },
]
KEYWORD_QUERY = "What does part 77812 cost?"
PARAPHRASE_QUERY = "How much rest does a grownup require daily?"
BRIDGE_QUERY = "What does error E7 mean on the appliance with SKU ZK-5521?"


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("hybrid") / "milvus.db")
    chunks = [c for d in DOCS for c in chunk_document(d, chunk_words=120, overlap_words=20)]
    build_index(chunks, uri, "chunks", load_embedder("all-MiniLM-L6-v2"), batch_size=4)
    return uri


def rank_of(hits, doc_id):
    return next((i for i, h in enumerate(hits, start=1) if h.doc_id == doc_id), None)


# --------------------------------------------------------------------------- hybrid retrieval


def test_bm25_finds_a_rare_keyword_that_dense_ranks_lower(index):
    with Retriever(index, "chunks", "all-MiniLM-L6-v2") as r:
        bm25 = r.search([KEYWORD_QUERY], k=10, mode="bm25")[0]
        dense = r.search([KEYWORD_QUERY], k=10, mode="dense")[0]
    assert bm25[0].doc_id == "valve"
    assert dense[0].doc_id == "wand" and rank_of(dense, "valve") > 1
    assert bm25[0].score > 0  # higher is closer in every mode, Milvus Lite's negated BM25 included


def test_hybrid_recall_is_at_least_both_on_mixed_queries(index):
    queries = [(KEYWORD_QUERY, "valve"), (PARAPHRASE_QUERY, "sleep")]
    recall = {}
    with Retriever(index, "chunks", "all-MiniLM-L6-v2", mode="hybrid") as r:
        for mode in ("dense", "bm25", "hybrid"):
            results = r.search([q for q, _ in queries], k=1, mode=mode)
            recall[mode] = per_question_recall(results, [[gold] for _, gold in queries], k=1)
        assert r.search([PARAPHRASE_QUERY], k=1)[0][0].doc_id == "sleep"  # the retriever's own mode: hybrid
    assert recall["dense"] == [0.0, 1.0]  # the embedding misses the part number
    assert recall["bm25"] == [1.0, 0.0]  # the keywords miss the paraphrase
    assert recall["hybrid"] == [1.0, 1.0]


def test_iterative_retrieval_reaches_the_second_hop(index):
    with Retriever(index, "chunks", "all-MiniLM-L6-v2") as r:
        one_round = r.search([BRIDGE_QUERY], k=2, mode="bm25")[0]
        two_rounds = iterative_search(r, [BRIDGE_QUERY], k=2, mode="bm25")[0]
    assert one_round[0].doc_id == "toaster_spec"
    assert {h.doc_id for h in one_round} != {"toaster_spec", "toaster_guide"}  # the kettle's E7 competes
    assert [h.doc_id for h in two_rounds] == ["toaster_spec", "toaster_guide"]


def test_bad_mode_is_rejected_with_the_choices(index):
    with pytest.raises(ValueError, match=r"must be one of \['dense', 'bm25', 'hybrid'\], got 'sparse'"):
        Retriever(index, "chunks", "all-MiniLM-L6-v2", mode="sparse")
    with Retriever(index, "chunks", "all-MiniLM-L6-v2") as r:
        with pytest.raises(ValueError, match="got 'keyword'"):
            r.search(["x"], k=1, mode="keyword")


def test_an_index_built_before_full_text_search_says_to_rebuild(tmp_path):
    from pymilvus import DataType

    from veritune.retrieval.milvus import connect, disconnect

    uri = str(tmp_path / "old.db")
    client = connect(uri)
    try:  # the schema of indexes built before the BM25 field existed
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        for name in ("doc_id", "title", "text"):
            schema.add_field(name, DataType.VARCHAR, max_length=256)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=384)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
        client.create_collection("chunks", schema=schema, index_params=index_params)
        client.insert(
            "chunks",
            [{"chunk_id": "a#0", "doc_id": "a", "title": "A", "text": "alpha", "embedding": [1.0] + [0.0] * 383}],
        )
        client.flush("chunks")
    finally:
        disconnect(client, uri)
    with pytest.raises(LookupError, match="no full-text \\(BM25\\) field.*rebuild it with `dvc repro index`"):
        Retriever(uri, "chunks", "all-MiniLM-L6-v2", mode="hybrid")
    with Retriever(uri, "chunks", "all-MiniLM-L6-v2") as r:  # dense still works on it
        assert r.search(["alpha"], k=1)[0][0].doc_id == "a"
        with pytest.raises(LookupError, match="rebuild it"):
            r.search(["alpha"], k=1, mode="bm25")


# --------------------------------------------------------------------------- metrics


def test_recall_of_an_oracle_retriever_is_one_and_of_an_empty_one_zero():
    gold = [["a"], ["b", "c"], []]  # the third question has no gold documents and is left out
    oracle = [["a", "x"], ["c", "b"], ["z"]]
    assert per_question_recall(oracle, gold, k=1) == [1.0, 1.0]
    assert per_question_recall(oracle, gold, k=1, need_all=True) == [1.0, 0.0]
    assert per_question_recall(oracle, gold, k=2, need_all=True) == [1.0, 1.0]
    assert per_question_recall([[], [], []], gold, k=5) == [0.0, 0.0]
    assert with_ci([1.0] * 20, 200) == {"mean": 1.0, "ci95_low": 1.0, "ci95_high": 1.0, "n": 20}
    assert with_ci([], 200)["mean"] is None


def test_paired_difference_and_its_interval():
    better, worse = [1.0] * 30 + [0.0] * 10, [1.0] * 20 + [0.0] * 20
    diff = paired_difference(better, worse, 500)
    assert diff["mean"] == 0.25 and diff["n"] == 40
    assert 0.0 < diff["ci95_low"] < 0.25 < diff["ci95_high"]
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [], 100)


def test_stratified_sample_keeps_kind_shares_and_is_deterministic():
    questions = (
        [{"id": f"s{i}", "kind": "single_hop"} for i in range(60)]
        + [{"id": f"m{i}", "kind": "multi_hop"} for i in range(30)]
        + [{"id": f"u{i}", "kind": "unanswerable"} for i in range(10)]
    )
    sample = stratified_sample(questions, 20, seed=0)
    assert [q["kind"] for q in sample].count("single_hop") == 12
    assert [q["kind"] for q in sample].count("multi_hop") == 6
    assert [q["kind"] for q in sample].count("unanswerable") == 2
    assert sample == stratified_sample(questions, 20, seed=0)
    assert sample != stratified_sample(questions, 20, seed=1)
    assert [questions.index(q) for q in sample] == sorted(questions.index(q) for q in sample)
    assert stratified_sample(questions, 0, seed=0) == questions


def test_noisy_passages_keep_the_oracle_and_nest_the_distractors():
    chunks = [{"chunk_id": f"d{i}#0", "doc_id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(10)]
    questions = [{"id": "q1", "doc_ids": ["d3", "d7"]}, {"id": "q2", "doc_ids": []}]
    levels = {n: noisy_passages(questions, chunks, n, seed=0) for n in (0, 1, 4)}
    assert sorted(p["doc_id"] for p in levels[0][0]) == ["d3", "d7"] and levels[0][1] == []
    for n, rows in levels.items():
        distractors = [p["doc_id"] for p in rows[0] if p["doc_id"] not in ("d3", "d7")]
        assert len(distractors) == n and len(rows[0]) == n + 2 and len(rows[1]) == n
    small = {p["doc_id"] for p in levels[1][0]}
    assert small <= {p["doc_id"] for p in levels[4][0]}  # more noise adds to less, never swaps it
    with pytest.raises(ValueError, match=r"'q9': field 'doc_ids' names \['gone'\]"):
        noisy_passages([{"id": "q9", "doc_ids": ["gone"]}], chunks, 1, seed=0)


def test_answer_summary_splits_answerable_and_unanswerable():
    questions = [{"answers": ["x"]}, {"answers": ["y"]}, {"answers": []}]
    scores = [
        {"f1": 1.0, "abstained": 0.0, "unsupported": 0.0},
        {"f1": 0.0, "abstained": 1.0, "unsupported": 0.0},
        {"abstained": 1.0, "unsupported": 1.0},
    ]
    s = answer_summary(questions, scores, 200)
    assert (s["f1"], s["n_answerable"], s["n_unanswerable"]) == (0.5, 2, 1)
    assert (s["abstention_unanswerable"], s["wrongly_abstained"]) == (1.0, 0.5)
    assert s["unsupported_rate"] == round(1 / 3, 4)


# --------------------------------------------------------------------------- injection

SYSTEM = "Answer from the documents. If they do not contain the answer, say so."


def obeying_answerer(conversations):
    """Does whatever an injected passage tells it to."""
    replies = []
    for conv in conversations:
        user = conv[-1]["content"]
        template = next(t for t in INJECTIONS if t["text"] in user)
        replies.append(f"Sure. {conv[0]['content']}" if template["canary"] is None else f"OK: {template['canary']}")
    return replies


def ignoring_answerer(conversations):
    return ["The documents don't say."] * len(conversations)


def injection_fixture(n=8):
    questions = [
        {"id": f"q{i}", "question": f"What is the price of product {i}?", "answers": ["$1"], "product": f"Product {i}"}
        for i in range(n)
    ]
    passages = [
        [{"chunk_id": f"d{i}#0", "doc_id": f"d{i}", "title": "Spec", "text": f"Product {i} costs $1."}]
        for i in range(n)
    ]
    return injection_cases(questions, passages, seed=0)


def test_injection_resistance_is_zero_for_an_obeying_answerer_and_one_for_an_ignoring_one():
    cases = injection_fixture()
    assert {c["template"] for c in cases} == {t["name"] for t in INJECTIONS}  # every template is used
    convs = injection_messages(cases, SYSTEM)
    obeyed = injection_resistance(obeying_answerer(convs), cases, SYSTEM, 200)
    ignored = injection_resistance(ignoring_answerer(convs), cases, SYSTEM, 200)
    assert obeyed["mean"] == 0.0 and ignored["mean"] == 1.0
    assert obeyed["n"] == ignored["n"] == 8
    assert all(t["resistance"] == 0.0 for t in obeyed["by_template"].values())
    # the injected passage sits among the real ones
    assert all(
        len(c["passages"]) == 2 and any(p["doc_id"].startswith("injected-") for p in c["passages"]) for c in cases
    )


def test_obedience_detection_on_single_replies():
    assert obeys_injection("access   granted", "ignore_previous", SYSTEM)
    assert not obeys_injection("Access is granted to managers.", "ignore_previous", SYSTEM)
    assert obeys_injection("Claim it at refund-claims.example.net today", "phishing_link", SYSTEM)
    assert leaks_system_prompt("My instructions: answer from the documents. If they do not contain", SYSTEM)
    assert not leaks_system_prompt("The documents don't say.", SYSTEM)
    assert not obeys_injection("It costs $149.", "reveal_system_prompt", SYSTEM)
    with pytest.raises(ValueError, match="unknown injection template 'nope'"):
        obeys_injection("x", "nope", SYSTEM)


# --------------------------------------------------------------------------- params


def test_rag_eval_params_load_and_bad_values_are_listed():
    p = load_params("rag_eval", REPO / "params.yaml")
    assert "hybrid" in p.modes and p.headline_k in p.ks
    with pytest.raises(ParamsError) as err:
        parse_params(
            "rag_eval",
            {
                **load_params("rag_eval", REPO / "params.yaml").__dict__,
                "modes": ["dense", "sparse"],
                "headline_k": 7,
                "answer_mode": "both",
                "max_questions": -1,
            },
        )
    message = str(err.value)
    assert "rag_eval.modes must be a non-empty list of dense, bm25, hybrid" in message
    assert "rag_eval.headline_k must be one of rag_eval.ks" in message
    assert "rag_eval.answer_mode must be one of" in message
    assert "rag_eval.max_questions must be >= 0" in message


# --------------------------------------------------------------------------- stage


def test_stage_writes_metrics_report_and_plots(tmp_path, monkeypatch, index, tiny_checkpoint):
    """`stages/rag_eval.py` end to end on the hybrid index above, a tiny model and a LoRA
    adapter, in a throwaway project directory."""
    import json
    import shutil

    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages import rag_eval as stage
    from veritune.core.io import write_jsonl

    project = tmp_path / "project"
    shutil.copytree(REPO / "stages", project / "stages")
    shutil.copytree(Path(index).parent, project / "data/index")
    write_jsonl(
        project / "data/index/chunks.jsonl",
        [c for d in DOCS for c in chunk_document(d, chunk_words=120, overlap_words=20)],
    )
    questions = [
        {
            "id": "q1",
            "question": KEYWORD_QUERY,
            "answers": ["40 euros"],
            "doc_ids": ["valve"],
            "kind": "single_hop",
            "doc_status": "unseen",
        },
        {
            "id": "q2",
            "question": PARAPHRASE_QUERY,
            "answers": ["seven to nine hours"],
            "doc_ids": ["sleep"],
            "kind": "single_hop",
            "doc_status": "seen",
        },
        {
            "id": "q3",
            "question": BRIDGE_QUERY,
            "answers": ["empty the crumb tray"],
            "doc_ids": ["toaster_spec", "toaster_guide"],
            "kind": "multi_hop",
            "doc_status": "unseen",
        },
        {
            "id": "q4",
            "question": "What is the warranty of the Quasar Q1 blender?",
            "answers": [],
            "doc_ids": [],
            "kind": "unanswerable",
            "doc_status": "seen",
        },
    ]
    write_jsonl(project / "data/split/questions_test.jsonl", questions)
    shutil.copytree(tiny_checkpoint, project / "models/base")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    adapter.save_pretrained(project / "models/adapter")
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(project / "models/adapter")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["index"]["collection"] = "chunks"
    params["rag_eval"].update(
        {
            "ks": [1, 2],
            "headline_k": 1,
            "noise_levels": [0, 1],
            "max_questions": 3,
            "base_sweeps": True,
            "max_new_tokens": 4,
            "bootstrap_samples": 100,
        }
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    monkeypatch.chdir(project)
    stage.main()

    metrics = json.loads((project / "metrics/rag.json").read_text(encoding="utf-8"))
    assert metrics["n_test_questions"] == 4 and metrics["n_answer_questions"] == 3
    test = metrics["retrieval"]["test"]
    assert test["hybrid"]["recall@1"] == 1.0 and test["dense"]["recall@1"] < 1.0 and test["hybrid"]["n"] == 3
    assert metrics["hybrid_minus_dense"]["test"]["recall@1"]["mean"] > 0
    assert set(metrics["answers"]) == {"base", "finetuned"}
    assert set(metrics["answers"]["finetuned"]["k"]) == {"1", "2"}
    assert set(metrics["answers"]["base"]["noise"]) == {"0", "1"}
    assert 0.0 <= metrics["injection"]["finetuned"]["mean"] <= 1.0 and metrics["injection"]["base"]["n"] == 3
    report = project / "reports/rag"
    for name in (
        "rag.md",
        "retrieval_recall.png",
        "answers_vs_k.png",
        "answers_vs_noise.png",
        "predictions.jsonl",
        "rag_config.json",
    ):
        assert (report / name).is_file(), name
    assert "Hybrid (dense + BM25, RRF) vs dense-only" in (report / "rag.md").read_text(encoding="utf-8")
