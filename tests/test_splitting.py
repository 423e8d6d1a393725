"""The split is by document, deterministic, and no question crosses splits."""

import pytest

from veritune.core.config import SplitParams
from veritune.data.splitting import SplitLeakError, assign_documents, assign_questions, check_no_leak, split_summary


def _corpus(n_docs=40):
    documents = [{"id": f"doc-{i:03d}", "title": f"T{i}", "text": "x" * 30} for i in range(n_docs)]
    questions = []
    for i in range(n_docs):
        for j in range(3):
            questions.append(
                {"id": f"q-{i:03d}-{j}", "doc_ids": [f"doc-{i:03d}"], "answers": ["a"], "kind": "single_hop"}
            )
    for i in range(0, n_docs - 1, 2):
        questions.append(
            {
                "id": f"q-mh-{i:03d}",
                "doc_ids": [f"doc-{i:03d}", f"doc-{i + 1:03d}"],
                "answers": ["a"],
                "kind": "multi_hop",
            }
        )
    # A hub document every policy question cites: it must stay in training.
    documents.append({"id": "doc-hub", "title": "Returns", "text": "y" * 30})
    questions += [
        {"id": f"q-hub-{i}", "doc_ids": ["doc-hub", f"doc-{i:03d}"], "answers": ["a"], "kind": "multi_hop"}
        for i in range(n_docs)
    ]
    questions += [{"id": f"q-un-{i}", "doc_ids": [], "answers": [], "kind": "unanswerable"} for i in range(10)]
    return documents, questions


P = SplitParams(
    seed=0, unseen_test_doc_fraction=0.2, unseen_val_doc_fraction=0.1, seen_test_fraction=0.1, seen_val_fraction=0.1
)


def test_split_holds_out_documents_and_never_leaks():
    documents, questions = _corpus()
    doc_split = assign_documents(documents, questions, P)
    split_questions = assign_questions(questions, doc_split, P)
    check_no_leak(split_questions, doc_split)
    assert doc_split["doc-hub"] == "train"
    assert sum(v == "test" for v in doc_split.values()) == round(0.2 * len(documents))
    train_docs = {d for q in split_questions["train"] for d in q["doc_ids"]}
    assert all(doc_split[d] == "train" for d in train_docs)
    statuses = {q["doc_status"] for q in split_questions["test"]}
    assert statuses == {"seen", "unseen"}, "test must measure both domain knowledge and grounding"
    ids = [q["id"] for qs in split_questions.values() for q in qs]
    assert sorted(ids) == sorted(q["id"] for q in questions)
    summary = split_summary(split_questions, doc_split)
    assert summary["n_questions_train_unseen"] == 0


def test_split_is_deterministic_and_seeded():
    documents, questions = _corpus()
    a = assign_documents(documents, questions, P)
    assert a == assign_documents(documents, questions, P)
    other = assign_documents(documents, questions, SplitParams(**{**P.__dict__, "seed": 1}))
    assert a != other


def test_leak_check_catches_crossing_questions():
    documents, questions = _corpus()
    doc_split = assign_documents(documents, questions, P)
    split_questions = assign_questions(questions, doc_split, P)
    held = next(d for d, s in doc_split.items() if s == "test")
    split_questions["train"].append(
        {"id": "q-leak", "doc_ids": [held], "answers": ["a"], "kind": "single_hop", "doc_status": "seen"}
    )
    with pytest.raises(SplitLeakError, match="q-leak"):
        check_no_leak(split_questions, doc_split)
    split_questions["train"].pop()
    split_questions["val"].append(split_questions["test"][0])
    with pytest.raises(SplitLeakError, match="in both"):
        check_no_leak(split_questions, doc_split)
