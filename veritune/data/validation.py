"""Check raw documents and questions against veritune's data contract with Great Expectations.

Run through the stage, from the project root: `python stages/validate.py` (or `dvc repro
validate`). The stage reads `data/raw/documents.jsonl` and `data/raw/questions.jsonl` with
`read_raw`, calls `validate`, and writes its outputs only if `validate` found no failures.

The contract (extra fields are allowed and passed through untouched):

    documents.jsonl  {"id": str, "title": str, "text": str}
    questions.jsonl  {"id": str, "question": str, "answers": [str], "doc_ids": [str],
                      "kind": "single_hop" | "multi_hop" | "unanswerable"}

The raw records become four pandas tables, each checked by one Great Expectations suite
(one validator run per table, because GE's per-run overhead dominates on small data):

    documents  one row per document: id, field types, title/text lengths
    questions  one row per question: id, field types, question length, kind, and the
               answers/doc_ids a question of that kind must (not) have
    doc_links  one row per (question, doc_id): every doc_id names an existing document
    texts      one row per text value (title, text, question, each answer): no Llama special
               tokens, no e-mail addresses, phone numbers or payment-card numbers

Where the raw JSON cannot be checked directly (a missing field, a list holding a number)
the tables carry derived columns (`text_type`, `n_answers`, `card_number`, ...) and the
expectations sit on those. Every unexpected row becomes a `Failure(file, line, id, field,
reason)`; each expectation's `meta` names the rule that turns its unexpected value into a
reason a person can act on.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from veritune.core.config import as_dict
from veritune.core.params import ValidateParams
from veritune.core.io import JsonlError, read_jsonl

log = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
QUESTIONS_FILE = "questions.jsonl"
KINDS = ("single_hop", "multi_hop", "unanswerable")
ANSWERABLE_KINDS = ("single_hop", "multi_hop")

# The regexes run inside GE, where pandas may hand them to pyarrow's RE2 instead of Python's
# `re`; they stick to the syntax both engines read alike ([0-9] rather than \d, no `$`
# before a trailing newline), and the tests run them through GE to keep it that way.

# Llama 3 tokenizers turn these strings into control tokens even inside user text, so one
# in a document could end a turn or open a header mid-prompt.
SPECIAL_TOKEN_REGEX = r"<\|[a-z0-9_]+\|>"
EMAIL_REGEX = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# Separators are required between digit groups, and a number glued to a letter, digit or
# dash is skipped, so SKUs (LK-4821), ISO dates (2025-03-14), prices ($1,299) and bare
# order numbers are not read as phone numbers.
PHONE_REGEX = (
    r"(?<![0-9A-Za-z+-])(?:"
    r"\+[0-9]{1,3}[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})[ .-]?[0-9]{2,5}[ .-]?[0-9]{3,5}"  # +1 415 555 0132
    r"|(?:\([0-9]{3}\)[ .-]?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"  # (415) 555-0132, 415-555-0132
    r")(?![0-9A-Za-z]|-[0-9])"
)
# Card numbers as people write them: 13-19 digits in one run, in groups of four, or in the
# 4-6-5 grouping of Amex. Candidates must then pass the Luhn check and start with a digit
# a major network issues (2-6: Mastercard, Amex/Diners/JCB, Visa, Discover/Maestro), which
# keeps long part numbers and barcodes from tripping it.
CARD_CANDIDATE = re.compile(
    r"(?<![0-9A-Za-z-])(?:"
    r"[0-9]{13,19}"
    r"|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}"
    r"|[0-9]{4}([ -])[0-9]{6}\2[0-9]{4,5}"
    r")(?![0-9A-Za-z]|-[0-9])"
)

_RECOVER_ID = re.compile(r'"id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_RESULT_FORMAT = "COMPLETE"  # unexpected_index_list names every failing row, not a sample
_MAX_IDS_IN_REPORT = 20


# --------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class Failure:
    """One problem with one record: `documents.jsonl:4 id=doc-0003 field=text: empty text`."""

    file: str
    line: int | None  # 1-based line in the raw file; None for a whole-file problem
    id: str | None  # the record's id, when it has a usable one
    field: str | None  # `text`, `answers[1]`, `doc_ids[0]`, ...; None for the whole record
    reason: str

    def sort_key(self) -> tuple:
        return (self.file, self.line or 0, self.id or "", self.field or "", self.reason)

    def __str__(self) -> str:
        parts = [f"{self.file}:{self.line}" if self.line is not None else self.file]
        if self.line is not None:
            parts.append(f"id={_show_id(self.id)}")
        if self.field is not None:
            parts.append(f"field={self.field}")
        return " ".join(parts) + f": {self.reason}"


def _show_id(value: str | None) -> str:
    if value is None:
        return "?"
    if value == "" or value != value.strip() or any(c.isspace() for c in value):
        return repr(value)
    return value


def format_failures(failures: list[Failure], limit: int = 200) -> list[str]:
    """The failures as sorted report lines, at most `limit` of them plus a count of the rest."""
    ordered = sorted(set(failures), key=Failure.sort_key)
    lines = [str(f) for f in ordered[:limit]]
    if len(ordered) > limit:
        lines.append(f"... and {len(ordered) - limit} more problems")
    return lines


# --------------------------------------------------------------------------- reading


def read_raw(path: str | Path) -> tuple[list[dict[str, Any]], list[int], list[Failure]]:
    """Read a raw JSON Lines file: (records, their line numbers, failures).

    If any line is not a JSON object, the records are empty and every such line is a
    failure naming its line number and, when a regex can find it, the record's id.
    """
    path = Path(path)
    try:
        records = read_jsonl(path)
    except JsonlError as error:
        broken = _broken_lines(path)
        return [], [], broken or [Failure(path.name, None, None, None, str(error))]
    lines = _record_lines(path)
    if len(lines) != len(records):  # read_jsonl changed how it skips lines
        raise RuntimeError(f"{path}: found {len(lines)} record lines but read_jsonl returned {len(records)}")
    return records, lines, []


def _record_lines(path: Path) -> list[int]:
    # The same line split and blank-line rule as veritune.core.io.read_jsonl.
    with path.open(encoding="utf-8") as f:
        return [line_no for line_no, line in enumerate(f, start=1) if line.strip()]


def _broken_lines(path: Path) -> list[Failure]:
    failures = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            match = _RECOVER_ID.search(line)
            record_id = match.group(1) if match else None
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
                failures.append(Failure(path.name, line_no, record_id, None, reason))
                continue
            if not isinstance(record, dict):
                reason = f"expected a JSON object, got {type(record).__name__}"
                failures.append(Failure(path.name, line_no, record_id, None, reason))
    return failures


# --------------------------------------------------------------------------- derived values


def luhn_valid(digits: str) -> bool:
    """True if the digit string passes the Luhn checksum that every payment card carries."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def find_card_number(text: str) -> str | None:
    """Describe the first payment-card number in `text` (masked), or None if there is none."""
    for match in CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"[^0-9]", "", match.group(0))
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits):
            return f"payment-card number ending {digits[-4:]} at char {match.start()}"
    return None


def _json_type(record: dict[str, Any], name: str) -> str:
    """What JSON type `record[name]` is, in the words a failure reason uses."""
    if name not in record:
        return "missing"
    value = record[name]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return f"a list whose item [{i}] is {_json_type({'x': item}, 'x')}"
        return "a list of strings"
    return "an object"


def _string(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    return value if isinstance(value, str) else None


def _string_list(record: dict[str, Any], name: str) -> list[str] | None:
    value = record.get(name)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# --------------------------------------------------------------------------- tables


def documents_table(documents: list[dict[str, Any]], lines: list[int]) -> pd.DataFrame:
    rows = []
    for line, doc in zip(lines, documents):
        title, text = _string(doc, "title"), _string(doc, "text")
        rows.append({
            "line": line,
            "id": _string(doc, "id"),
            "id_type": _json_type(doc, "id"),
            "title_type": _json_type(doc, "title"),
            "text_type": _json_type(doc, "text"),
            # Lengths are taken after stripping, so a blank field reads as an empty one.
            "title": title.strip() if title is not None else None,
            "text": text.strip() if text is not None else None,
        })
    columns = ["line", "id", "id_type", "title_type", "text_type", "title", "text"]
    return pd.DataFrame(rows, columns=columns)


def questions_table(questions: list[dict[str, Any]], lines: list[int]) -> pd.DataFrame:
    rows = []
    for line, q in zip(lines, questions):
        question = _string(q, "question")
        answers = _string_list(q, "answers")
        doc_ids = _string_list(q, "doc_ids")
        rows.append({
            "line": line,
            "id": _string(q, "id"),
            "id_type": _json_type(q, "id"),
            "question_type": _json_type(q, "question"),
            "answers_type": _json_type(q, "answers"),
            "doc_ids_type": _json_type(q, "doc_ids"),
            "kind_type": _json_type(q, "kind"),
            "question": question.strip() if question is not None else None,
            "kind": _string(q, "kind"),
            # Counts stay null when the list itself is malformed: the type rule reports that.
            "n_answers": sum(1 for a in answers if a.strip()) if answers is not None else None,
            "n_blank_answers": sum(1 for a in answers if not a.strip()) if answers is not None else None,
            "n_doc_ids": len(doc_ids) if doc_ids is not None else None,
        })
    columns = ["line", "id", "id_type", "question_type", "answers_type", "doc_ids_type", "kind_type",
               "question", "kind", "n_answers", "n_blank_answers", "n_doc_ids"]
    table = pd.DataFrame(rows, columns=columns)
    for name in ("n_answers", "n_blank_answers", "n_doc_ids"):
        table[name] = table[name].astype("Int64")
    return table


def doc_links_table(questions: list[dict[str, Any]], lines: list[int]) -> pd.DataFrame:
    rows = []
    for line, q in zip(lines, questions):
        for i, doc_id in enumerate(_string_list(q, "doc_ids") or []):
            rows.append({"line": line, "id": _string(q, "id"), "field": f"doc_ids[{i}]", "doc_id": doc_id})
    return pd.DataFrame(rows, columns=["line", "id", "field", "doc_id"], dtype=object)


def texts_table(documents: list[dict[str, Any]], document_lines: list[int],
                questions: list[dict[str, Any]], question_lines: list[int]) -> pd.DataFrame:
    rows = []

    def add(file: str, line: int, record: dict[str, Any], name: str, text: Any) -> None:
        if isinstance(text, str):
            rows.append({"file": file, "line": line, "id": _string(record, "id"), "field": name,
                         "text": text, "card_number": find_card_number(text)})

    for line, doc in zip(document_lines, documents):
        add(DOCUMENTS_FILE, line, doc, "title", doc.get("title"))
        add(DOCUMENTS_FILE, line, doc, "text", doc.get("text"))
    for line, q in zip(question_lines, questions):
        add(QUESTIONS_FILE, line, q, "question", q.get("question"))
        answers = q.get("answers")
        for i, answer in enumerate(answers if isinstance(answers, list) else []):
            add(QUESTIONS_FILE, line, q, f"answers[{i}]", answer)
    return pd.DataFrame(rows, columns=["file", "line", "id", "field", "text", "card_number"], dtype=object)


# --------------------------------------------------------------------------- suites


@dataclass
class Suite:
    """One GE suite for one table, plus how each of its rules explains an unexpected value."""

    name: str
    file: str  # the raw file its rows come from; the texts table names it per row instead
    table: pd.DataFrame
    index_columns: list[str]
    expectations: list[Any] = field(default_factory=list)
    explain: dict[str, Callable[[Any], str]] = field(default_factory=dict)

    def expect(self, rule: str, field_name: str | None, expectation: Any, explain: Callable[[Any], str]) -> None:
        expectation.meta = {"rule": rule, "field": field_name}
        self.expectations.append(expectation)
        self.explain[rule] = explain


def _type_reason(expected: str) -> Callable[[Any], str]:
    return lambda got: "missing field" if got == "missing" else f"must be {expected}, got {got}"


def _length_reason(name: str, low: int, high: int | None, low_key: str | None, high_key: str | None) -> Callable[[Any], str]:
    def explain(value: Any) -> str:
        chars = len(value)
        if chars == 0:
            return f"empty {name}"
        if chars < low:
            return f"{name} is {chars} characters, below params.validate.{low_key}={low}"
        return f"{name} is {chars} characters, above params.validate.{high_key}={high}; split it upstream"
    return explain


def _match_reason(what: str, regex: str) -> Callable[[Any], str]:
    pattern = re.compile(regex)

    def explain(text: Any) -> str:
        match = pattern.search(text)
        if match is None:  # the engines disagreed; still name the rule
            return f"contains {what}"
        if what == "a Llama special token":  # not personal data, so safe to echo
            return f"contains {what} {match.group(0)!r} at char {match.start()}"
        return f"contains {what} at char {match.start()}"
    return explain


def _id_rules(suite: Suite) -> None:
    gxe = _gx().expectations
    table = suite.table
    suite.expect("id.type", "id", gxe.ExpectColumnValuesToBeInSet(column="id_type", value_set=["a string"]),
                 _type_reason("a string"))
    suite.expect("id.empty", "id", gxe.ExpectColumnValueLengthsToBeBetween(column="id", min_value=1),
                 lambda value: "empty id")
    suite.expect("id.whitespace", "id", gxe.ExpectColumnValuesToNotMatchRegex(column="id", regex=r"^\s|\s$"),
                 lambda value: "id has leading or trailing whitespace")

    def duplicate(value: Any) -> str:
        lines = table.loc[table["id"] == value, "line"].tolist()
        return f"duplicate id (on lines {', '.join(str(n) for n in lines)}); ids must be unique"
    suite.expect("id.unique", "id", gxe.ExpectColumnValuesToBeUnique(column="id"), duplicate)


def _row_count_rule(suite: Suite) -> None:
    suite.expect("rows", None, _gx().expectations.ExpectTableRowCountToBeBetween(min_value=1),
                 lambda value: "no records; the file is empty")


def documents_suite(table: pd.DataFrame, params: ValidateParams) -> Suite:
    gxe = _gx().expectations
    suite = Suite("documents", DOCUMENTS_FILE, table, ["id", "line"])
    _row_count_rule(suite)
    _id_rules(suite)
    for name in ("title", "text"):
        suite.expect(f"{name}.type", name, gxe.ExpectColumnValuesToBeInSet(column=f"{name}_type", value_set=["a string"]),
                     _type_reason("a string"))
    suite.expect("title.length", "title", gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1),
                 _length_reason("title", 1, None, None, None))
    suite.expect("text.length", "text", gxe.ExpectColumnValueLengthsToBeBetween(
        column="text", min_value=params.min_text_chars, max_value=params.max_text_chars),
        _length_reason("text", params.min_text_chars, params.max_text_chars, "min_text_chars", "max_text_chars"))
    return suite


def questions_suite(table: pd.DataFrame, params: ValidateParams) -> Suite:
    gxe = _gx().expectations
    suite = Suite("questions", QUESTIONS_FILE, table, ["id", "line"])
    _row_count_rule(suite)
    _id_rules(suite)
    for name, expected in (("question", "a string"), ("answers", "a list of strings"),
                           ("doc_ids", "a list of strings"), ("kind", "a string")):
        suite.expect(f"{name}.type", name, gxe.ExpectColumnValuesToBeInSet(column=f"{name}_type", value_set=[expected]),
                     _type_reason(expected))
    suite.expect("question.length", "question", gxe.ExpectColumnValueLengthsToBeBetween(
        column="question", min_value=1, max_value=params.max_question_chars),
        _length_reason("question", 1, params.max_question_chars, None, "max_question_chars"))
    suite.expect("kind.known", "kind", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(KINDS)),
                 lambda value: f"unknown kind {value!r}; use one of {', '.join(KINDS)}")

    from great_expectations.expectations.row_conditions import Column

    answerable = Column("kind").is_in(ANSWERABLE_KINDS)
    suite.expect("answers.required", "answers", gxe.ExpectColumnValuesToBeBetween(
        column="n_answers", min_value=1, row_condition=answerable),
        lambda value: "answerable question has no non-empty answer; add one or make it kind=unanswerable")
    suite.expect("answers.forbidden", "answers", gxe.ExpectColumnValuesToBeBetween(
        column="n_answers", max_value=0, row_condition=Column("kind") == "unanswerable"),
        lambda value: f"unanswerable question has {value} answer(s); its answers list must be empty")
    suite.expect("answers.blank", "answers", gxe.ExpectColumnValuesToBeBetween(column="n_blank_answers", max_value=0),
                 lambda value: f"{value} blank answer(s); remove them")
    suite.expect("doc_ids.required", "doc_ids", gxe.ExpectColumnValuesToBeBetween(
        column="n_doc_ids", min_value=1, row_condition=answerable),
        lambda value: "answerable question cites no documents; list its source in doc_ids")
    return suite


def doc_links_suite(table: pd.DataFrame, document_ids: list[str]) -> Suite:
    suite = Suite("doc_links", QUESTIONS_FILE, table, ["id", "line", "field"])
    suite.expect("doc_ids.resolve", None, _gx().expectations.ExpectColumnValuesToBeInSet(
        column="doc_id", value_set=document_ids),
        lambda value: f"unknown document id {value!r}: no such id in {DOCUMENTS_FILE}")
    return suite


def texts_suite(table: pd.DataFrame) -> Suite:
    gxe = _gx().expectations
    suite = Suite("texts", "", table, ["file", "id", "line", "field"])
    for rule, what, regex in (("special_token", "a Llama special token", SPECIAL_TOKEN_REGEX),
                              ("email", "an e-mail address", EMAIL_REGEX),
                              ("phone", "a phone number", PHONE_REGEX)):
        suite.expect(rule, None, gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=regex),
                     _match_reason(what, regex))
    suite.expect("card_number", None, gxe.ExpectColumnValuesToBeNull(column="card_number"),
                 lambda value: f"contains a {value}")
    return suite


# --------------------------------------------------------------------------- running


@dataclass
class Validation:
    failures: list[Failure]
    metrics: dict[str, Any]  # flat counts for metrics/validate.json
    report: dict[str, Any]  # every expectation and its outcome, for reports/validation.json

    @property
    def success(self) -> bool:
        return not self.failures


def validate(documents: list[dict[str, Any]], questions: list[dict[str, Any]], params: ValidateParams,
             document_lines: list[int] | None = None, question_lines: list[int] | None = None) -> Validation:
    """Run the four suites over the raw records; every unexpected value becomes a Failure.

    `*_lines` are the records' line numbers in the raw files (as `read_raw` returns them);
    without them records are numbered 1, 2, ... .
    """
    document_lines = document_lines or list(range(1, len(documents) + 1))
    question_lines = question_lines or list(range(1, len(questions) + 1))
    documents_frame = documents_table(documents, document_lines)
    document_ids = sorted({i for i in documents_frame["id"].dropna() if i})
    suites = [
        documents_suite(documents_frame, params),
        questions_suite(questions_table(questions, question_lines), params),
        doc_links_suite(doc_links_table(questions, question_lines), document_ids),
        texts_suite(texts_table(documents, document_lines, questions, question_lines)),
    ]

    context = _context()
    source = context.data_sources.add_pandas("raw")
    failures: list[Failure] = []
    report: dict[str, Any] = {"params": as_dict(params), "success": True, "suites": {}}
    for suite in suites:
        result = _run(context, source, suite)
        failures.extend(_failures(suite, result))
        report["suites"][suite.name] = _summary(suite, result)
        report["success"] = report["success"] and bool(result.success)
    failures = sorted(set(failures), key=Failure.sort_key)
    report["failures"] = [str(f) for f in failures]

    kinds = pd.Series([q.get("kind") for q in questions], dtype=object)
    metrics = {
        "n_documents": len(documents),
        "n_questions": len(questions),
        **{f"n_questions_{kind}": int((kinds == kind).sum()) for kind in KINDS},
        "n_doc_links": len(suites[2].table),
        "n_texts_scanned": len(suites[3].table),
        "n_expectations": sum(len(s.expectations) for s in suites),
        "n_failures": len(failures),
    }
    return Validation(failures, metrics, report)


def _gx():
    # Imported on first use: GE takes seconds to import, and reading records should not wait.
    # Its INFO chatter starts during the import, and some of its modules pin their own
    # loggers to INFO, so every GE logger is quietened, before and after.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.NOTSET)  # defer to the WARNING above
    return gx


def _context():
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = _gx().get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _run(context: Any, source: Any, suite: Suite) -> Any:
    gx = _gx()
    batch_definition = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe("all")
    ge_suite = context.suites.add(gx.ExpectationSuite(name=suite.name, expectations=suite.expectations))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": suite.table})
    result = batch.validate(ge_suite, result_format={
        "result_format": _RESULT_FORMAT, "unexpected_index_column_names": suite.index_columns})
    for outcome in result.results:
        info = outcome.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(f"Great Expectations could not evaluate {outcome.expectation_config.meta} "
                               f"on the {suite.name} table: {info.get('exception_message')}")
    return result


def _plain(value: Any) -> Any:
    """numpy scalars and pandas missing markers as plain Python values."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _failures(suite: Suite, result: Any) -> list[Failure]:
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        rule, field_name = config.meta["rule"], config.meta["field"]
        explain = suite.explain[rule]
        if "unexpected_index_list" not in outcome.result:  # a table-level expectation
            failures.append(Failure(suite.file, None, None, field_name, explain(outcome.result.get("observed_value"))))
            continue
        column = config.kwargs.get("column")
        for row in outcome.result["unexpected_index_list"]:
            line = _plain(row.get("line"))
            failures.append(Failure(
                file=_plain(row.get("file")) or suite.file,
                line=int(line) if line is not None else None,
                id=_plain(row.get("id")),
                field=_plain(row.get("field")) or field_name,
                reason=explain(_plain(row.get(column))),
            ))
    return failures


def _summary(suite: Suite, result: Any) -> dict[str, Any]:
    """The GE result without the row values, which may hold the very personal data found."""
    expectations = []
    for outcome in result.results:
        config = outcome.expectation_config
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        if isinstance(kwargs.get("value_set"), list) and len(kwargs["value_set"]) > _MAX_IDS_IN_REPORT:
            kwargs["value_set"] = f"<{len(kwargs['value_set'])} values>"
        rows = outcome.result.get("unexpected_index_list") or []
        expectations.append({
            "expectation": config.type,
            "rule": config.meta["rule"],
            "field": config.meta["field"],
            "kwargs": json.loads(json.dumps(kwargs, default=str)),
            "success": bool(outcome.success),
            "element_count": outcome.result.get("element_count"),
            "unexpected_count": outcome.result.get("unexpected_count", 0 if outcome.success else None),
            "unexpected_ids": sorted({str(_plain(r.get("id"))) for r in rows})[:_MAX_IDS_IN_REPORT],
        })
    stats = result.statistics
    return {
        "rows": len(suite.table),
        "success": bool(result.success),
        "evaluated_expectations": stats["evaluated_expectations"],
        "successful_expectations": stats["successful_expectations"],
        "expectations": expectations,
    }
