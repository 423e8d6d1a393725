"""Batched serving vs one request at a time on the Llama 3.1 8B architecture.

    python bench/serve_throughput.py --device cuda            # 8B shape, random bf16 weights
    python bench/serve_throughput.py --tiny --device cpu      # the same code path, in seconds

Builds the Llama 3.1 8B architecture (hidden 4096, 32 layers, 32 heads / 8 KV heads, SwiGLU
14336, vocab 128256, llama3 RoPE scaling) with random weights - throughput does not depend
on the weights' values, only their shapes - and measures generated tokens per second for the
same prompts two ways, in one process on one card:

  * `batched`: `--concurrency` requests submitted at once to the serving engine
    (`veritune.batching.MicroBatcher` + `generate_batch`, exactly what `veritune serve` runs);
  * `one_at_a_time`: `model.generate`, one request after another (greedy, same max tokens);
  * `engine_one_at_a_time`: the serving engine with batches of one (`max_batch_size: 1`).

Every request generates exactly `--max-new-tokens` tokens (no stop token), so both sides do
the same work. Prints one JSON line (card name included) and writes it to `--out`.
Needs torch + transformers (+ veritune) only; no HTTP stack.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.batching import GenerationRequest, MicroBatcher, generate_batch  # noqa: E402


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096) if tiny else \
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=14336, vocab_size=128256)
    config = LlamaConfig(**shape, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # initialise in the serving dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family: checks the code path")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt length (+-25%%, so batches pad)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--one-at-a-time-requests", type=int, default=8,
                    help="how many of the requests to time one by one (the rate is per token, so a subset suffices)")
    ap.add_argument("--out", default="bench/results/serve_throughput.json")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    model = build_model(args.tiny, args.device, dtype)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(int(args.prompt_tokens * 0.75),
                                                                     int(args.prompt_tokens * 1.25)))]
               for _ in range(args.concurrency)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # Warm-up (kernels, allocator) for both paths, outside the timing.
    generate_batch(model, [GenerationRequest(p[:32], 4) for p in prompts[:4]], stop_ids=[], pad_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:32]], device=args.device), max_new_tokens=4, do_sample=False,
                       min_new_tokens=4, pad_token_id=0)
    sync()

    batcher = MicroBatcher(lambda reqs: generate_batch(model, reqs, stop_ids=[], pad_id=0),
                           max_batch_size=args.concurrency, max_wait_ms=50).start()
    started = time.perf_counter()
    futures = [batcher.submit(GenerationRequest(p, args.max_new_tokens)) for p in prompts]
    completions = [f.result() for f in futures]
    sync()
    batched_s = time.perf_counter() - started
    batcher.stop()
    batched_tokens = sum(len(c.token_ids) for c in completions)

    single_tokens, single_s = 0, 0.0
    with torch.inference_mode():
        for p in prompts[: args.one_at_a_time_requests]:
            ids = torch.tensor([p], device=args.device)
            sync()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
            sync()
            single_s += time.perf_counter() - t
            single_tokens += out.shape[1] - ids.shape[1]

    # The same engine with one request per batch: the batching effect alone, without generate's overheads.
    engine_tokens, engine_s = 0, 0.0
    for p in prompts[: args.one_at_a_time_requests]:
        sync()
        t = time.perf_counter()
        engine_tokens += len(generate_batch(model, [GenerationRequest(p, args.max_new_tokens)], [], 0)[0].token_ids)
        sync()
        engine_s += time.perf_counter() - t

    result = {
        "device": device_name,
        "architecture": "tiny llama (code-path check)" if args.tiny else "Llama 3.1 8B (random bf16 weights)",
        "concurrency": args.concurrency,
        "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_new_tokens": args.max_new_tokens,
        "batched": {"requests": len(completions), "tokens": batched_tokens, "seconds": round(batched_s, 3),
                    "tokens_per_s": round(batched_tokens / batched_s, 1),
                    "batch_sizes": batcher.batch_sizes},
        "one_at_a_time": {"requests": args.one_at_a_time_requests, "tokens": single_tokens,
                          "seconds": round(single_s, 3), "tokens_per_s": round(single_tokens / single_s, 1),
                          "how": "model.generate, one request after another"},
        "engine_one_at_a_time": {"requests": args.one_at_a_time_requests, "tokens": engine_tokens,
                                 "seconds": round(engine_s, 3), "tokens_per_s": round(engine_tokens / engine_s, 1),
                                 "how": "generate_batch with batches of one (max_batch_size 1)"},
    }
    result["speedup"] = round(result["batched"]["tokens_per_s"] / result["one_at_a_time"]["tokens_per_s"], 2)
    result["speedup_vs_engine_unbatched"] = round(
        result["batched"]["tokens_per_s"] / result["engine_one_at_a_time"]["tokens_per_s"], 2)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
