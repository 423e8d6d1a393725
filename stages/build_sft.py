"""Stage `build_sft`: RAFT-style grounded-QA conversations for fine-tuning.

    python stages/build_sft.py

Reads data/split/questions_{train,val}.jsonl, the index in data/index/ and params
`build_sft` and `index`; writes data/sft/{train,val}.jsonl (chat messages, one example per
question) with sft_config.json, and metrics/build_sft.json.
"""

import dataclasses
import logging

from veritune.config import as_dict, load_params
from veritune.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.retrieval import Retriever
from veritune.sft import build_examples

log = logging.getLogger("veritune.build_sft")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("build_sft")
    ip = load_params("index")
    chunks = read_jsonl("data/index/chunks.jsonl")
    splits = {s: read_jsonl(f"data/split/questions_{s}.jsonl") for s in ("train", "val")}
    summary = {}
    with Retriever(ip.uri, ip.collection, ip.embedding_model) as retriever, atomic_path("data/sft") as out:
        out.mkdir()
        for split, questions in splits.items():
            hits = retriever.search([q["question"] for q in questions], k=p.retrieval_pool)
            retrieved = [[dataclasses.asdict(h) for h in row] for row in hits]
            # Validation keeps one conversation per question so its loss stays comparable.
            examples = build_examples(questions, retrieved, chunks, p,
                                      samples_per_question=p.samples_per_question if split == "train" else 1)
            write_jsonl(out / f"{split}.jsonl", examples)
            summary[split] = {
                "n_examples": len(examples),
                "with_oracle": sum(e["has_oracle"] for e in examples),
                "abstain_targets": sum(e["messages"][-1]["content"] == p.abstain_answer for e in examples),
                "mean_prompt_chars": round(sum(len(e["messages"][1]["content"]) for e in examples)
                                           / max(1, len(examples))),
            }
        write_json(out / "sft_config.json", {"build_sft": as_dict(p), "index": as_dict(ip)})
    write_json("metrics/build_sft.json", summary)
    log.info("build_sft: %s", summary)


if __name__ == "__main__":
    main()
