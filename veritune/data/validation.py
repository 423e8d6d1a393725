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
`card_number`, ...) and the expectations (`veritune.data.suites`) sit on those. Every
unexpected row becomes a `Failure(file, line, id, field, reason)`; each expectation's `meta`
names the rule that turns its unexpected value into a reason a person can act on.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from veritune.core.config import as_dict
from veritune.core.params import ValidateParams
from veritune.data.records import Failure, doc_links_table, documents_table, questions_table, texts_table
from veritune.data.suites import KINDS, Suite, doc_links_suite, documents_suite, import_gx, questions_suite, texts_suite

log = logging.getLogger(__name__)

_RESULT_FORMAT = "COMPLETE"  # unexpected_index_list names every failing row, not a sample
_MAX_IDS_IN_REPORT = 20


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


def _context():
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = import_gx().get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _run(context: Any, source: Any, suite: Suite) -> Any:
    gx = import_gx()
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
