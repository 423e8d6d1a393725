"""The data contract as Great Expectations suites, one per table of `veritune.data.records`.

Each expectation's `meta` names the rule that turns its unexpected value into a reason a
person can act on (`Suite.expect(rule, field, expectation, explain)`); `veritune.data.validation`
runs the suites and turns every unexpected row into a `Failure`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from veritune.core.params import ValidateParams
from veritune.data.records import DOCUMENTS_FILE, QUESTIONS_FILE

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


def import_gx():
    # Imported on first use: GE takes seconds to import, and reading records should not wait.
    # Its INFO chatter starts during the import, and some of its modules pin their own
    # loggers to INFO, so every GE logger is quietened, before and after.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.NOTSET)  # defer to the WARNING above
    return gx


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
    gxe = import_gx().expectations
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
        import_gx().expectations.ExpectTableRowCountToBeBetween(min_value=1),
        lambda value: "no records; the file is empty",
    )


def documents_suite(table: pd.DataFrame, params: ValidateParams) -> Suite:
    gxe = import_gx().expectations
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
    gxe = import_gx().expectations
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
        import_gx().expectations.ExpectColumnValuesToBeInSet(column="doc_id", value_set=document_ids),
        lambda value: f"unknown document id {value!r}: no such id in {DOCUMENTS_FILE}",
    )
    return suite


def texts_suite(table: pd.DataFrame) -> Suite:
    gxe = import_gx().expectations
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
