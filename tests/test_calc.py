"""Calculator spans in replies (`veritune.infer.calc`), the training targets built from the
questions' `calculation` field, and entity-aware search on a real Milvus Lite index."""

import json
import re
from pathlib import Path

import pytest

from veritune.data.sft import target_answer
from veritune.infer.calc import CalcError, evaluate, finish, resolve, stable_prefix
from veritune.retrieval.chunking import chunk_document
from veritune.retrieval.embedding import load_embedder
from veritune.retrieval.index import build_index
from veritune.retrieval.search import Retriever

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "expression, result",
    [
        ("$299 + $219 + $299", "$817"),
        ("$69 + $14.95", "$83.95"),
        ("$219 * (100% - 15%)", "$186.15"),
        ("5.2 kg + 6.9 kg", "12.1 kg"),
        ("5.0 kg - 4.1 kg", "0.9 kg"),  # float noise rounded away, not 0.8999999
        ("$209 * 3 points", "627 points"),  # the last unit word names the result
        ("24 months + 24 months", "48 months"),
        ("2025-07-12 + 14 days", "2025-07-26"),
        ("2026-02-24 + 36 months", "2029-02-24"),
        ("2024-02-29 + 1 year", None),  # 29 February 2025 does not exist: an error, not a guess
        ("2025-01-10 - 2 weeks", "2024-12-27"),
        ("(2025-07-12 + 12 months)", "2025-07-12".replace("2025", "2026")),
        ("1500 W - 1200 W", "300 W"),
        ("$10 - $25.5", "-$15.50"),
        ("$1.005 + 0", "$1.01"),  # half up, not the float's half-even
        ("1234567.891", "1234567.89"),  # no exponent
    ],
)
def test_evaluate(expression, result):
    if result is None:
        with pytest.raises(CalcError, match="does not exist"):
            evaluate(expression)
    else:
        assert evaluate(expression) == result


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "2 ** 10",
        "1 / 0",
        "x" * 201,
        "$5 +",
        "_d0 + 1",
        "2 years + 6 months",  # mixed units would be added as if they were one
        "5.2 kg + 300 g",
        "2025-07-12 + 1 month + 2 days",  # a date shift is one "date + N unit"
    ],
)
def test_evaluate_refuses_what_is_not_arithmetic(expression):
    with pytest.raises(CalcError):
        evaluate(expression)


def test_resolve_replaces_spans_and_keeps_a_broken_one_as_its_expression():
    assert resolve("The total is <calc>$10 + $5</calc>.") == "The total is $15."
    assert resolve("<calc>1 / 0</calc>") == "1 / 0"  # never a made-up number
    assert resolve("no spans here") == "no spans here"
    assert resolve("<calc>1 + 2</calc> and <calc>2 * 3 W</calc>") == "3 and 6 W"


def test_finish_never_shows_markup():
    assert finish("Total: <calc>$10 + $5") == "Total: $10 + $5"  # cut off at the token limit
    assert finish("Use <calc> tags like <calc>1+1</calc> here") == "Use tags like 2 here"
    assert resolve("Use <calc> tags like <calc>1+1</calc> here") == "Use <calc> tags like 2 here"


def test_streamed_text_is_a_prefix_of_the_finished_reply():
    # what streaming sends at each token is stable_prefix's released part: it must never
    # change once sent, and the finished reply must extend it
    reply = "It costs <calc>$299 + $219</calc> in total, <calc>2025-07-12 + 14 days</calc> at the latest <calc>1 +"
    final = finish(reply)
    sent = ""
    for end in range(len(reply) + 1):
        text, stable = stable_prefix(reply[:end])
        released = text[: max(len(sent), stable)]
        assert released.startswith(sent) and final.startswith(released)
        sent = released
    assert final == "It costs $518 in total, 2025-07-26 at the latest 1 +"


def test_stable_prefix_holds_back_an_open_span():
    assert stable_prefix("Total: <calc>$10 + ") == ("Total: <calc>$10 + ", len("Total: "))
    assert stable_prefix("Total: <ca") == ("Total: <ca", len("Total: "))  # may become <calc>
    assert stable_prefix("Total: <calc>$10 + $5</calc>") == ("Total: $15", len("Total: $15"))
    assert stable_prefix("a < b") == ("a < b", 5)


def test_target_answer_writes_the_calculation_and_checks_it():
    q = {"id": "q-1", "answers": ["$817", "817 dollars"], "calculation": "$299 + $219 + $299"}
    assert target_answer(q) == "<calc>$299 + $219 + $299</calc>"
    assert target_answer({"id": "q-2", "answers": ["Matte Black"]}) == "Matte Black"
    with pytest.raises(ValueError, match=r"q-3: field 'calculation' '\$299 \+ \$219' evaluates to '\$518'"):
        target_answer({"id": "q-3", "answers": ["$817"], "calculation": "$299 + $219"})


def test_every_sample_calculation_evaluates_to_its_answer_from_figures_in_its_documents():
    docs = {}
    for line in (REPO / "data/raw/documents.jsonl").read_text().splitlines():
        d = json.loads(line)
        docs[d["id"]] = d["text"]
    calculations = 0
    for line in (REPO / "data/raw/questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        if "calculation" not in q:
            continue
        calculations += 1
        assert target_answer(q).startswith("<calc>")  # raises if it evaluates to another answer
        shown = " ".join(docs[d] for d in q["doc_ids"]) + " " + q["question"]
        for figure in re.findall(r"\$?\d[\d.:-]*\d|\$?\d", q["calculation"]):
            if figure != "100":  # 100% - discount
                assert re.search(r"(?<![\d.$])" + re.escape(figure) + r"(?!\d|\.\d)", shown), (q["id"], figure)
    assert calculations >= 150


# --------------------------------------------------------------------------- entity-aware search

DOCS = [
    {"id": "a_spec", "title": "Orca Kettle — Specifications", "product": "Orca Kettle",
     "text": "The Orca Kettle weighs 1.2 kg, costs $49 and is listed under SKU QX-4410."},
    {"id": "a_guide", "title": "Orca Kettle — Quick Start Guide", "product": "Orca Kettle",
     "text": "If the Orca Kettle shows E3, descale it and refill it to the line."},
    {"id": "b_spec", "title": "Orca Kettle Pro — Specifications", "product": "Orca Kettle Pro",
     "text": "The Orca Kettle Pro weighs 1.4 kg, costs $69 and is listed under SKU QX-4420."},
    {"id": "b_guide", "title": "Orca Kettle Pro — Quick Start Guide", "product": "Orca Kettle Pro",
     "text": "If the Orca Kettle Pro shows E3, check that the lid is closed."},
    {"id": "c_spec", "title": "Lumo Toaster — Specifications", "product": "Lumo Toaster",
     "text": "The Lumo Toaster weighs 2.1 kg and costs $39. It has four slots."},
    {"id": "returns", "title": "Returns", "product": None,
     "text": "Kettles and toasters may be returned within 30 days of purchase."},
]  # fmt: skip


@pytest.fixture(scope="module")
def entity_index(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("entities") / "milvus.db")
    chunks = [c for d in DOCS for c in chunk_document(d, chunk_words=120, overlap_words=20, entity_field="product")]
    build_index(chunks, uri, "chunks", load_embedder("all-MiniLM-L6-v2"), batch_size=4)
    return uri


def test_named_entities_prefer_the_longest_name_and_resolve_identifiers(entity_index):
    with Retriever(entity_index, "chunks", "all-MiniLM-L6-v2", mode="hybrid", entity_search=True) as r:
        assert r.named_entities("Is the Orca Kettle Pro heavier than the Lumo Toaster?") == [
            "Orca Kettle Pro",
            "Lumo Toaster",
        ]
        assert r.named_entities("What does E3 mean on SKU QX-4410?") == ["Orca Kettle"]
        assert r.named_entities("what does e3 mean on sku qx-4410?") == ["Orca Kettle"]
        assert r.named_entities("Is the Orca Kettle Pro heavier than the Orca Kettle?") == [
            "Orca Kettle Pro",
            "Orca Kettle",
        ]
        assert r.named_entities("How do returns work?") == []
        assert r._entity_plan("Can I return the Lumo Toaster within 30-day of a 2-in-1 deal?") == []


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_entity_search_shows_each_named_product(entity_index, mode):
    question = "Which costs more, the Orca Kettle Pro or the Lumo Toaster?"
    with Retriever(entity_index, "chunks", "all-MiniLM-L6-v2", mode=mode, entity_search=True) as r:
        hits = r.search([question], k=2)[0]
        bridge = r.search(["My appliance with SKU QX-4410 shows E3. What should I do?"], k=2)[0]
        single = r.search(["What does the Lumo Toaster weigh?"], k=2)[0]
    with Retriever(entity_index, "chunks", "all-MiniLM-L6-v2", mode=mode) as plain:
        assert plain.entities == {}
        single_plain = plain.search(["What does the Lumo Toaster weigh?"], k=2)[0]
    assert {h.doc_id for h in hits} == {"b_spec", "c_spec"}
    assert "a_guide" in {h.doc_id for h in bridge}  # the guide of the product behind the SKU
    assert [h.doc_id for h in single] == [h.doc_id for h in single_plain]  # one product: searched as before


def test_entity_search_is_a_no_op_on_an_index_without_entities(tmp_path):
    uri = str(tmp_path / "milvus.db")
    chunks = [{k: v for k, v in c.items() if k != "entity"} for d in DOCS for c in chunk_document(d, 120, 20)]
    build_index(chunks, uri, "chunks", load_embedder("all-MiniLM-L6-v2"), batch_size=4)
    question = "Which costs more, the Orca Kettle Pro or the Lumo Toaster?"
    with Retriever(uri, "chunks", "all-MiniLM-L6-v2", mode="hybrid", entity_search=True) as r:
        assert r.entities == {}  # built without entity_field: every entity is ""
        on = r.search([question], k=2)[0]
    with Retriever(uri, "chunks", "all-MiniLM-L6-v2", mode="hybrid") as r:
        assert on == r.search([question], k=2)[0]
