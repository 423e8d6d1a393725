"""Stage `validate`: check the raw corpus against the data contract before anything trains on it.

Run from the project root: `python stages/validate.py` (or `dvc repro validate`).

Reads   params.yaml `validate:` (min_text_chars, max_text_chars, max_question_chars)
        data/raw/documents.jsonl, data/raw/questions.jsonl
Writes  data/validated/documents.jsonl, data/validated/questions.jsonl  (the records as read)
        metrics/validate.json     record counts by kind, n_failures (always 0 when written)
        reports/validation.json   every Great Expectations expectation, its outcome and counts

The checks live in `veritune.data.validation`. If any record breaks the contract, every problem
is printed to stderr as `questions.jsonl:12 id=q-0042 field=doc_ids[0]: unknown document id
'doc-9999' ...`, nothing is written, and the stage exits with status 1.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from veritune.core.config import load_params
from veritune.core.io import write_json, write_jsonl
from veritune.data.records import DOCUMENTS_FILE, QUESTIONS_FILE, format_failures, read_raw
from veritune.data.validation import validate

RAW_DIR = Path("data/raw")
VALIDATED_DIR = Path("data/validated")
METRICS_FILE = Path("metrics/validate.json")
REPORT_FILE = Path("reports/validation.json")
MAX_REPORTED = 200  # enough to see the pattern of a bad export without flooding the terminal

log = logging.getLogger("validate")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    params = load_params("validate")
    for name in (DOCUMENTS_FILE, QUESTIONS_FILE):
        if not (RAW_DIR / name).exists():
            raise FileNotFoundError(
                f"{RAW_DIR / name} not found: put the raw corpus there (see data/raw/) and run from the project root"
            )

    documents, document_lines, failures = read_raw(RAW_DIR / DOCUMENTS_FILE)
    questions, question_lines, question_failures = read_raw(RAW_DIR / QUESTIONS_FILE)
    failures += question_failures
    if not failures:  # the contract checks need both files parsed
        log.info("checking %d documents and %d questions", len(documents), len(questions))
        result = validate(documents, questions, params, document_lines, question_lines)
        failures = result.failures

    if failures:
        for line in format_failures(failures, limit=MAX_REPORTED):
            print(line, file=sys.stderr)
        log.error(
            "validation failed: %d problems in %s; fix the records above and rerun. Nothing was written.",
            len(set(failures)),
            RAW_DIR,
        )
        raise SystemExit(1)

    write_jsonl(VALIDATED_DIR / DOCUMENTS_FILE, documents)
    write_jsonl(VALIDATED_DIR / QUESTIONS_FILE, questions)
    write_json(METRICS_FILE, result.metrics)
    write_json(REPORT_FILE, result.report)
    log.info(
        "all %d expectations passed on %d documents and %d questions in %.1fs",
        result.metrics["n_expectations"],
        len(documents),
        len(questions),
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
