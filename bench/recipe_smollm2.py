"""Recipe sweep for the embedded default (SmolLM2-135M-Instruct): which training budget pays.

    python bench/recipe_smollm2.py GGUF SWEEP_DIR OUT_JSONL NAME:key=value,key=value ...

Runs the project's own code for each configuration: `veritune.training.train_adapter` (TRL +
PEFT, params `train` from params.yaml with the configuration's overrides), then RAG answers on
the test split with the passages `evaluate` retrieves (precomputed into SWEEP_DIR, hybrid top
2), scored by `veritune.evaluation`, and the agent test tasks (constrained calls, no search
tool: a relative measure only). SWEEP_DIR holds train.jsonl and val.jsonl (data/sft),
test_passages.json ({"questions", "passages": {mode: [...]}}) and agent/ (data/agent).

Keys: steps, bs, lr, r, agent_copies (agent trajectories kept per train task, of those built; all by default),
agent_dup (each kept trajectory repeated n times),
turns (QA turns per conversation kept), data (a subfolder of SWEEP_DIR with its own
train.jsonl and val.jsonl: another build_sft variant). SWEEP_AGENT_TRIALS=0 skips the agent tasks. Each line of
OUT_JSONL holds a configuration, its trained tokens (CPU time ~ tokens / 380 per second on the
2-core CPU) and its scores. A measurement, not a stage: the GPU makes the sweep fast; the
default's own numbers come from `make repro` on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune import chat  # noqa: E402
from veritune.config import load_params  # noqa: E402
from veritune.evaluation import prompts_for, score_all, summarize  # noqa: E402
from veritune.generation import generate  # noqa: E402
from veritune.io import read_jsonl  # noqa: E402
from veritune.modeling import PACKAGED, load_model, load_tokenizer, materialize_gguf  # noqa: E402
from veritune.training import train_adapter  # noqa: E402


TRIALS = int(os.environ.get("SWEEP_AGENT_TRIALS", "2"))


def trim_turns(example: dict, turns: int) -> dict:
    """Keep the first `turns` question/answer pairs of a QA conversation."""
    if example["kind"] == "agent":
        return example
    messages, answers = [], 0
    for m in example["messages"]:
        if m["role"] == "assistant":
            answers += 1
        messages.append(m)
        if m["role"] == "assistant" and answers >= turns:
            break
    return {**example, "messages": messages}


def agent_scores(model, tokenizer, sweep: Path) -> dict:
    from veritune.agent import AgentLimits, ModelPolicy
    from veritune.agent_tasks import evaluate_policy, summarise
    from veritune.constrained import ToolCallGrammar
    from veritune.tools import tool_definitions

    sp, ap, ep = (load_params(s) for s in ("build_sft", "agent_db", "agent_eval"))
    tasks = read_jsonl(sweep / "agent/tasks_test.jsonl")
    grammar = ToolCallGrammar(tokenizer, model.config.vocab_size, max_string_chars=ep.max_string_chars)
    policy = ModelPolicy(model, tokenizer, ep.max_new_tokens, 64, ep.temperature, ep.seed, grammar=grammar)
    results = evaluate_policy(policy, tasks, sweep / "agent/business.sqlite", None,
                              AgentLimits(ep.max_steps, ep.max_retries, ep.max_seconds), sp.agent_system_prompt,
                              tool_definitions(sp.agent_tool_definitions), date.fromisoformat(ap.today), trials=TRIALS,
                              on_trial=lambda i: policy.reseed(ep.seed + i), fmt=chat.chat_format(tokenizer))
    s = summarise(results, TRIALS)
    return {**{k: s[k] for k in ("success", "tool_call_validity", "answer_ok", "state_ok", "mean_steps")},
            "examples": [(r["task_id"], r["answer"], r["missing_facts"]) for r in results[:6]]}


def qa_scores(model, tokenizer, data: dict, mode: str) -> dict:
    sp = load_params("build_sft")
    questions, passages = data["questions"], data["passages"][mode]
    convs = prompts_for(questions, passages, sp.system_prompt, sp.question_position)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        replies = generate(model, tokenizer, convs, 24, 128, desc=mode)
    s = summarize(questions, score_all(replies, questions, passages), 200)
    pick = lambda g, k: s.get(g, {}).get(k)  # noqa: E731
    return {"f1_unseen": pick("answerable_unseen", "f1"), "f1_answerable": pick("answerable", "f1"),
            "f1_multi_hop": pick("multi_hop", "f1"), "f1_single_hop": pick("single_hop", "f1"),
            "abstain_unanswerable": pick("unanswerable", "abstention"),
            "abstain_low": pick("unanswerable", "abstention_ci95_low"),
            "wrong_refusal": pick("answerable", "abstention"),
            "unsupported_answerable": pick("answerable", "unsupported_rate"),
            "examples": [(q["question"], q["answers"][:1], r) for q, r in list(zip(questions, replies))[::60]]}


def main() -> None:
    gguf, sweep, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    configs = []
    for arg in sys.argv[4:]:
        name, _, rest = arg.partition(":")
        configs.append((name, dict(kv.split("=") for kv in rest.split(",") if kv)))
    base = Path(tempfile.mkdtemp()) / "base"
    entry = PACKAGED["smollm2-135m-instruct"]
    materialize_gguf(gguf, entry.sha256, base)
    data = json.loads((sweep / "test_passages.json").read_text())
    tokenizer = load_tokenizer(base)
    if "base" in [n for n, _ in configs]:
        model = load_model(base).eval()
        row = {"name": "base", **qa_scores(model, tokenizer, data, "hybrid"),
               "agent": agent_scores(model, tokenizer, sweep) if TRIALS else None}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for name, cfg in configs:
        if name == "base":
            continue
        p = load_params("train")
        p = dataclasses.replace(p, quantization="none", max_steps=int(cfg.get("steps", p.max_steps)),
                                batch_size=int(cfg.get("bs", p.batch_size)),
                                learning_rate=float(cfg.get("lr", p.learning_rate)),
                                lora_r=int(cfg.get("r", p.lora_r)), lora_alpha=2 * int(cfg.get("r", p.lora_r)),
                                save_steps=100000, fused_lora=False, liger=False)
        data_dir = sweep / cfg.get("data", ".")
        train_all, val = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl")
        copies = int(cfg.get("agent_copies", 99))
        turns = int(cfg.get("turns", 99))
        train = [trim_turns(e, turns) for e in train_all
                 if e["kind"] != "agent" or int(e["id"].rsplit("-", 1)[1]) < copies]
        # agent_dup: each kept trajectory n times (a larger share of agent rows in every batch)
        train += [e for e in train if e["kind"] == "agent"] * (int(cfg.get("agent_dup", 1)) - 1)
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            adapter = Path(tmp) / "adapter"
            adapter.mkdir()
            summary = train_adapter(base, train, val[:32], p, adapter, Path(tmp) / "ckpt")
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload().eval()
        seconds = time.time() - start
        # Tokens the optimizer saw: steps x batch x mean example length (bucketed sampling draws evenly).
        lengths = [len(r) for r in (tokenizer(chat.render_conversation(tokenizer, chat.formatted_messages(
            chat.chat_format(tokenizer), e["messages"], e.get("tools"), e.get("today", chat.TODAY_DATE))),
            add_special_tokens=False)["input_ids"] for e in train)]
        tokens = round(p.max_steps * p.batch_size * sum(lengths) / len(lengths))
        row = {"name": name, "cfg": cfg, "n_train": len(train), "train_tokens": tokens,
               "cpu_minutes_est": round(tokens / 380 / 60, 1), "gpu_seconds": round(seconds, 1),
               "train_loss": summary["train_loss"], **qa_scores(model, tokenizer, data, "hybrid"),
               "agent": agent_scores(model, tokenizer, sweep) if TRIALS else None}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
