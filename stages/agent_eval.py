"""Stage `agent_eval`: tau-bench style evaluation of tool-using workflows.

    python stages/agent_eval.py

Reads models/base/, models/adapter/, data/index/ (search_kb), data/agent/ (the shop
database and tasks) and params `agent_eval`, `agent_db`, `build_sft` (system prompt, tool
definitions, search size) and `index`. Runs a scripted oracle over every task (it must
score 1.0, or the tasks and the checker disagree and the stage fails), then the base and
the fine-tuned model over the test tasks, `trials` sampled episodes each, every episode on
its own copy of the database and as the task's own customer (tools scoped to that
customer's orders, at most `agent_eval.max_writes` rows written). Writes metrics/agent.json
(success, pass^k, tool-call validity, mean steps, unsafe-action rate and claimed-but-undone
rate, the share of answers claiming a refund, ticket or cancellation the episode's writes do
not show, per policy) and reports/agent/ (episodes.jsonl, agent.md).
"""

import logging
from collections import defaultdict
from datetime import date

from veritune.agent.loop import AgentLimits
from veritune.agent.policies import ModelPolicy, OraclePolicy
from veritune.agent.shop import SHOP_DB
from veritune.agent.specs import TOOLS, tool_definitions
from veritune.agent.tasks import evaluate_policy, summarize_episodes
from veritune.agent.tools import kb_search
from veritune.core import chat
from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_jsonl, write_json, write_jsonl
from veritune.infer.constraints import ToolCallGrammar
from veritune.model.modeling import load_model, load_tokenizer
from veritune.retrieval.search import open_retriever

log = logging.getLogger("veritune.agent_eval")


def report_lines(metrics: dict, per_kind: dict) -> list[str]:
    keys = [
        "success",
        *[f"pass^{k}" for k in range(1, metrics["trials"] + 1)],
        "tool_call_validity",
        "mean_steps",
        "unsafe_action_rate",
        "claimed_undone_rate",
        "state_ok",
        "answer_ok",
    ]
    columns = [("oracle", "oracle"), ("base", "base"), ("finetuned", "fine-tuned")]
    if "finetuned_unconstrained" in metrics:
        columns.append(("finetuned_unconstrained", "fine-tuned, free decoding"))
    constrained = metrics["finetuned"].get("constrained_calls")
    lines = [
        "# Agent evaluation",
        "",
        f"{metrics['n_test_tasks']} test tasks x {metrics['trials']} trials for the fine-tuned model, "
        f"{metrics.get('base_trials', metrics['trials'])} for the base "
        f"(oracle: all {metrics['oracle']['episodes']} tasks, one trial).",
        "Tool calls are decoded under the tools' JSON-schema grammar (`agent_eval.constrained_calls`): "
        "the model picks the tool and every value, the grammar keeps the call well formed."
        if constrained
        else "Tool calls are decoded freely (`agent_eval.constrained_calls: false`).",
        "",
        "| metric | " + " | ".join(title for _, title in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(metrics[name].get(k)) for name, _ in columns) + " |")
    lines += ["", "## Success by task kind (fine-tuned)", "", "| kind | success |", "|---|---|"]
    lines += [f"| {kind} | {v:.3f} |" for kind, v in sorted(per_kind.items())]
    return lines


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from peft import PeftModel

    p = load_params("agent_eval")
    ap = load_params("agent_db")
    sp = load_params("build_sft")
    ip = load_params("index")
    today = date.fromisoformat(ap.today)
    tools = tool_definitions(sp.agent_tool_definitions)
    limits = AgentLimits(max_steps=p.max_steps, max_retries=p.max_retries, max_seconds=p.max_seconds)
    all_tasks = read_jsonl("data/agent/tasks_train.jsonl") + read_jsonl("data/agent/tasks_test.jsonl")
    tasks = read_jsonl("data/agent/tasks_test.jsonl")
    if p.max_tasks:
        tasks = tasks[: p.max_tasks]
    metrics: dict = {"n_test_tasks": len(tasks), "trials": p.trials, "base_trials": p.base_trials}
    episodes: list[dict] = []
    tokenizer = load_tokenizer("models/adapter")
    with open_retriever(ip) as retriever:
        search = kb_search(retriever, sp.agent_search_k)
        # Episodes in the checkpoint's own tool-calling format (Llama 3.1's or ChatML's).
        run = dict(
            db_path=SHOP_DB,
            search=search,
            limits=limits,
            system_prompt=sp.agent_system_prompt,
            tools=tools,
            today=today,
            max_writes=p.max_writes,
            fmt=chat.chat_format(tokenizer),
        )
        # The oracle needs as many turns as the longest workflow, whatever the models get.
        oracle_limits = AgentLimits(
            max_steps=max(len(t["gold_calls"]) for t in all_tasks) + 1, max_retries=0, max_seconds=p.max_seconds
        )
        oracle = evaluate_policy(OraclePolicy(all_tasks), all_tasks, desc="oracle", **{**run, "limits": oracle_limits})
        metrics["oracle"] = summarize_episodes(oracle, 1)
        if metrics["oracle"]["success"] != 1.0:
            failed = [r["task_id"] for r in oracle if not r["success"]]
            raise RuntimeError(f"the scripted oracle fails tasks {failed[:10]}: the tasks, tools and checker disagree")
        if metrics["oracle"]["claimed_undone_rate"] != 0.0:
            misread = [r["task_id"] for r in oracle if r["claimed_undone"]]
            raise RuntimeError(
                f"gold answers of tasks {misread[:10]} read as claims their gold calls do not back: "
                "fix veritune.agent.tasks.CLAIMS or the tasks"
            )

        model = load_model("models/base")
        grammar = (
            ToolCallGrammar(tokenizer, model.config.vocab_size, TOOLS, max_string_chars=p.max_string_chars)
            if p.constrained_calls
            else None
        )
        # (name, constrained?): both models decode as configured; the fine-tuned one also freely
        # when asked, so the report shows what the grammar adds and what the weights do alone.
        variants = [("base", grammar), ("finetuned", grammar)]
        if grammar is not None and p.compare_unconstrained:
            variants.append(("finetuned_unconstrained", None))
        for variant, variant_grammar in variants:
            if variant == "finetuned":
                model = PeftModel.from_pretrained(model, "models/adapter").merge_and_unload()
            model.eval()
            policy = ModelPolicy(
                model, tokenizer, p.max_new_tokens, p.batch_size, p.temperature, p.seed, grammar=variant_grammar
            )
            trials = p.base_trials if variant == "base" else p.trials
            results = evaluate_policy(
                policy,
                tasks,
                trials=trials,
                desc=variant,
                on_trial=lambda i, policy=policy: policy.reseed(p.seed + i),
                **run,
            )
            metrics[variant] = {
                **summarize_episodes(results, trials),
                "constrained_calls": variant_grammar is not None,
            }
            episodes += [{"policy": variant, **r} for r in results]
    per_kind: dict[str, list[bool]] = defaultdict(list)
    for r in episodes:
        if r["policy"] == "finetuned":
            per_kind[r["kind"]].append(r["success"])
    per_kind_rate = {k: sum(v) / len(v) for k, v in per_kind.items()}
    metrics["finetuned_success_by_kind"] = dict(sorted(per_kind_rate.items()))
    write_json("metrics/agent.json", metrics)
    with atomic_path("reports/agent") as out:
        out.mkdir()
        write_jsonl(out / "episodes.jsonl", episodes)
        (out / "agent.md").write_text("\n".join(report_lines(metrics, per_kind_rate)) + "\n", encoding="utf-8")
        write_json(
            out / "agent_config.json",
            {
                "agent_eval": as_dict(p),
                "agent_db": as_dict(ap),
                "build_sft": as_dict(sp),
                "index": as_dict(ip),
                "today_header": chat.header_date(today),
            },
        )
    log.info("agent_eval: base %s", metrics["base"])
    log.info("agent_eval: fine-tuned %s", metrics["finetuned"])


if __name__ == "__main__":
    main()
