"""The `veritune` command line.

    veritune score answers.jsonl [-o scored.jsonl] [--threshold 0.8]
    veritune serve [--host H] [--port P] [--max-batch-size N] [...]
    veritune agent "Where is my order 1042?" --customer C-101 [--adapter models/adapter | --adapter none]

`score` reads JSON Lines records with `question`, `contexts` (strings or {"text": ...}
objects) and `answer`, and writes each record back with a `groundedness` field
(see `veritune.eval.groundedness.score_groundedness`) to `-o`, by default
`<input stem>.scored.jsonl` beside the input. The file is written atomically; a one-line
summary goes to stderr. Exit status 2 on a missing file or a bad record.

`serve` runs the OpenAI-compatible HTTP API over the released model (see
`veritune.serve.app`): params.yaml `serve` (flags override it), `index` for the retrieval index
and `build_sft.system_prompt` for the grounded prompt; the agent mode takes its prompt, limits
and decoding from `build_sft`, `agent_db` and `agent_eval` as `veritune agent` does. Read from
the current directory.

`agent` runs one customer request through the tool-using loop (veritune.agent.loop) with the
fine-tuned model (models/base + models/adapter by default) on a private copy of the shop
database `agent_db` builds (the original is never written), as the customer `--customer`
names (the tools see only that customer's orders), printing each tool call, its result and
the final answer. Settings come from params.yaml (`build_sft` system prompt and tool
definitions, `agent_eval` limits and decoding, `agent_db` today, `index` for search_kb).

A new subcommand is one `add_parser` call in `build_parser` and one `run_*` function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from veritune.agent.shop import SHOP_DB
from veritune.core.io import read_jsonl, write_jsonl
from veritune.eval.groundedness import score_records


def run_score(args: argparse.Namespace) -> None:
    source = Path(args.answers)
    if not source.is_file():
        raise FileNotFoundError(f"no such answers file: {source}")
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.scored.jsonl")
    records = read_jsonl(source)
    scores = score_records(records, threshold=args.threshold)
    write_jsonl(output, ({**record, "groundedness": score} for record, score in zip(records, scores)))
    n = len(scores)
    share = {
        label: sum(s["label"] == label for s in scores) / n if n else 0.0
        for label in ("grounded", "unsupported", "abstained")
    }
    print(
        f"scored {n} answers -> {output}: grounded {share['grounded']:.1%}, "
        f"unsupported {share['unsupported']:.1%}, abstained {share['abstained']:.1%}",
        file=sys.stderr,
    )


def run_serve(args: argparse.Namespace) -> None:
    import dataclasses
    import logging

    from veritune.core.config import ParamsError, load_params
    from veritune.serve.app import serve
    from veritune.serve.service import agent_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    params = load_params("serve", args.params)
    overrides = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "max_batch_size",
            "max_wait_ms",
            "rate_limit_per_min",
            "torch_threads",
            "base_dir",
            "adapter_dir",
            "dtype",
            "backend",
            "upstream_url",
            "request_timeout_s",
            "engine",
        )
        if getattr(args, name) is not None
    }
    if args.no_retrieval:
        overrides["retrieval"] = False
    if args.completions_endpoint:
        overrides["completions_endpoint"] = True
    params = dataclasses.replace(params, **overrides)
    problems = params.problems()
    if problems:
        raise ParamsError("serve settings have problems:\n  - " + "\n  - ".join(problems))
    index_params = load_params("index", args.params) if params.retrieval else None
    system_prompt = load_params("build_sft", args.params).system_prompt
    serve(params, index_params, system_prompt, agent_settings(args.params, db_path=params.agent_db))


def run_agent(args: argparse.Namespace) -> None:
    import tempfile
    from datetime import date

    from veritune.agent.loop import AgentLimits, run_episodes, start_episode
    from veritune.agent.policies import ModelPolicy
    from veritune.agent.shop import episode_database
    from veritune.agent.specs import TOOLS, tool_definitions
    from veritune.agent.tools import Toolbox, authorised_writes, kb_search
    from veritune.core.config import load_params
    from veritune.model.modeling import load_model, load_tokenizer

    for path in (args.base, args.db) + (() if args.adapter == "none" else (args.adapter,)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run `dvc repro agent_db train` first")
    ep, sp, ap, ip = (load_params(s) for s in ("agent_eval", "build_sft", "agent_db", "index"))
    today = date.fromisoformat(ap.today)
    tokenizer = load_tokenizer(args.base if args.adapter == "none" else args.adapter)
    model = load_model(args.base)
    if args.adapter != "none":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model.eval()
    grammar = None
    if ep.constrained_calls and not args.free_calls:
        from veritune.infer.constraints import ToolCallGrammar

        grammar = ToolCallGrammar(tokenizer, model.config.vocab_size, TOOLS, max_string_chars=ep.max_string_chars)
    # Decoded as agent_eval decodes: its temperature, its first trial's seed.
    policy = ModelPolicy(model, tokenizer, ep.max_new_tokens, 1, ep.temperature, ep.seed, grammar=grammar)
    policy.reseed(ep.seed)
    limits = AgentLimits(
        max_steps=args.max_steps or ep.max_steps, max_retries=ep.max_retries, max_seconds=ep.max_seconds
    )
    retriever = None
    if not args.no_search:
        from veritune.retrieval.search import open_retriever

        retriever = open_retriever(ip)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            search = kb_search(retriever, sp.agent_search_k) if retriever else None
            with Toolbox(
                episode_database(args.db, tmp, "cli"),
                search=search,
                allowed_writes=authorised_writes(args.request),
                today=today,
                customer_id=args.customer,
                max_writes=ep.max_writes,
            ) as box:
                from veritune.core import chat

                episode = start_episode(
                    "cli",
                    args.request,
                    box,
                    sp.agent_system_prompt,
                    tool_definitions(sp.agent_tool_definitions),
                    chat.header_date(today),
                    chat.chat_format(tokenizer),
                )
                run_episodes(policy, [episode], limits, desc="agent")
    finally:
        if retriever is not None:
            retriever.close()
    for i, step in enumerate(episode.steps, start=1):
        if step["type"] == "call":
            mark = "" if step["valid"] else " (refused)"
            print(f"step {i}: call {step['text']}{mark}")
            print(f"        -> {json.dumps(step['result'], ensure_ascii=False)}")
        else:
            print(f"step {i}: answer")
    print(f"answer: {episode.answer if episode.answer is not None else '(none: stopped by ' + str(episode.stop) + ')'}")


def _threshold(value: str) -> float:
    t = float(value)
    if not 0.0 <= t <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veritune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score the groundedness of RAG answers in a JSONL file")
    score.add_argument("answers", help="JSONL with question, contexts, answer per line")
    score.add_argument("-o", "--output", help="output JSONL (default: <input stem>.scored.jsonl beside the input)")
    score.add_argument(
        "--threshold",
        type=_threshold,
        default=0.8,
        help="score at or above which an answer is 'grounded' (default 0.8)",
    )
    score.set_defaults(run=run_score)

    srv = commands.add_parser("serve", help="serve the released model over an OpenAI-compatible HTTP API")
    srv.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    srv.add_argument("--host", help="bind address (default: serve.host)")
    srv.add_argument("--port", type=int, help="port (default: serve.port)")
    srv.add_argument("--max-batch-size", type=int, help="requests decoded together; 1 serves one at a time")
    srv.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill")
    srv.add_argument("--rate-limit-per-min", type=int, help="per key; 0 turns it off")
    srv.add_argument("--torch-threads", type=int, help="torch intra-op threads (0: torch's default)")
    srv.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="weights dtype (default: serve.dtype)")
    srv.add_argument("--base-dir", help="base (or merged) checkpoint directory")
    srv.add_argument("--adapter-dir", help="LoRA adapter directory; '' for none")
    srv.add_argument("--no-retrieval", action="store_true", help="serve without the index (closed book)")
    srv.add_argument("--backend", choices=["builtin", "upstream"], help="who generates (default: serve.backend)")
    srv.add_argument("--upstream-url", help="backend upstream: the OpenAI-compatible server, e.g. http://host:8001/v1")
    srv.add_argument("--engine", choices=["auto", "continuous", "micro_batch"], help="builtin backend's engine")
    srv.add_argument("--request-timeout-s", type=float, help="504 after this long (default: serve.request_timeout_s)")
    srv.add_argument(
        "--completions-endpoint",
        action="store_true",
        help="also serve POST /v1/completions (raw prompts): to be another veritune's upstream",
    )
    srv.set_defaults(run=run_serve)
    agent = commands.add_parser("agent", help="run one customer request through the tool-using agent")
    agent.add_argument("request", help='the customer\'s words, e.g. "Where is my order 1042?"')
    agent.add_argument(
        "--customer",
        required=True,
        help="the customer id the request comes from (e.g. C-101): the tools see only their orders",
    )
    agent.add_argument("--base", default="models/base", help="base checkpoint (default models/base)")
    agent.add_argument("--adapter", default="models/adapter", help="LoRA adapter dir, or 'none' for the base model")
    agent.add_argument("--db", default=str(SHOP_DB), help=f"shop database (copied, never written; default {SHOP_DB})")
    agent.add_argument("--max-steps", type=int, default=0, help="model turns (default: params agent_eval.max_steps)")
    agent.add_argument(
        "--free-calls",
        action="store_true",
        help="decode tool calls freely (default: params agent_eval.constrained_calls)",
    )
    agent.add_argument("--no-search", action="store_true", help="do not open the Milvus index (search_kb refuses)")
    agent.set_defaults(run=run_agent)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as e:  # JsonlError is a ValueError
        print(f"veritune {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
