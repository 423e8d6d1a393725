"""Answer metrics on cases whose right value is known."""

import random

import pytest

from veritune.eval.evaluation import score_all, summarize_scores
from veritune.eval.scoring import bootstrap_ci, exact_match, is_abstention, normalize_answer, numeric_match, token_f1

QUESTIONS = [
    {"id": "q1", "kind": "single_hop", "answers": ["$149"], "doc_status": "seen"},
    {"id": "q2", "kind": "single_hop", "answers": ["24 months", "2 years"], "doc_status": "unseen"},
    {"id": "q3", "kind": "multi_hop", "answers": ["Aurora K3 Kettle"], "doc_status": "unseen"},
    {"id": "q4", "kind": "multi_hop", "answers": ["2027-09-18"], "doc_status": "seen"},
    {"id": "q5", "kind": "unanswerable", "answers": [], "doc_status": "seen"},
    {"id": "q6", "kind": "unanswerable", "answers": [], "doc_status": "unseen"},
]


def test_normalize_follows_squad():
    assert normalize_answer("The  $149.") == "149"
    assert normalize_answer("An Aurora, K3!") == "aurora k3"


@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("$149", ["$149"], 1.0, 1.0),
        ("149.", ["$149"], 1.0, 1.0),
        ("24 months", ["2 years", "24 months"], 1.0, 1.0),
        ("about 24 months", ["24 months"], 0.0, 0.8),
        ("Aurora K3", ["Aurora K3 Kettle"], 0.0, 0.8),
        ("Zephyr", ["Aurora K3 Kettle"], 0.0, 0.0),
    ],
)
def test_exact_match_and_f1(prediction, golds, em, f1):
    assert exact_match(prediction, golds) == em
    assert token_f1(prediction, golds) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The documents don't say.", True),
        ("The documents do not say.", True),
        ("The context doesn\u2019t mention it", True),
        ("I cannot find that in the documents.", True),
        ("Not stated.", True),
        ("$149", False),
        ("24 months", False),
        ("", False),  # silence is not an explicit abstention
    ],
)
def test_abstention_detector(text, expected):
    assert is_abstention(text) is expected


def test_numeric_match():
    assert numeric_match("It costs $1,299.50 now", ["$1,299.50"]) == 1.0
    assert numeric_match("6.5 kg", ["6.4 kg"]) == 0.0
    assert numeric_match("anything", ["Aurora K3 Kettle"]) is None


def _answer(question, how, rng):
    if how == "oracle":
        return question["answers"][0] if question["answers"] else "The documents don't say."
    if how == "abstain":
        return "The documents don't say."
    return " ".join(rng.choice(["blue", "quartz", "Monday", "7", "lantern"]) for _ in range(3))


def test_oracle_answerer_scores_one():
    rng = random.Random(0)
    s = summarize_scores(QUESTIONS, score_all([_answer(q, "oracle", rng) for q in QUESTIONS], QUESTIONS), 100)
    assert s["answerable"]["em"] == 1.0 and s["answerable"]["f1"] == 1.0
    assert s["unanswerable"]["abstention"] == 1.0
    assert s["answerable"]["abstention"] == 0.0
    assert s["answerable_unseen"]["n"] == 2 and s["answerable_seen"]["n"] == 2


def test_always_abstain_scores_zero_accuracy_full_abstention():
    rng = random.Random(0)
    s = summarize_scores(QUESTIONS, score_all([_answer(q, "abstain", rng) for q in QUESTIONS], QUESTIONS), 100)
    assert s["answerable"]["f1"] == 0.0 and s["answerable"]["em"] == 0.0
    assert s["unanswerable"]["abstention"] == 1.0
    assert s["answerable"]["abstention"] == 1.0


def test_random_answerer_scores_near_zero():
    rng = random.Random(0)
    s = summarize_scores(QUESTIONS, score_all([_answer(q, "random", rng) for q in QUESTIONS], QUESTIONS), 100)
    assert s["answerable"]["f1"] < 0.1
    assert s["unanswerable"]["abstention"] == 0.0


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values, 500)
    assert lo < 0.3 < hi
    assert 0.15 < lo and hi < 0.45


def test_unsupported_claims_are_counted_against_the_passages():
    questions = [{**q, "question": "What does it cost and how long is it covered?"} for q in QUESTIONS[:2]]
    passages = [[{"text": "The Aurora K3 Kettle retails for $149."}], [{"text": "It is covered for 24 months."}]]
    s = summarize_scores(questions, score_all(["$149", "36 months"], questions, passages), 100)
    assert s["all"]["unsupported_rate"] == 0.5
    s = summarize_scores(questions, score_all(["$149", "24 months"], questions, passages), 100)
    assert s["all"]["unsupported_rate"] == 0.0
