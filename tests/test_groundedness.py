"""Groundedness scoring on strings whose supported and unsupported claims are known."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from veritune.cli import main
from veritune.groundedness import Claim, extract_claims, is_supported, score_groundedness, score_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from groundedness_auroc import auroc  # noqa: E402

CONTEXTS = [
    "The Aurora K3 Kettle retails for $1,299. It weighs 2.4 kg and comes in Butter Yellow and Copper.",
    "Its SKU is LK-4821. If the display shows E4, descale the heating plate. Warranty: 24 months.",
    "It has been on the market since 2025-03-14. Standard delivery takes 5–7 business days.",
]
QUESTION = "How much is the Aurora K3 Kettle?"


@pytest.mark.parametrize(("answer", "expected"), [
    ("The Aurora K3 Kettle costs $1,299.50.", [("Aurora K3 Kettle", "entity"), ("$1,299.50", "number"), ("costs", "term")]),
    ("It weighs 2.4 kg.", [("2.4 kg", "number"), ("weighs", "term")]),
    ("Delivery takes 5–7 business days", [("5–7 business days", "number"), ("delivery", "term"), ("takes", "term")]),
    ("Covered for 24 months, 30% off", [("24 months", "number"), ("30%", "number"), ("covered", "term")]),
    ("Launched 2025-03-14, not 3 November 2024", [("2025-03-14", "date"), ("3 November 2024", "date"), ("launched", "term")]),
    ("Order SKU LK-4821; E4 means descale", [("LK-4821", "code"), ("E4", "code"), ("sku", "term"), ("order", "term"),
                                             ("means", "term"), ("descale", "term")]),
    ("It comes in Butter Yellow", [("Butter Yellow", "entity"), ("comes", "term")]),
    ("50 Larkspur Rewards points", [("Larkspur Rewards", "entity"), ("50", "number"), ("points", "term")]),
])
def test_extract_claims(answer, expected):
    assert sorted(extract_claims(answer), key=str) == sorted((Claim(t, k) for t, k in expected), key=str)


@pytest.mark.parametrize(("text", "kind", "supported"), [
    ("$1,299", "number", True),
    ("1299 dollars", "number", True),      # "$" and "dollars" are one unit; thousands separator ignored
    ("1,299", "number", True),             # a bare value matches whatever its unit
    ("$1,399", "number", False),           # swapped number
    ("1299 kg", "number", False),          # right value, wrong unit
    ("2.4 kilograms", "number", True),
    ("2.40 kg", "number", True),
    ("5–7 business days", "number", True),
    ("5–9 business days", "number", False),
    ("14 March 2025", "date", True),
    ("2025-03-15", "date", False),
    ("lk4821", "code", True),
    ("LK-4822", "code", False),
    ("E5", "code", False),
    ("Aurora K3 Kettle", "entity", True),
    ("Brio K3 Kettle", "entity", False),   # swapped entity
    ("Aurora Kettle", "entity", False),    # not the whole token sequence
    ("Display E4", "entity", True),        # common word capitalised at a sentence start
    ("descaling", "term", True),
    ("plates", "term", True),
    ("dishwasher", "term", False),
])
def test_is_supported(text, kind, supported):
    assert is_supported(Claim(text, kind), CONTEXTS) is supported


def test_grounded_and_unsupported_answers():
    good = score_groundedness(QUESTION, CONTEXTS, "The Aurora K3 Kettle retails for $1,299.")
    assert good == {"score": 1.0, "label": "grounded", "unsupported_claims": [], "n_claims": 3}
    bad = score_groundedness(QUESTION, CONTEXTS, "The Aurora K3 Kettle retails for $1,399.")
    assert bad["label"] == "unsupported"
    assert bad["unsupported_claims"] == [{"text": "$1,399", "kind": "number"}]
    assert bad["score"] == pytest.approx(1.25 / 2.25)  # entity 1 + term 0.25 of 2.25
    invented = score_groundedness(QUESTION, CONTEXTS, "$1,299, and it includes a free 5-year service plan")
    assert invented["score"] < 0.8


@pytest.mark.parametrize(("question", "contexts", "answer", "label"), [
    # differences and sums of like quantities, two or three of them
    ("Price difference?", ["The A costs $219.", "The B costs $149."], "$70", "grounded"),
    ("Price difference?", ["The A costs $219.", "The B costs $149."], "$80", "unsupported"),
    ("Together?", ["A: $219.", "B: $149.", "C: $99."], "$467", "grounded"),
    ("Together?", ["A: $219.", "B: $149.", "C: $99."], "$468", "unsupported"),
    ("Weight difference?", ["The A weighs 3.6 kg.", "The B is sold at $2."], "1.6 kg", "unsupported"),  # kg - $
    # a rate times an amount, a percentage off, a period after a date
    ("Points for the A?", ["Members earn 3 points for every $1 spent.", "The A costs $139."], "417 points", "grounded"),
    ("Points for the A?", ["Members earn 3 points for every $1 spent.", "The A costs $139."], "418 points", "unsupported"),
    ("Student price?", ["Students get 15 percent off.", "The A costs $299."], "$254.15", "grounded"),
    ("Student price?", ["Students get 15 percent off.", "The A costs $299."], "$254.00", "unsupported"),
    ("Bought on 2024-01-28: warranty until?", ["Warranty: 24 months."], "2026-01-28", "grounded"),
    ("Bought on 2024-01-28: warranty until?", ["Warranty: 24 months."], "2026-01-29", "unsupported"),
    ("Bought on 2026-03-09: return by?", ["Returns within 60 days."], "2026-05-08", "grounded"),
    ("With Care+, months of cover?", ["Warranty: 24 months.", "Care+ adds 2 years."], "48 months", "grounded"),
    ("With Care+, months of cover?", ["Warranty: 24 months.", "Care+ adds 2 years."], "36 months", "unsupported"),
])
def test_numbers_and_dates_one_arithmetic_step_from_the_sources(question, contexts, answer, label):
    """Multi-hop answers computed from stated quantities are supported; near misses are not."""
    assert score_groundedness(question, contexts, answer)["label"] == label


def test_question_counts_as_evidence_and_empty_answer_scores_one():
    assert score_groundedness("Is the Brio X5 Kettle red?", [], "The Brio X5 Kettle")["label"] == "grounded"
    assert score_groundedness(QUESTION, CONTEXTS, "...") == {
        "score": 1.0, "label": "grounded", "unsupported_claims": [], "n_claims": 0}


def test_abstention_is_labelled_abstained():
    assert score_groundedness(QUESTION, CONTEXTS, "The documents don't say.") == {
        "score": 1.0, "label": "abstained", "unsupported_claims": [], "n_claims": 0}


def test_score_records_accepts_string_and_object_contexts():
    records = [
        {"question": QUESTION, "contexts": CONTEXTS, "answer": "$1,299"},
        {"question": QUESTION, "contexts": [{"text": c, "score": 0.5} for c in CONTEXTS], "answer": "$1,299"},
    ]
    assert [r["label"] for r in score_records(records)] == ["grounded", "grounded"]


def test_score_records_names_the_bad_record():
    records = [{"id": "a1", "question": "q", "contexts": [], "answer": "x"}, {"id": "a2", "question": "q", "contexts": []}]
    with pytest.raises(ValueError, match=r"record 1 \(id 'a2'\): missing field 'answer'"):
        score_records(records)
    with pytest.raises(ValueError, match=r"record 0: contexts\[0\]"):
        score_records([{"question": "q", "contexts": [3], "answer": "x"}])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_cli_scores_a_file(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    _write(answers, [
        {"id": "1", "question": QUESTION, "contexts": CONTEXTS, "answer": "$1,299"},
        {"id": "2", "question": QUESTION, "contexts": CONTEXTS, "answer": "$999"},
        {"id": "3", "question": QUESTION, "contexts": CONTEXTS, "answer": "The documents don't say."},
    ])
    assert main(["score", str(answers)]) == 0
    scored = [json.loads(line) for line in (tmp_path / "answers.scored.jsonl").read_text().splitlines()]
    assert [r["id"] for r in scored] == ["1", "2", "3"]
    assert [r["groundedness"]["label"] for r in scored] == ["grounded", "unsupported", "abstained"]
    assert "scored 3 answers" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["score", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such answers file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    _write(bad, [{"id": "x9", "question": "q", "answer": "a"}])
    assert main(["score", str(bad), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "id 'x9'" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_entry_point(tmp_path):
    answers = tmp_path / "a.jsonl"
    _write(answers, [{"question": QUESTION, "contexts": CONTEXTS, "answer": "It weighs 2.4 kg."}])
    out = tmp_path / "scored.jsonl"
    done = subprocess.run([str(REPO / ".venv/bin/veritune"), "score", str(answers), "-o", str(out), "--threshold", "0.9"],
                          capture_output=True, text=True, check=True)
    assert "grounded 100.0%" in done.stderr
    assert json.loads(out.read_text())["groundedness"]["score"] == 1.0


def test_auroc_on_hand_made_records():
    gold = ["$1,299", "It weighs 2.4 kg.", "Aurora K3 Kettle", "24 months", "LK-4821"]
    wrong = ["$1,499", "It weighs 3.1 kg.", "Brio X5 Kettle", "36 months", "LK-9999"]
    positives = [score_groundedness(QUESTION, CONTEXTS, a)["score"] for a in gold]
    negatives = [score_groundedness(QUESTION, CONTEXTS, a)["score"] for a in wrong]
    assert auroc(positives, negatives) == 1.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5   # ties count half
    assert auroc([0.2], [0.9]) == 0.0
