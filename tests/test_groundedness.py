"""Groundedness scoring on strings whose supported and unsupported claims are known."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from veritune.cli import main
from veritune.eval.claims import Claim, extract_claims
from veritune.eval.groundedness import is_supported, score_groundedness, score_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from groundedness_auroc import auroc  # noqa: E402

CONTEXTS = [
    "The Aurora K3 Kettle retails for $1,299. It weighs 2.4 kg and comes in Butter Yellow and Copper.",
    "Its SKU is LK-4821. If the display shows E4, descale the heating plate. Warranty: 24 months.",
    "It has been on the market since 2025-03-14. Standard delivery takes 5–7 business days.",
]
QUESTION = "How much is the Aurora K3 Kettle?"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            "The Aurora K3 Kettle costs $1,299.50.",
            [("Aurora K3 Kettle", "entity"), ("$1,299.50", "number"), ("costs", "term")],
        ),
        ("It weighs 2.4 kg.", [("2.4 kg", "number"), ("weighs", "term")]),
        (
            "Delivery takes 5–7 business days",
            [("5–7 business days", "number"), ("delivery", "term"), ("takes", "term")],
        ),
        ("Covered for 24 months, 30% off", [("24 months", "number"), ("30%", "number"), ("covered", "term")]),
        (
            "Launched 2025-03-14, not 3 November 2024",
            [("2025-03-14", "date"), ("3 November 2024", "date"), ("launched", "term")],
        ),
        (
            "Order SKU LK-4821; E4 means descale",
            [
                ("LK-4821", "code"),
                ("E4", "code"),
                ("sku", "term"),
                ("order", "term"),
                ("means", "term"),
                ("descale", "term"),
            ],
        ),
        ("It comes in Butter Yellow", [("Butter Yellow", "entity"), ("comes", "term")]),
        ("50 Larkspur Rewards points", [("Larkspur Rewards", "entity"), ("50", "number"), ("points", "term")]),
    ],
)
def test_extract_claims(answer, expected):
    assert sorted(extract_claims(answer), key=str) == sorted((Claim(t, k) for t, k in expected), key=str)


@pytest.mark.parametrize(
    ("text", "kind", "supported"),
    [
        ("$1,299", "number", True),
        ("1299 dollars", "number", True),  # "$" and "dollars" are one unit; thousands separator ignored
        ("1,299", "number", True),  # a bare value matches whatever its unit
        ("$1,399", "number", False),  # swapped number
        ("1299 kg", "number", False),  # right value, wrong unit
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
        ("Brio K3 Kettle", "entity", False),  # swapped entity
        ("Aurora Kettle", "entity", False),  # not the whole token sequence
        ("Display E4", "entity", True),  # common word capitalised at a sentence start
        ("descaling", "term", True),
        ("plates", "term", True),
        ("dishwasher", "term", False),
    ],
)
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


@pytest.mark.parametrize(
    ("question", "contexts", "answer", "label"),
    [
        # differences and sums of like quantities, two or three of them
        ("Price difference?", ["The A costs $219.", "The B costs $149."], "$70", "grounded"),
        ("Price difference?", ["The A costs $219.", "The B costs $149."], "$80", "unsupported"),
        ("Together?", ["A: $219.", "B: $149.", "C: $99."], "$467", "grounded"),
        ("Together?", ["A: $219.", "B: $149.", "C: $99."], "$468", "unsupported"),
        ("Weight difference?", ["The A weighs 3.6 kg.", "The B is sold at $2."], "1.6 kg", "unsupported"),  # kg - $
        # a rate times an amount, a percentage off, a period after a date
        (
            "Points for the A?",
            ["Members earn 3 points for every $1 spent.", "The A costs $139."],
            "417 points",
            "grounded",
        ),
        (
            "Points for the A?",
            ["Members earn 3 points for every $1 spent.", "The A costs $139."],
            "418 points",
            "unsupported",
        ),
        ("Student price?", ["Students get 15 percent off.", "The A costs $299."], "$254.15", "grounded"),
        ("Student price?", ["Students get 15 percent off.", "The A costs $299."], "$254.00", "unsupported"),
        ("Bought on 2024-01-28: warranty until?", ["Warranty: 24 months."], "2026-01-28", "grounded"),
        ("Bought on 2024-01-28: warranty until?", ["Warranty: 24 months."], "2026-01-29", "unsupported"),
        ("Bought on 2026-03-09: return by?", ["Returns within 60 days."], "2026-05-08", "grounded"),
        ("With Care+, months of cover?", ["Warranty: 24 months.", "Care+ adds 2 years."], "48 months", "grounded"),
        ("With Care+, months of cover?", ["Warranty: 24 months.", "Care+ adds 2 years."], "36 months", "unsupported"),
    ],
)
def test_numbers_and_dates_one_arithmetic_step_from_the_sources(question, contexts, answer, label):
    """Multi-hop answers computed from stated quantities are supported; near misses are not."""
    assert score_groundedness(question, contexts, answer)["label"] == label


KETTLE = "The X1 Kettle costs $219. Warranty: 2 years. Ships in 3 days. Holds 1.5 litres."
TOASTER = "The Z9 Toaster costs $149 and holds 2 slices."
RETURNS = "Returns are accepted within 60 days of purchase."
OTHER_WARRANTY = "The Q7 Blender has a warranty of 24 months."
BOUGHT = "I bought the X1 Kettle on 2024-01-28. What is the last day to return it?"

# The labelled near-miss set: for every derivation rule a correct answer and wrong twins (wrong
# unit, irrelevant operand, off by one step); then hedged claims and invented entities.
NEAR_MISSES = [
    # the products of unrelated stated numbers (issue 14): 219 x 3 days, 1.5 x 2 years, 2 x 3
    ("How much does the X1 Kettle cost?", [KETTLE], "It costs $657.", "unsupported"),
    ("How much does the X1 Kettle hold?", [KETTLE], "It holds 3 litres.", "unsupported"),
    ("How long is the X1 Kettle's warranty?", [KETTLE], "6 years.", "unsupported"),
    ("", [KETTLE], "It costs $657.", "unsupported"),  # no question: still only unit-consistent steps
    # sum of two like quantities
    ("What do the X1 Kettle and the Z9 Toaster cost together?", [KETTLE, TOASTER], "$368", "grounded"),
    ("What do the X1 Kettle and the Z9 Toaster cost together?", [KETTLE, TOASTER], "368 litres", "unsupported"),
    ("What do the X1 Kettle and the Z9 Toaster cost together?", [KETTLE, TOASTER], "$222", "unsupported"),  # + 3 days
    (
        "What do the X1 Kettle and the Z9 Toaster cost together?",
        [KETTLE, TOASTER],
        "$587",
        "unsupported",
    ),  # + 219 again
    ("How much does the X1 Kettle cost?", [KETTLE, TOASTER], "$368", "unsupported"),  # no total asked for
    # sum of three
    ("What do A, B and C cost together?", ["A: $219.", "B: $149.", "C: $99. Ships in 3 days."], "$467", "grounded"),
    (
        "What do A, B and C cost together?",
        ["A: $219.", "B: $149.", "C: $99. Ships in 3 days."],
        "467 days",
        "unsupported",
    ),
    ("What do A, B and C cost together?", ["A: $219.", "B: $149.", "C: $99. Ships in 3 days."], "$371", "unsupported"),
    ("What do A, B and C cost together?", ["A: $219.", "B: $149.", "C: $99. Ships in 3 days."], "$566", "unsupported"),
    # difference of two
    ("How much more does the X1 Kettle cost than the Z9 Toaster?", [KETTLE, TOASTER], "$70", "grounded"),
    ("How much more does the X1 Kettle cost than the Z9 Toaster?", [KETTLE, TOASTER], "70 litres", "unsupported"),
    (
        "How much more does the X1 Kettle cost than the Z9 Toaster?",
        [KETTLE, TOASTER],
        "$216",
        "unsupported",
    ),  # - 3 days
    ("How much more does the X1 Kettle cost than the Z9 Toaster?", [KETTLE, TOASTER], "$71", "unsupported"),
    ("How much does the Z9 Toaster cost?", [KETTLE, TOASTER], "$70", "unsupported"),  # no difference asked for
    # like periods summed across units (years counted in months)
    (
        "With Care+, how many months of cover in total?",
        ["Warranty: 24 months.", "Care+ adds 2 years."],
        "48 months",
        "grounded",
    ),
    (
        "With Care+, how many months of cover in total?",
        ["Warranty: 24 months.", "Care+ adds 2 years."],
        "48 years",
        "unsupported",
    ),
    (
        "With Care+, how many months of cover in total?",
        ["Warranty: 24 months.", "Care+ adds 2 years."],
        "26 months",
        "unsupported",
    ),
    (
        "With Care+, how many months of cover in total?",
        ["Warranty: 24 months.", "Care+ adds 2 years."],
        "72 months",
        "unsupported",
    ),
    # a quantity times a rate per that quantity's unit
    (
        "How many points does the X1 Kettle earn?",
        ["Members earn 3 points for every $1 spent.", KETTLE],
        "657 points",
        "grounded",
    ),
    (
        "How many points does the X1 Kettle earn?",
        ["Members earn 3 points for every $1 spent.", KETTLE],
        "$657",
        "unsupported",
    ),
    (
        "How many points does the X1 Kettle earn?",
        ["Members earn 3 points for every $1 spent.", KETTLE],
        "9 points",
        "unsupported",
    ),
    (
        "How many dollars of reward does the X1 Kettle earn?",
        ["Members earn 3 points for every $1 spent.", "Every 100 points can be redeemed for a $5 reward.", KETTLE],
        "$32.85",
        "unsupported",
    ),  # 657 points -> $: two steps, not one
    ("What reward do 300 points buy?", ["Every 100 points can be redeemed for a $5 reward."], "$15", "grounded"),
    # a percentage off a price
    ("What is the student price of the X1 Kettle?", ["Students get 15 percent off.", KETTLE], "$186.15", "grounded"),
    (
        "What is the student price of the X1 Kettle?",
        ["Students get 15 percent off.", KETTLE],
        "186.15 litres",
        "unsupported",
    ),
    (
        "What is the student price of the X1 Kettle?",
        ["Students get 15 percent off.", KETTLE],
        "1.28 litres",
        "unsupported",
    ),
    ("What is the student price of the X1 Kettle?", ["Students get 15 percent off.", KETTLE], "$158.23", "unsupported"),
    # a count the question states times a price
    ("What do two X1 Kettles cost?", [KETTLE], "$438", "grounded"),
    ("What do two X1 Kettles cost?", [KETTLE], "438 litres", "unsupported"),
    ("What do two X1 Kettles cost?", [KETTLE], "$221", "unsupported"),
    ("What do two X1 Kettles cost?", [KETTLE], "$657", "unsupported"),
    # a date plus a period
    (BOUGHT, [RETURNS, OTHER_WARRANTY], "2024-03-28", "grounded"),
    (BOUGHT, [RETURNS, OTHER_WARRANTY], "2025-03-23", "unsupported"),  # 60 weeks
    (BOUGHT, [RETURNS, OTHER_WARRANTY], "2026-01-28", "unsupported"),  # the other product's warranty
    (BOUGHT, [RETURNS, OTHER_WARRANTY], "2024-03-29", "unsupported"),
    # hedged claims: a refusal around an invented fact is an unsupported answer
    ("How much is the X1 Kettle?", [KETTLE], "The documents do not say, but it costs $999.", "unsupported"),
    (
        "How much is the X1 Kettle?",
        [KETTLE],
        "I cannot find that in the documents; it probably ships in 5 days.",
        "unsupported",
    ),
    ("Is the Z9 dishwasher safe?", [KETTLE], "The documents don't say, though it is made in Portugal.", "unsupported"),
    ("How much is the Z9 Toaster?", [KETTLE], "The documents don't say.", "abstained"),
    (
        "How much is the Z9 Toaster?",
        [KETTLE],
        "Sorry, the documents don't mention the Z9 Toaster's price. Anything else I can help with?",
        "abstained",
    ),
    (
        "How much is the Z9 Toaster?",
        [KETTLE],
        "The documents don't say; they only cover the X1 Kettle at $219.",
        "abstained",
    ),
    # invented entities
    ("What colours does the X1 Kettle come in?", [KETTLE], "The X1 Kettle comes in Midnight Blue.", "unsupported"),
    ("How much is the X1 Kettle?", [KETTLE], "The Aurora X1 Kettle costs $219.", "unsupported"),
    ("Who makes the X1 Kettle?", [KETTLE], "Larkspur Appliances makes the X1 Kettle.", "unsupported"),
    ("How much is the X1 Kettle?", [KETTLE], "The X1 Kettle costs $219.", "grounded"),
]


@pytest.mark.parametrize(
    ("question", "contexts", "answer", "label"),
    NEAR_MISSES,
    ids=[f"{i}:{a[:30]}" for i, (_, _, a, _) in enumerate(NEAR_MISSES)],
)
def test_near_miss_set_is_labelled_right(question, contexts, answer, label):
    """Right answers one unit-consistent step from the sources are grounded; their twins with
    a wrong unit, an irrelevant operand or one step off are not, and neither is a hedge
    around an invented fact or an invented name."""
    assert score_groundedness(question, contexts, answer)["label"] == label


def test_question_counts_as_evidence_and_empty_answer_scores_one():
    assert score_groundedness("Is the Brio X5 Kettle red?", [], "The Brio X5 Kettle")["label"] == "grounded"
    assert score_groundedness(QUESTION, CONTEXTS, "...") == {
        "score": 1.0,
        "label": "grounded",
        "unsupported_claims": [],
        "n_claims": 0,
    }


def test_abstention_is_labelled_abstained():
    assert score_groundedness(QUESTION, CONTEXTS, "The documents don't say.") == {
        "score": 1.0,
        "label": "abstained",
        "unsupported_claims": [],
        "n_claims": 0,
    }


def test_score_records_accepts_string_and_object_contexts():
    records = [
        {"question": QUESTION, "contexts": CONTEXTS, "answer": "$1,299"},
        {"question": QUESTION, "contexts": [{"text": c, "score": 0.5} for c in CONTEXTS], "answer": "$1,299"},
    ]
    assert [r["label"] for r in score_records(records)] == ["grounded", "grounded"]


def test_score_records_names_the_bad_record():
    records = [
        {"id": "a1", "question": "q", "contexts": [], "answer": "x"},
        {"id": "a2", "question": "q", "contexts": []},
    ]
    with pytest.raises(ValueError, match=r"record 1 \(id 'a2'\): missing field 'answer'"):
        score_records(records)
    with pytest.raises(ValueError, match=r"record 0: contexts\[0\]"):
        score_records([{"question": "q", "contexts": [3], "answer": "x"}])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_cli_scores_a_file(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    _write(
        answers,
        [
            {"id": "1", "question": QUESTION, "contexts": CONTEXTS, "answer": "$1,299"},
            {"id": "2", "question": QUESTION, "contexts": CONTEXTS, "answer": "$999"},
            {"id": "3", "question": QUESTION, "contexts": CONTEXTS, "answer": "The documents don't say."},
        ],
    )
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
    done = subprocess.run(
        [str(REPO / ".venv/bin/veritune"), "score", str(answers), "-o", str(out), "--threshold", "0.9"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "grounded 100.0%" in done.stderr
    assert json.loads(out.read_text())["groundedness"]["score"] == 1.0


def test_auroc_on_hand_made_records():
    gold = ["$1,299", "It weighs 2.4 kg.", "Aurora K3 Kettle", "24 months", "LK-4821"]
    wrong = ["$1,499", "It weighs 3.1 kg.", "Brio X5 Kettle", "36 months", "LK-9999"]
    positives = [score_groundedness(QUESTION, CONTEXTS, a)["score"] for a in gold]
    negatives = [score_groundedness(QUESTION, CONTEXTS, a)["score"] for a in wrong]
    assert auroc(positives, negatives) == 1.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert auroc([0.2], [0.9]) == 0.0
