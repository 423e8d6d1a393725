"""The serving engine at 1-128 requests in flight against HF `generate`, on the Llama 3.1 8B architecture.

    python bench/serve_throughput.py --out bench/results/serve_throughput_8b_h200.json   # one GPU
    python bench/serve_throughput.py --tiny --device cpu --out /tmp/tiny.json            # the code path, in seconds

Builds the Llama 3.1 8B architecture (hidden 4096, 32 layers, 32 heads / 8 KV heads, SwiGLU
14336, vocab 128256, llama3 RoPE scaling) with random weights directly on the device -
throughput depends on the shapes, not on the weights' values - and measures, in one process:

  * `engine`: `veritune.engine.ContinuousBatchingEngine` (what `veritune serve` runs on CUDA;
    mixed steps: prompt pieces ride on the decode steps, as CUDA graphs) with 1, 8, 32, 64 and 128 requests in flight: closed-loop clients, each sending its next
    request the moment its last one finished, 2 x in-flight requests (at least 8) of
    `--prompt-tokens` +-25% and exactly `--max-new-tokens` new tokens (no stop token). Reported:
    generated tokens/s over the run, time to first token and inter-token latency (p50 / p99),
    requests answered, GPU memory before and after; at 64 in flight also the engine with
    separate prefill passes (`mixed=False`, the engine before mixed steps) and with eager
    mixed steps (several prompt pieces a step, no graph);
  * `hf_generate_one_at_a_time`: `model.generate` (greedy, dynamic cache), one request after another;
  * `hf_generate_static_compiled`: `model.generate` over one padded batch of 64 with a static
    KV cache and `torch.compile` (transformers compiles the decode step itself; a warm-up
    batch of the same shapes pays for compilation);
  * `identity`: the engine's greedy tokens against `model.generate` one at a time on a sample,
    in float32 (prompts split over mixed steps: 1,024 prompt tokens while nothing decodes, then
    at most 256 a step beside the decoding rows; should a row differ, the separate-pass engine
    is checked too and the faster engine is measured only if it is as exact) (any difference is a real error or a near-tie, reported with HF's top-2 logit
    margin at the first differing step) and in bf16 (where batched kernels round differently
    from single-row ones, so long greedy runs part at near-ties);
  * `limit`: the memory-bandwidth bound of a decode step (weights + the KV cache in use read
    once, at the copy bandwidth measured here) and the compute bound of the prefill.

Writes the JSON (card named) after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.batching import GenerationRequest  # noqa: E402
from veritune.engine import EAGER_OPS, ContinuousBatchingEngine  # noqa: E402


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
    model.generation_config.eos_token_id = None  # random weights: every request runs to its max_new_tokens
    return model.eval()


def pct(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def ms(x):
    return None if x is None else round(x * 1000, 2)


def drive_engine(engine, prompts, in_flight: int, n_requests: int, max_new: int, sync) -> dict:
    """Closed loop: `in_flight` clients, each submits its next request when its last one finishes."""
    lock = threading.Lock()
    done = threading.Event()
    records, submitted = [], [0]

    def launch():
        with lock:
            if submitted[0] >= n_requests:
                return
            i = submitted[0]
            submitted[0] += 1
        rec = {"submit": time.perf_counter(), "tokens": []}
        req = GenerationRequest(prompts[i % len(prompts)], max_new, on_token=lambda t: rec["tokens"].append(
            time.perf_counter()))
        future = engine.submit(req)

        def finished(f):
            rec["end"] = time.perf_counter()
            rec["completion"] = f.result() if f.exception() is None else None
            rec["error"] = None if f.exception() is None else repr(f.exception())
            with lock:
                records.append(rec)
                if len(records) == n_requests:
                    done.set()
            launch()
        future.add_done_callback(finished)

    sync()
    started = time.perf_counter()
    for _ in range(in_flight):
        launch()
    done.wait(timeout=90)  # a lost request would otherwise hang the whole call; `answered` then says so
    sync()
    wall = time.perf_counter() - started
    records = list(records)
    errors = [r["error"] for r in records if r["error"]]
    records = [r for r in records if not r["error"]]
    tokens = sum(len(r["completion"].token_ids) for r in records)
    ttft = [r["tokens"][0] - r["submit"] for r in records if r["tokens"]]
    itl = [b - a for r in records for a, b in zip(r["tokens"], r["tokens"][1:])]
    return {"in_flight": in_flight, "requests": n_requests, "answered": len(records), "failed": len(errors),
            "first_error": errors[0] if errors else None,
            "complete": sum(len(r["completion"].token_ids) == max_new for r in records),
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)), "max": ms(max(ttft, default=None))},
            "itl_ms": {"p50": ms(pct(itl, 50)), "p99": ms(pct(itl, 99))}}


@torch.inference_mode()
def time_parts(engine, prompts, sync, cuda) -> dict:
    """The engine's pieces alone, before it starts: one decode step (graph replay) by batch,
    one prefill pass by prompts, a mixed step at 64 decode rows by prompt tokens (eager, and as
    a graph); on CUDA the top kernels of the eager ones (torch.profiler)."""
    def timed(fn, n):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return ms((time.perf_counter() - t) / n)

    out = {"decode_step_ms": {}, "prefill_ms": {}, "mixed_step_ms": {}}
    length = engine._length_bucket(768)
    for b in (1, 8, 32, 64, 128):
        if b <= engine.max_batch:
            out["decode_step_ms"][f"batch {b}, length {length}"] = timed(lambda: engine._step(b, length), 10)
    for n in (1, 4, 16):
        if n > engine.max_batch:
            continue
        chunk = prompts[:n]
        out["prefill_ms"][f"{n} prompts, {sum(map(len, chunk))} tokens"] = timed(
            lambda: engine._prefill_forward(chunk, list(range(n))), 3)
    # A mixed step (eager): 64 slots decoding at position 600 and one prompt piece in the last slot.
    b = min(64, engine.max_batch)
    dec_tokens, dec_positions = [5] * b, [600] * b
    long_prompt = [t for p in prompts[:4] for t in p]
    mixed = {n: (lambda n=n: engine._mixed_forward(dec_tokens, dec_positions, 601, [(b - 1, 0, long_prompt[:n])]))
             for n in (0, 128, 256, 512)}
    mixed[0] = lambda: engine._mixed_forward(dec_tokens, dec_positions, 601, [])
    for n, fn in mixed.items():
        out["mixed_step_ms"][f"eager, {b} decode rows + {n} prompt tokens"] = timed(fn, 5)
    if engine.cuda_graphs:  # the graph form (what mixed steps run as on CUDA): inputs as `warmup` left them
        for c in engine.chunk_buckets:
            out["mixed_step_ms"][f"graph, {b} decode rows + {c} prompt tokens, length {length}"] = timed(
                lambda c=c: engine._step(engine._batch_bucket(b), length, c), 10)
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("prefill of 1 prompt", lambda: engine._prefill_forward(prompts[:1], [0])),
                         (f"mixed step, {b} decode rows + 256 prompt tokens", mixed[256]),
                         ("eager decode step, batch 64", lambda: engine._decode_forward(min(64, engine.max_batch), length))):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12),
                  flush=True)
    return out


def hf_one(model, ids, max_new, device, scores=False):
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=0, output_scores=scores, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), out.scores


def engine_tokens(engine, prompts, max_new):
    futures = [engine.submit(GenerationRequest(p, max_new)) for p in prompts]
    return [f.result(120).token_ids for f in futures]


def compare(model, engine, prompts, max_new, device) -> dict:
    """Engine (all prompts in flight together) vs HF greedy generate one at a time."""
    got = engine_tokens(engine, prompts, max_new)
    rows = []
    for ids, mine in zip(prompts, got):
        ref, scores = hf_one(model, ids, max_new, device, scores=True)
        first = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), None)
        row = {"identical": mine == ref, "first_difference": first}
        if first is not None:
            top2 = scores[first][0].float().topk(2).values
            row["hf_top2_margin_there"] = round(float(top2[0] - top2[1]), 5)
        rows.append(row)
    return {"sample": len(prompts), "new_tokens": max_new, "identical": sum(r["identical"] for r in rows),
            "mixed": engine.mixed, "prefill_forwards": engine.prefills, "mixed_steps": engine.mixed_steps,
            "tokens_matching_before_first_difference": sum(r["first_difference"] if r["first_difference"] is not None
                                                           else max_new for r in rows),
            "rows": rows}


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy rate, bytes read + written per second (the decode step's ceiling)."""
    if not device.startswith("cuda"):
        return None
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    rate = 2 * a.numel() * 10 / (start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family: checks the code path")
    ap.add_argument("--in-flight", default="1,8,32,64,128")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="mean prompt length (+-25%%)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--identity-sample", type=int, default=6)
    ap.add_argument("--one-at-a-time-requests", type=int, default=4)
    ap.add_argument("--static-batch", type=int, default=64, help="HF generate with static cache + compile; 0 skips")
    ap.add_argument("--skip-fp32", action="store_true", help="no float32 identity check (saves a 32 GB model)")
    ap.add_argument("--out", default="bench/results/serve_throughput.json")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "architecture": "tiny llama (code-path check)" if args.tiny else "Llama 3.1 8B (random weights)",
                    "torch": torch.__version__, "prompt_tokens": f"{args.prompt_tokens} +-25%",
                    "max_new_tokens": args.max_new_tokens}

    def save(section: str | None = None):
        out.write_text(json.dumps(result, indent=2) + "\n")
        if section:
            print(json.dumps({section: result[section]}), flush=True)

    t0 = time.perf_counter()
    result["copy_bandwidth_tb_s"] = round(copy_bandwidth(args.device) / 1e12, 2) if cuda else None
    rng = random.Random(0)
    vocab = 4096 if args.tiny else 128256
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(int(args.prompt_tokens * 0.75),
                                                                     int(args.prompt_tokens * 1.25)))]
               for _ in range(256)]
    result["prompt_tokens_mean"] = round(statistics.mean(map(len, prompts)), 1)
    new = args.max_new_tokens
    max_len = max(map(len, prompts)) + new
    sample = prompts[: args.identity_sample]

    # --- float32: exactness of the engine's forward, graphs included
    use_mixed = True
    if not args.skip_fp32:
        model32 = build_model(args.tiny, args.device, torch.float32)
        engine = ContinuousBatchingEngine(model32, [], max_batch=8, max_len=max_len, prefill_tokens=1024,
                                          mixed_tokens=256).start()
        try:
            result["identity_fp32"] = compare(model32, engine, sample, new, args.device)
        except Exception as e:  # the separate-pass engine is then measured, so the call still says something
            result["identity_fp32"] = {"error": repr(e), "identical": -1}
        engine.stop()
        if result["identity_fp32"]["identical"] < len(sample):
            engine = ContinuousBatchingEngine(model32, [], max_batch=8, max_len=max_len, mixed=False).start()
            result["identity_fp32_separate_passes"] = compare(model32, engine, sample, new, args.device)
            engine.stop()
            use_mixed = result["identity_fp32"]["identical"] >= result["identity_fp32_separate_passes"]["identical"]
        result["engine_measured_with_mixed_steps"] = use_mixed
        del engine, model32
        gc.collect()
        torch.cuda.empty_cache() if cuda else None
        save("identity_fp32")

    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.tiny, args.device, dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    result["weights_gb"] = round(weight_bytes / 1e9, 2)
    result["kv_cache_bytes_per_token"] = kv_bytes_per_token

    levels = [int(x) for x in args.in_flight.split(",")]
    built = time.perf_counter()
    engine = ContinuousBatchingEngine(model, [], max_batch=max(levels), max_len=max_len,
                                      prefill_tokens=8192 if cuda else 1024, mixed=use_mixed)
    engine.warmup(lengths=range(256, engine.max_len + 1, 256))
    if use_mixed:  # mixed steps here have slots decoding past 384 tokens: lengths 512 and up
        engine.warmup(lengths=range(512, engine.max_len + 1, 256), chunks=engine.chunk_buckets)
    result["engine_setup"] = {"seconds_incl_graph_capture": round(time.perf_counter() - built, 1),
                              "graphs": len(engine._graphs), "kv_cache_gb": round(engine.cache_bytes / 1e9, 2),
                              "slots": engine.max_batch, "max_len": engine.max_len,
                              "fused_elementwise": engine.ops is not EAGER_OPS, "mixed_steps": engine.mixed,
                              "prefill_tokens": engine.prefill_tokens, "mixed_tokens": engine.mixed_tokens,
                              "chunk_buckets": list(engine.chunk_buckets)}
    result["parts"] = time_parts(engine, prompts, sync, cuda)
    save("parts")
    engine.start()
    engine_tokens(engine, prompts[:4], 8)  # warm-up of the prefill shapes' kernels
    result["identity_bf16" if cuda else "identity_engine_dtype"] = compare(model, engine, sample, new, args.device)
    save("identity_bf16" if cuda else "identity_engine_dtype")

    result["engine"] = []
    for level in levels:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        steps, mixed_steps = engine.steps, engine.mixed_steps
        row = drive_engine(engine, prompts, level, max(2 * level, 8), new, sync)
        row.update(decode_steps=engine.steps - steps, mixed_steps=engine.mixed_steps - mixed_steps)
        if cuda:
            row["gpu_memory_gib"] = {"before": round(before / 2**30, 2),
                                     "after": round(torch.cuda.memory_allocated() / 2**30, 2),
                                     "peak": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        result["engine"].append(row)
        save()
        print(json.dumps(row), flush=True)
        if level == 64:  # the same load: separate prefill passes (the engine before mixed steps), other caps
            variants = {"engine_64_separate_prefill_passes": {"mixed": False}}
            if use_mixed:
                variants["engine_64_eager_mixed_steps"] = {"mixed_graphs": False}
            for key, change in variants.items():
                kept = {name: getattr(engine, name) for name in change}
                for name, value in change.items():
                    setattr(engine, name, value)
                steps, mixed_steps = engine.steps, engine.mixed_steps
                row = drive_engine(engine, prompts, level, 2 * level, new, sync)
                row.update(change, decode_steps=engine.steps - steps, mixed_steps=engine.mixed_steps - mixed_steps)
                for name, value in kept.items():
                    setattr(engine, name, value)
                result[key] = row
                save(key)
    result["engine_batch_stats"] = {**engine.batch_stats(), "prefill_forwards": engine.prefills,
                                    "mixed_steps": engine.mixed_steps}
    engine.stop()
    del engine  # its cache and graphs: HF's runs below get the card's memory back
    gc.collect()
    torch.cuda.empty_cache() if cuda else None

    # --- HF generate, one at a time
    tokens, seconds = 0, 0.0
    for p in prompts[: args.one_at_a_time_requests]:
        sync()
        t = time.perf_counter()
        tokens += len(hf_one(model, p, new, args.device)[0])
        sync()
        seconds += time.perf_counter() - t
    result["hf_generate_one_at_a_time"] = {"requests": args.one_at_a_time_requests, "tokens": tokens,
                                           "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    save("hf_generate_one_at_a_time")

    # --- bounds
    bw = (result["copy_bandwidth_tb_s"] or 4.3) * 1e12
    ctx = result["prompt_tokens_mean"] + new / 2
    result["limit"] = {"decode_tokens_per_s_at": {
        str(b): round(b / ((weight_bytes + b * ctx * kv_bytes_per_token) / bw)) for b in levels},
        "how": "b / ((weights + b x mean context x KV bytes per token) / copy bandwidth): every decode step reads the "
               "weights and the cache in use once",
        "prefill_seconds_per_request_at_790_tflops": round(2 * params * result["prompt_tokens_mean"] / 790e12, 4)}
    save("limit")

    # --- HF generate, padded batch, static cache + torch.compile (last: compilation takes minutes)
    if args.static_batch:
        batch = prompts[: args.static_batch]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = None

        def run():
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                      do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        run()
        sync()
        warm = time.perf_counter() - t
        t = time.perf_counter()
        gen = run()
        sync()
        seconds = time.perf_counter() - t
        tokens = (gen.shape[1] - width) * len(batch)
        result["hf_generate_static_compiled"] = {"batch": len(batch), "tokens": tokens, "seconds": round(seconds, 2),
                                                 "tokens_per_s": round(tokens / seconds, 1),
                                                 "first_call_seconds_incl_compile": round(warm, 1)}
        save("hf_generate_static_compiled")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    at64 = next((r for r in result["engine"] if r["in_flight"] == 64), None)
    if at64 and "hf_generate_static_compiled" in result:
        result["engine_64_vs_hf_static_compiled"] = round(
            at64["tokens_per_s"] / result["hf_generate_static_compiled"]["tokens_per_s"], 2)
        if "engine_64_separate_prefill_passes" in result:
            result["engine_64_separate_passes_vs_hf_static_compiled"] = round(
                result["engine_64_separate_prefill_passes"]["tokens_per_s"]
                / result["hf_generate_static_compiled"]["tokens_per_s"], 2)
    save()
    print("in flight | tokens/s | TTFT p50/p99 ms | ITL p50/p99 ms | limit tokens/s")
    for r in result["engine"]:
        print(f"{r['in_flight']:>9} | {r['tokens_per_s']:>8} | {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} | "
              f"{r['itl_ms']['p50']}/{r['itl_ms']['p99']} | {result['limit']['decode_tokens_per_s_at'][str(r['in_flight'])]}")


if __name__ == "__main__":
    main()
