"""The fine-tuned model's first reply to each agent test request: a tool call, and a valid one?

    python bench/first_tool_calls.py [--temperatures 0,0.3,0.7] [--samples 2]

Reads models/base + models/adapter, data/agent/tasks_test.jsonl and params `build_sft`,
`agent_db`; renders each request exactly as `agent_eval` does (`chat.tool_messages`) and asks
`ModelPolicy` for one turn. A reply is valid when `parse_reply` reads a call and `check_call`
accepts its tool and arguments (the checks the agent loop applies). Temperature 0 is greedy
(one sample). Prints one JSON line per temperature. CPU is fine (seconds per temperature).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.agent.loop import parse_reply  # noqa: E402
from veritune.agent.policies import ModelPolicy  # noqa: E402
from veritune.agent.specs import ToolError, check_call, tool_definitions  # noqa: E402
from veritune.core import chat  # noqa: E402
from veritune.core.config import load_params  # noqa: E402
from veritune.core.io import read_jsonl  # noqa: E402
from veritune.model.modeling import load_model, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperatures", default="0,0.3,0.7")
    ap.add_argument("--samples", type=int, default=2, help="sampled replies per request and temperature")
    args = ap.parse_args()
    from peft import PeftModel

    sp, dp = load_params("build_sft"), load_params("agent_db")
    model = PeftModel.from_pretrained(load_model("models/base"), "models/adapter").merge_and_unload().eval()
    tokenizer = load_tokenizer("models/adapter")
    today = chat.header_date(date.fromisoformat(dp.today))
    tools = tool_definitions(sp.agent_tool_definitions)
    requests = [
        SimpleNamespace(
            messages=chat.tool_messages(
                sp.agent_system_prompt, tools, chat.neutralize_special_tokens(t["request"]), today
            )
        )
        for t in read_jsonl("data/agent/tasks_test.jsonl")
    ]
    for temperature in (float(t) for t in args.temperatures.split(",")):
        policy = ModelPolicy(model, tokenizer, max_new_tokens=64, batch_size=36, temperature=temperature, seed=0)
        torch.manual_seed(0)
        replies = [r for _ in range(1 if temperature == 0 else args.samples) for r in policy(requests)]
        calls = [parse_reply(r) for r in replies]
        valid = 0
        for c in calls:
            if c.kind == "call":
                try:
                    check_call(c.name, c.parameters)
                    valid += 1
                except ToolError:
                    pass
        print(
            json.dumps(
                {
                    "temperature": temperature,
                    "replies": len(replies),
                    "calls": round(sum(c.kind != "answer" for c in calls) / len(calls), 3),
                    "valid_calls": round(valid / len(calls), 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
