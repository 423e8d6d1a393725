"""The raw files as records and tables: what `validate` checks, and the failures it reports.

`read_raw` reads a JSON Lines file with each record's line number (a line that is not a JSON
object is a `Failure` of its own); the `*_table` functions turn the records into the pandas
tables the Great Expectations suites run on, with derived columns where the raw JSON cannot be
checked directly (a missing field, a list holding a number, a payment-card number). Every
problem is a `Failure(file, line, id, field, reason)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from veritune.core.io import JsonlError, read_jsonl

DOCUMENTS_FILE = "documents.jsonl"
QUESTIONS_FILE = "questions.jsonl"

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
        rows.append(
            {
                "line": line,
                "id": _string(doc, "id"),
                "id_type": _json_type(doc, "id"),
                "title_type": _json_type(doc, "title"),
                "text_type": _json_type(doc, "text"),
                # Lengths are taken after stripping, so a blank field reads as an empty one.
                "title": title.strip() if title is not None else None,
                "text": text.strip() if text is not None else None,
            }
        )
    columns = ["line", "id", "id_type", "title_type", "text_type", "title", "text"]
    return pd.DataFrame(rows, columns=columns)


def questions_table(questions: list[dict[str, Any]], lines: list[int]) -> pd.DataFrame:
    rows = []
    for line, q in zip(lines, questions):
        question = _string(q, "question")
        answers = _string_list(q, "answers")
        doc_ids = _string_list(q, "doc_ids")
        rows.append(
            {
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
            }
        )
    columns = [
        "line",
        "id",
        "id_type",
        "question_type",
        "answers_type",
        "doc_ids_type",
        "kind_type",
        "question",
        "kind",
        "n_answers",
        "n_blank_answers",
        "n_doc_ids",
    ]
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


def texts_table(
    documents: list[dict[str, Any]],
    document_lines: list[int],
    questions: list[dict[str, Any]],
    question_lines: list[int],
) -> pd.DataFrame:
    rows = []

    def add(file: str, line: int, record: dict[str, Any], name: str, text: Any) -> None:
        if isinstance(text, str):
            rows.append(
                {
                    "file": file,
                    "line": line,
                    "id": _string(record, "id"),
                    "field": name,
                    "text": text,
                    "card_number": find_card_number(text),
                }
            )

    for line, doc in zip(document_lines, documents):
        add(DOCUMENTS_FILE, line, doc, "title", doc.get("title"))
        add(DOCUMENTS_FILE, line, doc, "text", doc.get("text"))
    for line, q in zip(question_lines, questions):
        add(QUESTIONS_FILE, line, q, "question", q.get("question"))
        answers = q.get("answers")
        for i, answer in enumerate(answers if isinstance(answers, list) else []):
            add(QUESTIONS_FILE, line, q, f"answers[{i}]", answer)
    return pd.DataFrame(rows, columns=["file", "line", "id", "field", "text", "card_number"], dtype=object)
