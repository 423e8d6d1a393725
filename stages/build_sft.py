"""Stage `build_sft`: RAFT-style grounded-QA conversations for fine-tuning.

    python stages/build_sft.py

Reads data/split/questions_{train,val}.jsonl, data/split/doc_split.json (held-out documents
are never shown in training prompts), the index in data/index/, the shop database and train
agent tasks in data/agent/ and params `build_sft`, `index` and `agent_db`; writes
data/sft/{train,val}.jsonl (chat messages: one example per question, plus
`agent_samples_per_task` tool trajectories per train agent task in train) with
sft_config.json, and metrics/build_sft.json.
"""

import dataclasses
import json
import logging
from datetime import date
from pathlib import Path

from veritune.config import as_dict, load_params
from veritune.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.retrieval import open_retriever
from veritune.sft import build_agent_examples, build_examples
from veritune.tools import kb_search

log = logging.getLogger("veritune.build_sft")

VISIBLE_SPLITS = {"train": {"train"}, "val": {"train", "val"}}  # documents each split's prompts may show


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("build_sft")
    ip = load_params("index")
    ap = load_params("agent_db")
    agent_tasks = read_jsonl("data/agent/tasks_train.jsonl")
    chunks = read_jsonl("data/index/chunks.jsonl")
    doc_split = json.loads(Path("data/split/doc_split.json").read_text(encoding="utf-8"))
    splits = {s: read_jsonl(f"data/split/questions_{s}.jsonl") for s in ("train", "val")}
    summary = {}
    with open_retriever(ip) as retriever, atomic_path("data/sft") as out:
        out.mkdir()
        for split, questions in splits.items():
            # Held-out documents never reach a training prompt, not even as a distractor: the
            # test measures grounding on text the model has never read. Val examples may read
            # val documents (their oracles), never test ones.
            readable = {d for d, s in doc_split.items() if s in VISIBLE_SPLITS[split]}
            hits = retriever.search([q["question"] for q in questions], k=2 * p.retrieval_pool)
            retrieved = [[dataclasses.asdict(h) for h in row if h.doc_id in readable][: p.retrieval_pool]
                         for row in hits]
            # Validation keeps one conversation per question so its loss stays comparable.
            examples = build_examples(questions, retrieved, [c for c in chunks if c["doc_id"] in readable], p,
                                      samples_per_question=p.samples_per_question if split == "train" else 1)
            # Validation stays QA-only so its loss compares across runs with and without tools.
            agent_examples = []
            if split == "train" and p.agent_samples_per_task:
                agent_examples = build_agent_examples(agent_tasks, "data/agent/business.sqlite",
                                                      kb_search(retriever, p.agent_search_k, readable), p,
                                                      date.fromisoformat(ap.today))
            write_jsonl(out / f"{split}.jsonl", examples + agent_examples)
            summary[split] = {
                "agent_trajectories": len(agent_examples),
                "n_examples": len(examples),
                "with_oracle": sum(e["has_oracle"] for e in examples),
                "abstain_targets": sum(e["messages"][-1]["content"] == p.abstain_answer for e in examples),
                "abstain_turns": sum(m["role"] == "assistant" and m["content"] == p.abstain_answer
                                     for e in examples for m in e["messages"]),
                "mean_prompt_chars": round(sum(len(e["messages"][1]["content"]) for e in examples)
                                           / max(1, len(examples))),
            }
        write_json(out / "sft_config.json", {"build_sft": as_dict(p), "index": as_dict(ip), "agent_db": as_dict(ap)})
    write_json("metrics/build_sft.json", summary)
    log.info("build_sft: %s", summary)


if __name__ == "__main__":
    main()
