"""The `veritune` command line.

    veritune score answers.jsonl [-o scored.jsonl] [--threshold 0.8]
    veritune serve [--host H] [--port P] [--max-batch-size N] [...]

`score` reads JSON Lines records with `question`, `contexts` (strings or {"text": ...}
objects) and `answer`, and writes each record back with a `groundedness` field
(see `veritune.groundedness.score_groundedness`) to `-o`, by default
`<input stem>.scored.jsonl` beside the input. The file is written atomically; a one-line
summary goes to stderr. Exit status 2 on a missing file or a bad record.

`serve` runs the OpenAI-compatible HTTP API over the released model (see
`veritune.server`): params.yaml `serve` (flags override it), `index` for the retrieval index
and `build_sft.system_prompt` for the grounded prompt. Read from the current directory.

A new subcommand is one `add_parser` call in `build_parser` and one `run_*` function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from veritune.groundedness import score_records
from veritune.io import read_jsonl, write_jsonl


def run_score(args: argparse.Namespace) -> None:
    source = Path(args.answers)
    if not source.is_file():
        raise FileNotFoundError(f"no such answers file: {source}")
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.scored.jsonl")
    records = read_jsonl(source)
    scores = score_records(records, threshold=args.threshold)
    write_jsonl(output, ({**record, "groundedness": score} for record, score in zip(records, scores)))
    n = len(scores)
    share = {label: sum(s["label"] == label for s in scores) / n if n else 0.0
             for label in ("grounded", "unsupported", "abstained")}
    print(f"scored {n} answers -> {output}: grounded {share['grounded']:.1%}, "
          f"unsupported {share['unsupported']:.1%}, abstained {share['abstained']:.1%}", file=sys.stderr)


def run_serve(args: argparse.Namespace) -> None:
    import dataclasses
    import logging

    from veritune.config import ParamsError, load_params
    from veritune.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    params = load_params("serve", args.params)
    overrides = {name: getattr(args, name) for name in ("host", "port", "max_batch_size", "max_wait_ms",
                                                         "rate_limit_per_min", "torch_threads", "base_dir",
                                                         "adapter_dir", "dtype")
                 if getattr(args, name) is not None}
    if args.no_retrieval:
        overrides["retrieval"] = False
    params = dataclasses.replace(params, **overrides)
    problems = params.problems()
    if problems:
        raise ParamsError("serve settings have problems:\n  - " + "\n  - ".join(problems))
    index_params = load_params("index", args.params) if params.retrieval else None
    system_prompt = load_params("build_sft", args.params).system_prompt
    serve(params, index_params, system_prompt)


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
    score.add_argument("--threshold", type=_threshold, default=0.8,
                       help="score at or above which an answer is 'grounded' (default 0.8)")
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
    srv.set_defaults(run=run_serve)
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
