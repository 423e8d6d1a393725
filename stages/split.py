"""Stage `split`: train / val / test by document, with a leak check.

    python stages/split.py

Reads data/validated/{documents,questions}.jsonl and params `split`; writes
data/split/questions_{train,val,test}.jsonl, data/split/doc_split.json and metrics/split.json.
"""

import logging

from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.data.splitting import SPLITS, assign_documents, assign_questions, check_no_leak, split_summary

log = logging.getLogger("veritune.split")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("split")
    documents = read_jsonl("data/validated/documents.jsonl")
    questions = read_jsonl("data/validated/questions.jsonl")
    doc_split = assign_documents(documents, questions, p)
    split_questions = assign_questions(questions, doc_split, p)
    check_no_leak(split_questions, doc_split)
    summary = split_summary(split_questions, doc_split)
    with atomic_path("data/split") as out:
        out.mkdir()
        for split in SPLITS:
            write_jsonl(out / f"questions_{split}.jsonl", split_questions[split])
        write_json(out / "doc_split.json", doc_split)
        write_json(out / "split_config.json", as_dict(p))
    write_json("metrics/split.json", summary)
    log.info("split: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
