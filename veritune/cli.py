"""The `veritune` command line.

    veritune score answers.jsonl [-o scored.jsonl] [--threshold 0.8]

`score` reads JSON Lines records with `question`, `contexts` (strings or {"text": ...}
objects) and `answer`, and writes each record back with a `groundedness` field
(see `veritune.groundedness.score_groundedness`) to `-o`, by default
`<input stem>.scored.jsonl` beside the input. The file is written atomically; a one-line
summary goes to stderr. Exit status 2 on a missing file or a bad record.

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
