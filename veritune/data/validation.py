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
the tables (`veritune.data.records`) carry derived columns (`text_type`, `n_answers`,
`card_number`, ...) and the expectations sit on those. Every unexpected row becomes a `Failure(file, line, id, field,
reason)`; each expectation's `meta` names the rule that turns its unexpected value into a
reason a person can act on.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from veritune.core.config import as_dict
from veritune.core.params import ValidateParams
from veritune.data.records import (
    DOCUMENTS_FILE,
    QUESTIONS_FILE,
    Failure,
    doc_links_table,
    documents_table,
    questions_table,
    texts_table,
)

log = logging.getLogger(__name__)

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
_RESULT_FORMAT = "COMPLETE"  # unexpected_index_list names every failing row, not a sample
_MAX_IDS_IN_REPORT = 20


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


def _length_reason(
    name: str, low: int, high: int | None, low_key: str | None, high_key: str | None
) -> Callable[[Any], str]:
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
    suite.expect(
        "id.type",
        "id",
        gxe.ExpectColumnValuesToBeInSet(column="id_type", value_set=["a string"]),
        _type_reason("a string"),
    )
    suite.expect(
        "id.empty", "id", gxe.ExpectColumnValueLengthsToBeBetween(column="id", min_value=1), lambda value: "empty id"
    )
    suite.expect(
        "id.whitespace",
        "id",
        gxe.ExpectColumnValuesToNotMatchRegex(column="id", regex=r"^\s|\s$"),
        lambda value: "id has leading or trailing whitespace",
    )

    def duplicate(value: Any) -> str:
        lines = table.loc[table["id"] == value, "line"].tolist()
        return f"duplicate id (on lines {', '.join(str(n) for n in lines)}); ids must be unique"

    suite.expect("id.unique", "id", gxe.ExpectColumnValuesToBeUnique(column="id"), duplicate)


def _row_count_rule(suite: Suite) -> None:
    suite.expect(
        "rows",
        None,
        _gx().expectations.ExpectTableRowCountToBeBetween(min_value=1),
        lambda value: "no records; the file is empty",
    )


def documents_suite(table: pd.DataFrame, params: ValidateParams) -> Suite:
    gxe = _gx().expectations
    suite = Suite("documents", DOCUMENTS_FILE, table, ["id", "line"])
    _row_count_rule(suite)
    _id_rules(suite)
    for name in ("title", "text"):
        suite.expect(
            f"{name}.type",
            name,
            gxe.ExpectColumnValuesToBeInSet(column=f"{name}_type", value_set=["a string"]),
            _type_reason("a string"),
        )
    suite.expect(
        "title.length",
        "title",
        gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1),
        _length_reason("title", 1, None, None, None),
    )
    suite.expect(
        "text.length",
        "text",
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=params.min_text_chars, max_value=params.max_text_chars
        ),
        _length_reason("text", params.min_text_chars, params.max_text_chars, "min_text_chars", "max_text_chars"),
    )
    return suite


def questions_suite(table: pd.DataFrame, params: ValidateParams) -> Suite:
    gxe = _gx().expectations
    suite = Suite("questions", QUESTIONS_FILE, table, ["id", "line"])
    _row_count_rule(suite)
    _id_rules(suite)
    for name, expected in (
        ("question", "a string"),
        ("answers", "a list of strings"),
        ("doc_ids", "a list of strings"),
        ("kind", "a string"),
    ):
        suite.expect(
            f"{name}.type",
            name,
            gxe.ExpectColumnValuesToBeInSet(column=f"{name}_type", value_set=[expected]),
            _type_reason(expected),
        )
    suite.expect(
        "question.length",
        "question",
        gxe.ExpectColumnValueLengthsToBeBetween(column="question", min_value=1, max_value=params.max_question_chars),
        _length_reason("question", 1, params.max_question_chars, None, "max_question_chars"),
    )
    suite.expect(
        "kind.known",
        "kind",
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(KINDS)),
        lambda value: f"unknown kind {value!r}; use one of {', '.join(KINDS)}",
    )

    from great_expectations.expectations.row_conditions import Column

    answerable = Column("kind").is_in(ANSWERABLE_KINDS)
    suite.expect(
        "answers.required",
        "answers",
        gxe.ExpectColumnValuesToBeBetween(column="n_answers", min_value=1, row_condition=answerable),
        lambda value: "answerable question has no non-empty answer; add one or make it kind=unanswerable",
    )
    suite.expect(
        "answers.forbidden",
        "answers",
        gxe.ExpectColumnValuesToBeBetween(
            column="n_answers", max_value=0, row_condition=Column("kind") == "unanswerable"
        ),
        lambda value: f"unanswerable question has {value} answer(s); its answers list must be empty",
    )
    suite.expect(
        "answers.blank",
        "answers",
        gxe.ExpectColumnValuesToBeBetween(column="n_blank_answers", max_value=0),
        lambda value: f"{value} blank answer(s); remove them",
    )
    suite.expect(
        "doc_ids.required",
        "doc_ids",
        gxe.ExpectColumnValuesToBeBetween(column="n_doc_ids", min_value=1, row_condition=answerable),
        lambda value: "answerable question cites no documents; list its source in doc_ids",
    )
    return suite


def doc_links_suite(table: pd.DataFrame, document_ids: list[str]) -> Suite:
    suite = Suite("doc_links", QUESTIONS_FILE, table, ["id", "line", "field"])
    suite.expect(
        "doc_ids.resolve",
        None,
        _gx().expectations.ExpectColumnValuesToBeInSet(column="doc_id", value_set=document_ids),
        lambda value: f"unknown document id {value!r}: no such id in {DOCUMENTS_FILE}",
    )
    return suite


def texts_suite(table: pd.DataFrame) -> Suite:
    gxe = _gx().expectations
    suite = Suite("texts", "", table, ["file", "id", "line", "field"])
    for rule, what, regex in (
        ("special_token", "a Llama special token", SPECIAL_TOKEN_REGEX),
        ("email", "an e-mail address", EMAIL_REGEX),
        ("phone", "a phone number", PHONE_REGEX),
    ):
        suite.expect(
            rule, None, gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=regex), _match_reason(what, regex)
        )
    suite.expect(
        "card_number", None, gxe.ExpectColumnValuesToBeNull(column="card_number"), lambda value: f"contains a {value}"
    )
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


def validate(
    documents: list[dict[str, Any]],
    questions: list[dict[str, Any]],
    params: ValidateParams,
    document_lines: list[int] | None = None,
    question_lines: list[int] | None = None,
) -> Validation:
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
    result = batch.validate(
        ge_suite, result_format={"result_format": _RESULT_FORMAT, "unexpected_index_column_names": suite.index_columns}
    )
    for outcome in result.results:
        info = outcome.exception_info or {}
        if info.get("raised_exception"):
            raise RuntimeError(
                f"Great Expectations could not evaluate {outcome.expectation_config.meta} "
                f"on the {suite.name} table: {info.get('exception_message')}"
            )
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
            failures.append(
                Failure(
                    file=_plain(row.get("file")) or suite.file,
                    line=int(line) if line is not None else None,
                    id=_plain(row.get("id")),
                    field=_plain(row.get("field")) or field_name,
                    reason=explain(_plain(row.get(column))),
                )
            )
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
        expectations.append(
            {
                "expectation": config.type,
                "rule": config.meta["rule"],
                "field": config.meta["field"],
                "kwargs": json.loads(json.dumps(kwargs, default=str)),
                "success": bool(outcome.success),
                "element_count": outcome.result.get("element_count"),
                "unexpected_count": outcome.result.get("unexpected_count", 0 if outcome.success else None),
                "unexpected_ids": sorted({str(_plain(r.get("id"))) for r in rows})[:_MAX_IDS_IN_REPORT],
            }
        )
    stats = result.statistics
    return {
        "rows": len(suite.table),
        "success": bool(result.success),
        "evaluated_expectations": stats["evaluated_expectations"],
        "successful_expectations": stats["successful_expectations"],
        "expectations": expectations,
    }
