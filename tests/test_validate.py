"""The validate stage on tiny raw files: a valid corpus passes, each kind of bad record is
reported by file, id and field, and a failed run writes nothing. Real Great Expectations."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stages.validate as stage
from stages.validate import main
from veritune.core.params import ValidateParams
from veritune.data.records import Failure, find_card_number, format_failures, luhn_valid, read_raw
from veritune.data.validation import validate

PARAMS_YAML = "validate: {min_text_chars: 20, max_text_chars: 20000, max_question_chars: 1000}\n"
PARAMS = ValidateParams(min_text_chars=20, max_text_chars=20000, max_question_chars=1000)
OUTPUTS = (
    "data/validated/documents.jsonl",
    "data/validated/questions.jsonl",
    "metrics/validate.json",
    "reports/validation.json",
)

# Product data of the kind the real corpus is full of; none of it is personal data.
DOCUMENTS = [
    {
        "id": "doc-0001",
        "title": "Juniper T6 Kettle — Specifications",
        "text": "The Juniper T6 Kettle retails for $1,299. Its SKU is LK-4821. It weighs 2.4 kg "
        "and holds 1.5 litres. Rated power: 2200 W.",
        "type": "spec_sheet",
    },
    {
        "id": "doc-0002",
        "title": "Juniper T6 Kettle — Quick Start Guide",
        "text": "If the display shows E4, unplug the base and let it cool. It has been on the market "
        "since 2025-03-14. Warranty: 24 months.",
    },
    {
        "id": "doc-0003",
        "title": "Shipping policy",
        "text": "Standard delivery takes 5–7 business days; express takes 1-2 days. Orders over $49.99 "
        "ship free. Version 2.1.0 of the app tracks parcels.",
    },
    {
        "id": "doc-0004",
        "title": "Brio X5 Kettle — Specifications",
        "text": "The Brio X5 Kettle is 23 x 18 x 25 cm, costs $119 and ships in 3 colours. Model no. 4821-300.",
    },
    {
        "id": "doc-0005",
        "title": "About Larkspur Appliances",
        "text": "Larkspur Appliances has made kitchen appliances since 1998, with 120 service centres.",
    },
]
QUESTIONS = [
    {
        "id": "q-0001",
        "question": "What is the SKU of the Juniper T6 Kettle?",
        "answers": ["LK-4821"],
        "doc_ids": ["doc-0001"],
        "kind": "single_hop",
        "template": 4,
    },
    {
        "id": "q-0002",
        "question": "What does error E4 on the Juniper T6 Kettle mean?",
        "answers": ["It is overheating: unplug the base and let it cool."],
        "doc_ids": ["doc-0002"],
        "kind": "single_hop",
    },
    {
        "id": "q-0003",
        "question": "Which kettle is cheaper, the Juniper T6 or the Brio X5?",
        "answers": ["The Brio X5 ($119)", "Brio X5"],
        "doc_ids": ["doc-0001", "doc-0004"],
        "kind": "multi_hop",
    },
    {
        "id": "q-0004",
        "question": "How long does standard delivery of a Juniper T6 Kettle take?",
        "answers": ["5–7 business days"],
        "doc_ids": ["doc-0001", "doc-0003"],
        "kind": "multi_hop",
    },
    {
        "id": "q-0005",
        "question": "Is the Juniper T6 Kettle dishwasher safe?",
        "answers": [],
        "doc_ids": ["doc-0001", "doc-0002"],
        "kind": "unanswerable",
    },
    {"id": "q-0006", "question": "Who is Larkspur's CEO?", "answers": [], "doc_ids": [], "kind": "unanswerable"},
]


def write_raw(
    root: Path, documents: list[dict], questions: list[dict], edit_text: Callable[[str, str], str] | None = None
) -> None:
    """Write params.yaml and the two raw files under `root`; `edit_text(file, text)` may corrupt them."""
    (root / "params.yaml").write_text(PARAMS_YAML, encoding="utf-8")
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, records in (("documents.jsonl", documents), ("questions.jsonl", questions)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if edit_text is not None:
            text = edit_text(name, text)
        (raw / name).write_text(text, encoding="utf-8")


def run_validation(root: Path) -> list[Failure]:
    documents, document_lines, failures = read_raw(root / "data/raw/documents.jsonl")
    questions, question_lines, question_failures = read_raw(root / "data/raw/questions.jsonl")
    failures += question_failures
    if failures:
        return failures
    return validate(documents, questions, PARAMS, document_lines, question_lines).failures


def by_id(records: list[dict], record_id: str) -> dict:
    return next(r for r in records if r["id"] == record_id)


# --------------------------------------------------------------------------- the valid corpus


def test_valid_corpus_passes_and_writes_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_raw(tmp_path, DOCUMENTS, QUESTIONS)

    main()

    assert [json.loads(line) for line in Path(OUTPUTS[0]).read_text(encoding="utf-8").splitlines()] == DOCUMENTS
    assert [json.loads(line) for line in Path(OUTPUTS[1]).read_text(encoding="utf-8").splitlines()] == QUESTIONS
    metrics = json.loads(Path("metrics/validate.json").read_text(encoding="utf-8"))
    assert metrics["n_documents"] == 5 and metrics["n_questions"] == 6
    assert (
        metrics["n_questions_single_hop"],
        metrics["n_questions_multi_hop"],
        metrics["n_questions_unanswerable"],
    ) == (2, 2, 2)
    assert metrics["n_doc_links"] == 8
    assert metrics["n_failures"] == 0
    report = json.loads(Path("reports/validation.json").read_text(encoding="utf-8"))
    assert report["success"] is True and report["failures"] == []
    assert report["params"] == {"min_text_chars": 20, "max_text_chars": 20000, "max_question_chars": 1000}
    assert set(report["suites"]) == {"documents", "questions", "doc_links", "texts"}
    expectations = [e for suite in report["suites"].values() for e in suite["expectations"]]
    assert len(expectations) == metrics["n_expectations"]
    assert all(e["success"] and e["unexpected_count"] == 0 for e in expectations)
    assert {
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_be_null",
    } <= {e["expectation"] for e in expectations}
    assert not list(tmp_path.glob("gx*")), "Great Expectations must not leave a project behind"


# --------------------------------------------------------------------------- bad records

Mutation = Callable[[list[dict], list[dict]], None]


def set_field(file: str, record_id: str, name: str, value: Any) -> Mutation:
    def mutate(documents: list[dict], questions: list[dict]) -> None:
        by_id(documents if file == "documents" else questions, record_id)[name] = value

    return mutate


def drop_field(file: str, record_id: str, name: str) -> Mutation:
    def mutate(documents: list[dict], questions: list[dict]) -> None:
        del by_id(documents if file == "documents" else questions, record_id)[name]

    return mutate


def append_text(file: str, record_id: str, name: str, extra: str) -> Mutation:
    def mutate(documents: list[dict], questions: list[dict]) -> None:
        record = by_id(documents if file == "documents" else questions, record_id)
        record[name] = record[name] + extra

    return mutate


def replace_line(file: str, line_no: int, new_line: str) -> Callable[[str, str], str]:
    def edit(name: str, text: str) -> str:
        if name != file:
            return text
        lines = text.splitlines(keepends=True)
        lines[line_no - 1] = new_line + "\n"
        return "".join(lines)

    return edit


D, Q = "documents.jsonl", "questions.jsonl"

# (case id, mutation of the records, corruption of the raw text,
#  expected {(file, line, record id, field)}, a phrase every reason contains)
CASES = [
    (
        "broken_json",
        None,
        replace_line(D, 3, '{"id": "doc-0003", "title": "Shipping policy", "text": "Standard'),
        {(D, 3, "doc-0003", None)},
        "not valid JSON",
    ),
    ("json_array_line", None, replace_line(Q, 2, '["q-0002"]'), {(Q, 2, None, None)}, "expected a JSON object"),
    ("missing_text", drop_field("documents", "doc-0002", "text"), None, {(D, 2, "doc-0002", "text")}, "missing field"),
    (
        "missing_answers",
        drop_field("questions", "q-0001", "answers"),
        None,
        {(Q, 1, "q-0001", "answers")},
        "missing field",
    ),
    ("missing_kind", drop_field("questions", "q-0004", "kind"), None, {(Q, 4, "q-0004", "kind")}, "missing field"),
    ("missing_id", drop_field("documents", "doc-0005", "id"), None, {(D, 5, None, "id")}, "missing field"),
    (
        "title_not_a_string",
        set_field("documents", "doc-0004", "title", 7),
        None,
        {(D, 4, "doc-0004", "title")},
        "must be a string, got a number",
    ),
    (
        "answers_not_a_list",
        set_field("questions", "q-0002", "answers", "It is overheating."),
        None,
        {(Q, 2, "q-0002", "answers")},
        "must be a list of strings, got a string",
    ),
    (
        "answers_hold_a_number",
        set_field("questions", "q-0003", "answers", ["Brio X5", 119]),
        None,
        {(Q, 3, "q-0003", "answers")},
        "item [1] is a number",
    ),
    (
        "doc_ids_null",
        set_field("questions", "q-0001", "doc_ids", None),
        None,
        {(Q, 1, "q-0001", "doc_ids")},
        "got null",
    ),
    ("id_not_a_string", set_field("questions", "q-0006", "id", 6), None, {(Q, 6, None, "id")}, "got a number"),
    ("empty_id", set_field("documents", "doc-0005", "id", ""), None, {(D, 5, "", "id")}, "empty id"),
    (
        "id_with_whitespace",
        set_field("documents", "doc-0005", "id", "doc-0005 "),
        None,
        {(D, 5, "doc-0005 ", "id")},
        "whitespace",
    ),
    (
        "duplicate_document_id",
        set_field("documents", "doc-0005", "id", "doc-0001"),
        None,
        {(D, 1, "doc-0001", "id"), (D, 5, "doc-0001", "id")},
        "duplicate id (on lines 1, 5)",
    ),
    (
        "duplicate_question_id",
        set_field("questions", "q-0006", "id", "q-0005"),
        None,
        {(Q, 5, "q-0005", "id"), (Q, 6, "q-0005", "id")},
        "duplicate id",
    ),
    ("empty_text", set_field("documents", "doc-0003", "text", ""), None, {(D, 3, "doc-0003", "text")}, "empty text"),
    (
        "blank_text",
        set_field("documents", "doc-0003", "text", "  \n "),
        None,
        {(D, 3, "doc-0003", "text")},
        "empty text",
    ),
    (
        "too_short_text",
        set_field("documents", "doc-0003", "text", "Ships free."),
        None,
        {(D, 3, "doc-0003", "text")},
        "below params.validate.min_text_chars=20",
    ),
    (
        "too_long_text",
        set_field("documents", "doc-0003", "text", "Kettles boil water. " * 1001),
        None,
        {(D, 3, "doc-0003", "text")},
        "above params.validate.max_text_chars=20000",
    ),
    (
        "empty_title",
        set_field("documents", "doc-0004", "title", ""),
        None,
        {(D, 4, "doc-0004", "title")},
        "empty title",
    ),
    (
        "empty_question",
        set_field("questions", "q-0002", "question", " "),
        None,
        {(Q, 2, "q-0002", "question")},
        "empty question",
    ),
    (
        "too_long_question",
        set_field("questions", "q-0002", "question", "Why? " * 201),
        None,
        {(Q, 2, "q-0002", "question")},
        "above params.validate.max_question_chars=1000",
    ),
    (
        "dangling_doc_id",
        set_field("questions", "q-0003", "doc_ids", ["doc-0001", "doc-9999"]),
        None,
        {(Q, 3, "q-0003", "doc_ids[1]")},
        "unknown document id 'doc-9999'",
    ),
    (
        "special_token_in_text",
        append_text("documents", "doc-0002", "text", " <|eot_id|>"),
        None,
        {(D, 2, "doc-0002", "text")},
        "special token '<|eot_id|>'",
    ),
    (
        "special_token_in_title",
        append_text("documents", "doc-0001", "title", "<|begin_of_text|>"),
        None,
        {(D, 1, "doc-0001", "title")},
        "special token '<|begin_of_text|>'",
    ),
    (
        "special_token_in_question",
        append_text("questions", "q-0001", "question", " <|start_header_id|>"),
        None,
        {(Q, 1, "q-0001", "question")},
        "special token '<|start_header_id|>'",
    ),
    (
        "special_token_in_answer",
        set_field("questions", "q-0003", "answers", ["Brio X5", "<|reserved_special_token_3|>"]),
        None,
        {(Q, 3, "q-0003", "answers[1]")},
        "special token '<|reserved_special_token_3|>'",
    ),
    (
        "python_tag_in_answer",
        set_field("questions", "q-0001", "answers", ["<|python_tag|>LK-4821"]),
        None,
        {(Q, 1, "q-0001", "answers[0]")},
        "special token '<|python_tag|>'",
    ),
    (
        "email_in_text",
        append_text("documents", "doc-0005", "text", " Write to jane.doe@example.com."),
        None,
        {(D, 5, "doc-0005", "text")},
        "e-mail address at char",
    ),
    (
        "email_in_answer",
        set_field("questions", "q-0002", "answers", ["Ask support@larkspur.co.uk"]),
        None,
        {(Q, 2, "q-0002", "answers[0]")},
        "e-mail address",
    ),
    (
        "phone_international",
        append_text("documents", "doc-0005", "text", " Call +1 415 555 0132."),
        None,
        {(D, 5, "doc-0005", "text")},
        "phone number",
    ),
    (
        "phone_parenthesised",
        append_text("documents", "doc-0003", "text", " Questions? (415) 555-0132"),
        None,
        {(D, 3, "doc-0003", "text")},
        "phone number",
    ),
    (
        "phone_dashed_in_question",
        append_text("questions", "q-0006", "question", " I'm on 415-555-0132."),
        None,
        {(Q, 6, "q-0006", "question")},
        "phone number",
    ),
    (
        "phone_uk",
        append_text("documents", "doc-0005", "text", " London office: +44 20 7946 0958."),
        None,
        {(D, 5, "doc-0005", "text")},
        "phone number",
    ),
    (
        "card_number_grouped",
        append_text("documents", "doc-0003", "text", " Paid with 4111 1111 1111 1111."),
        None,
        {(D, 3, "doc-0003", "text")},
        "payment-card number ending 1111",
    ),
    (
        "card_number_in_answer",
        set_field("questions", "q-0002", "answers", ["Card 5555-5555-5555-4444"]),
        None,
        {(Q, 2, "q-0002", "answers[0]")},
        "payment-card number ending 4444",
    ),
    (
        "amex_number_run_together",
        append_text("documents", "doc-0005", "text", " Amex 378282246310005 on file."),
        None,
        {(D, 5, "doc-0005", "text")},
        "payment-card number ending 0005",
    ),
    (
        "answerable_without_answers",
        set_field("questions", "q-0001", "answers", []),
        None,
        {(Q, 1, "q-0001", "answers")},
        "no non-empty answer",
    ),
    (
        "answerable_with_blank_answer",
        set_field("questions", "q-0004", "answers", [" "]),
        None,
        {(Q, 4, "q-0004", "answers")},
        "answer",
    ),
    (
        "unanswerable_with_answers",
        set_field("questions", "q-0005", "answers", ["Yes"]),
        None,
        {(Q, 5, "q-0005", "answers")},
        "unanswerable question has 1 answer(s)",
    ),
    (
        "unknown_kind",
        set_field("questions", "q-0002", "kind", "open_ended"),
        None,
        {(Q, 2, "q-0002", "kind")},
        "unknown kind 'open_ended'",
    ),
    (
        "answerable_without_doc_ids",
        set_field("questions", "q-0002", "doc_ids", []),
        None,
        {(Q, 2, "q-0002", "doc_ids")},
        "cites no documents",
    ),
    ("no_questions", lambda documents, questions: questions.clear(), None, {(Q, None, None, None)}, "no records"),
]


@pytest.mark.parametrize(
    "mutate, edit_text, expected, phrase", [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_bad_record_is_reported_by_id_and_field(tmp_path, monkeypatch, capsys, mutate, edit_text, expected, phrase):
    documents, questions = copy.deepcopy(DOCUMENTS), copy.deepcopy(QUESTIONS)
    if mutate is not None:
        mutate(documents, questions)
    write_raw(tmp_path, documents, questions, edit_text)
    monkeypatch.chdir(tmp_path)
    reported: list[Failure] = []  # what main() hands to the report, so one GE run serves both checks

    def spy(failures: list[Failure], limit: int) -> list[str]:
        reported.extend(failures)
        return format_failures(failures, limit)

    monkeypatch.setattr(stage, "format_failures", spy)

    with pytest.raises(SystemExit) as exit_info:
        main()

    assert exit_info.value.code == 1
    assert {(f.file, f.line, f.id, f.field) for f in reported} == expected, "\n".join(map(str, reported))
    assert all(phrase in f.reason for f in reported), "\n".join(map(str, reported))
    assert not [path for path in OUTPUTS if Path(path).exists()]
    assert not Path("data/validated").exists()
    stderr = capsys.readouterr().err
    for failure in reported:
        assert str(failure) in stderr


def test_failure_line_names_file_line_id_and_field():
    failure = Failure("documents.jsonl", 4, "doc-0003", "text", "empty text")
    assert str(failure) == "documents.jsonl:4 id=doc-0003 field=text: empty text"
    assert (
        str(Failure("documents.jsonl", 7, None, "id", "missing field"))
        == "documents.jsonl:7 id=? field=id: missing field"
    )
    assert str(Failure("questions.jsonl", None, None, None, "no records")) == "questions.jsonl: no records"


def test_every_problem_is_reported_sorted_and_capped(tmp_path):
    documents = copy.deepcopy(DOCUMENTS)
    for doc in documents:
        doc["text"] = ""
    by_id(documents, "doc-0002")["title"] = "Call 415-555-0132"
    write_raw(tmp_path, documents, QUESTIONS)

    failures = run_validation(tmp_path)

    lines = format_failures(failures)
    assert lines == sorted(lines, key=lambda line: (line.split(":")[0], int(line.split(":")[1].split()[0])))
    assert len(lines) == 6 and lines[1] == "documents.jsonl:2 id=doc-0002 field=text: empty text"
    assert "documents.jsonl:2 id=doc-0002 field=title: contains a phone number at char 5" in lines
    capped = format_failures(failures, limit=2)
    assert capped[2:] == ["... and 4 more problems"]


def test_every_broken_json_line_is_reported(tmp_path):
    def edit(name: str, text: str) -> str:
        lines = text.splitlines(keepends=True)
        if name == "questions.jsonl":
            lines[1] = '{"id": "q-0002", "question": "What\n'
            lines[4] = "\n" + lines[4][:-3] + "\n"  # a blank line first: line numbers must still be right
        return "".join(lines)

    write_raw(tmp_path, DOCUMENTS, QUESTIONS, edit)

    failures = run_validation(tmp_path)

    assert {(f.file, f.line, f.id) for f in failures} == {(Q, 2, "q-0002"), (Q, 6, "q-0005")}


# --------------------------------------------------------------------------- personal data rules


PRODUCT_TEXTS = [
    "SKU LK-4821",
    "Order it using SKU LK-4821-B.",
    "Price: $1,299.00",
    "Released 2025-03-14.",
    "Weighs 2.4 kg.",
    "Delivery in 5–7 business days.",
    "Error E4 means overheating.",
    "Open 09:00-17:30, Mon-Fri.",
    "Input 100-240 V, 50/60 Hz.",
    "Dimensions 23 x 18 x 25 cm.",
    "Model 4821-300-12.",
    "Serial LK-415-555-0132.",
    "Part no. 1234567890123 (EAN barcode).",
    "Use 4111 1111 1111 1112 as an example of an invalid number.",
    "Firmware 1.2.3.4 from 2024.05.28.",
    "Temperature range -20 to +50 °C.",
    "Pack of 12, item 2025-0314-0001.",
    "Use <b>bold</b> and a|b pipes.",
]


def test_product_data_is_not_personal_data():
    # One GE run for all of them: each text is its own document and an answer, so a false
    # positive names the text that caused it.
    documents = copy.deepcopy(DOCUMENTS) + [
        {"id": f"product-{i}", "title": text, "text": f"{text} Larkspur Appliances, since 1998."}
        for i, text in enumerate(PRODUCT_TEXTS)
    ]
    questions = copy.deepcopy(QUESTIONS)
    by_id(questions, "q-0001")["answers"] = PRODUCT_TEXTS

    failures = validate(documents, questions, PARAMS).failures

    assert failures == [], "\n".join(map(str, failures))


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("1234567812345678")


@pytest.mark.parametrize(
    "text, found",
    [
        ("card 4111-1111-1111-1111 expires", "payment-card number ending 1111 at char 5"),
        ("6011 1111 1111 1117", "payment-card number ending 1117 at char 0"),
        ("Amex 3782 822463 10005", "payment-card number ending 0005 at char 5"),
        ("4111 1111 1111 1112", None),  # fails Luhn
        ("0000000000000", None),  # Luhn-valid, but no card network starts with 0
        ("4111 1111-1111 1111", None),  # mixed separators are not how cards are written
        ("ref 41111111111111111111111", None),  # 23 digits: too long for a card
    ],
)
def test_find_card_number(text, found):
    assert find_card_number(text) == found
