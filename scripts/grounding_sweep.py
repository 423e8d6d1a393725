"""Which design choices make grounding learnable for the tiny default model?

Builds the tiny base and trains the LoRA adapter for each configuration with the same library
code the stages use, then scores RAG answers on the test split (token F1 on answerable
questions about held-out documents, abstention on unanswerable ones). Runs on CPU or GPU; on
a GPU a whole sweep takes minutes, and what matters for the CPU default is the number of
optimizer steps each configuration needs, which the results record.

    python scripts/grounding_sweep.py prepare            # CPU, needs the index: caches test passages
    python scripts/grounding_sweep.py run --out sweep.jsonl [--only NAME ...]

Reads data/validated/documents.jsonl, data/split/, data/sft/{train,val}.jsonl, params.yaml;
writes sweep/test_passages.jsonl (prepare) and one JSON line per configuration (run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

from veritune.core.config import parse_params
from veritune.core.io import read_json, read_jsonl, write_jsonl
from veritune.eval.evaluation import prompts_for, score_all, summarize_scores

PASSAGES = Path("sweep/test_passages.jsonl")

# name -> overrides of params.yaml sections (dotted keys)
CONFIGS: dict[str, dict[str, object]] = {
    "smoke": {"base.pretrain.steps": 2, "train.max_steps": 2, "base.tiny.num_layers": 1},
    "p150_e2": {"base.pretrain.steps": 150, "train.epochs": 2.0},
    "p400_e2": {"base.pretrain.steps": 400, "train.epochs": 2.0},
    "p400_e4": {"base.pretrain.steps": 400, "train.epochs": 4.0},
    "p0_e4": {"base.pretrain.steps": 0, "train.epochs": 4.0},
    "p400_norepeat_e4": {"base.pretrain.steps": 400, "base.pretrain.repeat_prob": 0.0, "train.epochs": 4.0},
    "p400_d384l6_e4": {
        "base.pretrain.steps": 400,
        "base.tiny.hidden_size": 384,
        "base.tiny.num_layers": 6,
        "base.tiny.intermediate_size": 1024,
        "train.epochs": 4.0,
    },
    "c3w120_p400_e12": {"_sft": "sweep/c3w120", "base.pretrain.steps": 400, "train.epochs": 12.0},
    "v1_c2_both_e4": {"_sft": "sweep/v1_c2_both", "base.pretrain.steps": 400, "train.epochs": 4.0},
    "v2_c2_end_e4": {"_sft": "sweep/v2_c2_end", "base.pretrain.steps": 400, "train.epochs": 4.0},
    "v3_c3_both_e4": {"_sft": "sweep/v3_c3_both", "base.pretrain.steps": 400, "train.epochs": 4.0},
    "v1_c2_both_e8": {"_sft": "sweep/v1_c2_both", "base.pretrain.steps": 400, "train.epochs": 8.0},
    "v1_c2_both_e2": {"_sft": "sweep/v1_c2_both", "base.pretrain.steps": 400, "train.epochs": 2.0},
    "h50_e4": {"_sft": "sweep/h50", "base.pretrain.steps": 400, "train.epochs": 4.0},
    "h0_e4": {"_sft": "sweep/h0", "base.pretrain.steps": 400, "train.epochs": 4.0},
}


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    raw = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = raw
        *path, leaf = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def prepare() -> None:
    from veritune.retrieval.search import Retriever

    raw = yaml.safe_load(Path("params.yaml").read_text())
    ip, sp = parse_params("index", raw["index"]), parse_params("build_sft", raw["build_sft"])
    questions = read_jsonl("data/split/questions_test.jsonl")
    with Retriever(ip.uri, ip.collection, ip.embedding_model) as retriever:
        hits = retriever.search([q["question"] for q in questions], k=sp.context_chunks)
    write_jsonl(
        PASSAGES, [{"id": q["id"], "passages": [dataclasses.asdict(h) for h in row]} for q, row in zip(questions, hits)]
    )


def run_one(name: str, overrides: dict[str, object], raw: dict) -> dict:
    import torch
    from peft import PeftModel

    from veritune.infer.decode import generate
    from veritune.model.modeling import load_model, load_tokenizer
    from veritune.model.pretrain import build_tiny_base
    from veritune.train.training import train_adapter

    # The tiny model is small enough for bf16 LoRA on any GPU; nf4 would only add noise.
    overrides = dict(overrides)
    sft_dir = Path(overrides.pop("_sft", "data/sft"))
    passages_file = sft_dir / "test_passages.jsonl" if (sft_dir / "test_passages.jsonl").exists() else PASSAGES
    raw = with_overrides(raw, {"train.quantization": "none", **overrides})
    bp, tp = parse_params("base", raw["base"]), parse_params("train", raw["train"])
    sp, ep = parse_params("build_sft", raw["build_sft"]), parse_params("evaluate", raw["evaluate"])
    documents = read_jsonl("data/validated/documents.jsonl")
    doc_split = read_json("data/split/doc_split.json")
    questions = read_jsonl("data/split/questions_test.jsonl")
    passages = {r["id"]: r["passages"] for r in read_jsonl(passages_file)}
    result: dict = {
        "name": name,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapter_dir = Path(tmp) / "base", Path(tmp) / "adapter"
        base_dir.mkdir()
        start = time.time()
        result["base"] = build_tiny_base(documents, doc_split, bp, base_dir)
        result["train"] = train_adapter(
            base_dir,
            read_jsonl(sft_dir / "train.jsonl"),
            read_jsonl(sft_dir / "val.jsonl"),
            tp,
            adapter_dir,
            Path(tmp) / "checkpoints",
        )
        model = PeftModel.from_pretrained(load_model(base_dir), adapter_dir)
        if torch.cuda.is_available():
            model = model.to("cuda")
        tokenizer = load_tokenizer(adapter_dir)
        built = (
            json.loads((sft_dir / "sft_config.json").read_text())["build_sft"]
            if (sft_dir / "sft_config.json").exists()
            else {}
        )
        convs = prompts_for(
            questions, [passages[q["id"]] for q in questions], sp.system_prompt, built.get("question_position", "end")
        )
        replies = generate(model, tokenizer, convs, ep.max_new_tokens, 64, desc=name)
        summary = summarize_scores(questions, score_all(replies, questions), 200)
        result["seconds"] = round(time.time() - start, 1)
    result["rag"] = {g: summary.get(g) for g in ("answerable_unseen", "answerable_seen", "multi_hop", "unanswerable")}
    result["examples"] = [
        {"q": q["question"], "gold": q["answers"], "pred": r} for q, r in list(zip(questions, replies))[:5]
    ]
    return result


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "run"])
    parser.add_argument("--out", default="sweep/results.jsonl")
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
        return
    raw = yaml.safe_load(Path("params.yaml").read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(CONFIGS):
        result = run_one(name, CONFIGS[name], raw)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        r = result["rag"]
        print(
            f"{name:28s} F1 unseen {r['answerable_unseen']['f1']:.3f}  seen {r['answerable_seen']['f1']:.3f}  "
            f"abstain {r['unanswerable']['abstention']:.3f}  false-abstain {r['answerable_unseen']['abstention']:.3f}  "
            f"steps {result['train']['steps']}  val_loss {result['train']['val_loss']:.3f}  "
            f"{result['seconds']}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
