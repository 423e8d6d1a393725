"""The serving engine alone on this machine's CPU: how much batching can give on the default.

    python bench/serve_engine_cpu.py            # after `dvc repro train index split`

`metrics/stress.json` measures the whole server (HTTP, retrieval, tokenization and the
engine) with 32 concurrent clients. This isolates the engine: the fine-tuned default model
(models/base + models/adapter, merged), real RAG prompts (the first `--requests` test
questions with `serve.retrieval_k` retrieved passages, exactly as `veritune serve` builds
them), `generate_batch` with each request's own stop tokens and `stress.max_tokens`, one
torch thread (`serve.torch_threads`), in four settings: fp32 and bf16 weights, batches of one
and of `--batch`. It also checks that every setting gives the answers fp32 one-at-a-time
gives. Prints one JSON line and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.core.chat import stop_token_ids  # noqa: E402
from veritune.core.config import load_params  # noqa: E402
from veritune.core.io import read_jsonl  # noqa: E402
from veritune.infer.decode import GenerationRequest, generate_batch  # noqa: E402
from veritune.model.modeling import load_model, load_tokenizer  # noqa: E402
from veritune.retrieval.search import Retriever  # noqa: E402
from veritune.serve.app import grounded  # noqa: E402


def rag_prompts(tokenizer, n: int) -> list[list[int]]:
    ip, sp, srv = load_params("index"), load_params("build_sft"), load_params("serve")
    questions = [q["question"] for q in read_jsonl("data/split/questions_test.jsonl")[:n]]
    with Retriever(ip.uri, ip.collection, ip.embedding_model) as retriever:
        hits = retriever.search(questions, k=srv.retrieval_k)
    prompts = []
    for q, h in zip(questions, hits):
        passages = [{"doc_id": x.doc_id, "title": x.title, "text": x.text} for x in h]
        messages = grounded([{"role": "user", "content": q}], passages, sp.system_prompt)
        prompts.append(
            tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        )
    return prompts


def run(model, prompts, batch: int, max_tokens: int, stops, pad_id) -> tuple[list, float]:
    outs, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += generate_batch(
            model, [GenerationRequest(list(p), max_tokens) for p in prompts[i : i + batch]], stops, pad_id
        )
    return outs, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32, help="the batched setting's batch size (serve.max_batch_size)")
    ap.add_argument("--out", default="bench/results/serve_engine_cpu.json")
    args = ap.parse_args()
    from peft import PeftModel

    srv, stress = load_params("serve"), load_params("stress")
    torch.set_num_threads(srv.torch_threads or torch.get_num_threads())
    tokenizer = load_tokenizer(srv.adapter_dir or srv.base_dir)
    model = load_model(srv.base_dir)
    if srv.adapter_dir:
        model = PeftModel.from_pretrained(model, srv.adapter_dir).merge_and_unload()
    model.eval()
    prompts = rag_prompts(tokenizer, args.requests)
    stops, pad_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    for m in models.values():  # warm-up: first calls pay for lazy initialisation
        run(m, prompts[: args.batch], args.batch, 2, stops, pad_id)
        run(m, prompts[:2], 1, 2, stops, pad_id)
    result: dict = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "requests": len(prompts),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_tokens": stress.max_tokens,
        "batch": args.batch,
        "settings": {},
    }
    reference = None
    for dtype in ("float32", "bfloat16"):
        for batch in (1, args.batch):
            outs, seconds = run(models[dtype], prompts, batch, stress.max_tokens, stops, pad_id)
            if reference is None:
                reference = [o.token_ids for o in outs]
            result["settings"][f"{dtype}_batch{batch}"] = {
                "seconds": round(seconds, 3),
                "requests_per_s": round(len(prompts) / seconds, 2),
                "mean_new_tokens": round(sum(len(o.token_ids) for o in outs) / len(outs), 2),
                "same_answers_as_fp32_one_at_a_time": sum(o.token_ids == r for o, r in zip(outs, reference)),
            }
    s = result["settings"]
    one = s["float32_batch1"]["requests_per_s"]
    result["ratio_vs_fp32_one_at_a_time"] = {k: round(v["requests_per_s"] / one, 2) for k, v in s.items()}
    result["batching_ratio_same_dtype"] = {
        d: round(s[f"{d}_batch{args.batch}"]["requests_per_s"] / s[f"{d}_batch1"]["requests_per_s"], 2)
        for d in ("float32", "bfloat16")
    }
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
