"""The serving engine at 1-128 requests in flight against HF `generate`, on the Llama 3.1 8B architecture.

    python bench/serve_throughput.py --out bench/results/serve_throughput_8b_h200.json   # one GPU
    python bench/serve_throughput.py --tiny --device cpu --out /tmp/tiny.json            # the code path, in seconds

Builds the Llama 3.1 8B architecture (hidden 4096, 32 layers, 32 heads / 8 KV heads, SwiGLU
14336, vocab 128256, llama3 RoPE scaling) with random weights directly on the device -
throughput depends on the shapes, not on the weights' values - and measures, in one process:

  * `engine`: `veritune.serve.engine.ContinuousBatchingEngine` (what `veritune serve` runs on CUDA;
    mixed steps: prompt pieces ride on the decode steps, as CUDA graphs) with 1, 8, 32, 64 and
    128 requests in flight: closed-loop clients, each sending its next request the moment its
    last one finished, 4 x in-flight requests (at least 16; 256 at 64 in flight, as in the
    issue's probe) of `--prompt-tokens` +-25% and exactly `--max-new-tokens` new tokens (no stop token). Reported:
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
    is checked too and the faster engine is measured only if it is as exact) (any difference
    is a real error or a near-tie, reported with HF's top-2 logit margin at the first
    differing step) and in bf16 (where batched kernels round differently
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

from veritune.infer.decode import GenerationRequest  # noqa: E402
from veritune.serve.engine import EAGER_OPS, MAX_PIECES, ContinuousBatchingEngine, _Running  # noqa: E402


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = (
        dict(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=688,
            vocab_size=4096,
        )
        if tiny
        else dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
        )
    )
    config = LlamaConfig(
        **shape,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
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
        req = GenerationRequest(
            prompts[i % len(prompts)], max_new, on_token=lambda t: rec["tokens"].append(time.perf_counter())
        )
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
    return {
        "in_flight": in_flight,
        "requests": n_requests,
        "answered": len(records),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "complete": sum(len(r["completion"].token_ids) == max_new for r in records),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99)), "max": ms(max(ttft, default=None))},
        "itl_ms": {"p50": ms(pct(itl, 50)), "p99": ms(pct(itl, 99))},
    }


@torch.inference_mode()
def time_parts(engine, prompts, sync, cuda) -> dict:
    """The engine's steps alone, before it starts, on realistic inputs (decode rows at position
    600 of their slots, prompt pieces of the sample prompts): a decode step by batch, a prefill
    step (nothing decoding) and a mixed step at 64 decode rows by prompt tokens (graph replays on
    CUDA); on CUDA the top kernels of the eager forms (torch.profiler)."""

    def timed(fn, n):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return ms((time.perf_counter() - t) / n)

    def fake(slot, ids, position):
        return _Running(GenerationRequest(list(ids), 1), None, slot, position, 5)

    at = min(600, engine.max_len - 2)

    def prepare(batch, chunk):  # decode rows of slots [0, batch) at 600; prompt rows from the last slots
        runs = [fake(s, [5] * at, at) for s in range(batch)]
        engine._fill_decode_rows(runs, engine._batch_bucket(batch) if batch else 0)
        pieces, left, slot = [], chunk, engine.max_batch - 1
        for p in prompts:
            if left <= 0:
                break
            n = min(len(p), left)
            pieces.append((fake(slot, p, 0), 0, n))
            left, slot = left - n, slot - 1
        if engine.kernel:
            engine._fill_chunk(pieces[:MAX_PIECES], engine._batch_bucket(batch) if batch else 0)
        else:
            engine.inputs.copy_(engine._host)
        return pieces

    out = {
        "attention": "slot kernel" if engine.kernel else "sdpa",
        "decode_step_ms": {},
        "prefill_step_ms": {},
        "mixed_step_ms": {},
    }
    for b in (1, 8, 32, 64, 128):
        if b <= engine.max_batch:
            prepare(b, 0)
            key = (engine._batch_bucket(b), 0 if engine.kernel else engine._length_bucket(at + 1))
            out["decode_step_ms"][f"batch {b}, slots at {at} tokens"] = timed(lambda: engine._step(key), 10)
    if engine.kernel:
        for c in engine.chunk_buckets:
            prepare(0, c)
            out["prefill_step_ms"][f"{c} prompt tokens"] = timed(lambda: engine._step((0, c)), 5)
            b = min(64, engine.max_batch)
            prepare(b, c)
            out["mixed_step_ms"][f"{b} decode rows + {c} prompt tokens"] = timed(
                lambda: engine._step((engine._batch_bucket(b), c)), 5
            )
    if cuda and engine.kernel:
        from torch.profiler import ProfilerActivity, profile

        b = min(64, engine.max_batch)
        for name, (batch, chunk) in (
            ("eager decode step, batch 64", (b, 0)),
            ("eager mixed step, 64 decode rows + 256 prompt tokens", (b, 256)),
            ("eager prefill step, 2048 prompt tokens", (0, 2048)),
        ):
            if chunk and chunk not in engine.chunk_buckets:
                continue
            prepare(batch, chunk)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine._slot_forward(engine._batch_bucket(batch) if batch else 0, chunk)
                sync()
            print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    return out


@torch.inference_mode()
def kernel_check(engine) -> dict:
    """The slot-attention kernel against SDPA on the engine's own cache, bf16: decode rows of
    different lengths and a prompt piece after a cached prefix (largest absolute difference)."""
    import torch.nn.functional as F

    from veritune.serve import slot_attention

    dev, kc, vc = engine.device, engine.k_cache[0], engine.v_cache[0]
    g = torch.Generator(device=dev).manual_seed(0)
    kc.normal_(generator=g)
    vc.normal_(generator=g)
    top = engine.max_len - 1
    lengths = [1, 37, min(300, top), min(601, top)]
    piece = min(100, top // 3)
    piece_start = min(200, top - piece)
    slots = torch.tensor([0, 1, 2, 3] + [4] * piece, device=dev)
    ctx = torch.tensor(lengths + list(range(piece_start + 1, piece_start + piece + 1)), device=dev)
    q = torch.randn(len(slots), engine.n_heads, engine.head_dim, device=dev, dtype=engine.dtype, generator=g)
    out = torch.zeros_like(q)
    slot_attention.slot_attention(
        q,
        kc,
        vc,
        slots,
        ctx,
        torch.arange(4, device=dev),
        torch.ones(4, dtype=torch.long, device=dev),
        slot_attention.DECODE_QUERIES,
        engine.scale,
        out=out,
    )
    rpt = engine.rows_per_tile
    starts = torch.arange(4, 4 + piece, rpt, device=dev)
    rows = torch.clamp(4 + piece - starts, max=rpt)
    slot_attention.slot_attention(
        q, kc, vc, slots, ctx, starts, rows, slot_attention.PIECE_QUERIES, engine.scale, out=out
    )
    worst = 0.0
    for r in range(len(slots)):
        n, s = int(ctx[r]), int(slots[r])
        k = kc[s, :, :n].repeat_interleave(engine.group, 0)
        v = vc[s, :, :n].repeat_interleave(engine.group, 0)
        ref = F.scaled_dot_product_attention(q[r][:, None].float(), k.float(), v.float(), scale=engine.scale)[:, 0]
        worst = max(worst, float((out[r].float() - ref).abs().max()))
    kc.zero_()
    vc.zero_()
    return {"rows": len(slots), "max_abs_difference_vs_sdpa_fp32": round(worst, 5)}


def hf_one(model, ids, max_new, device, scores=False):
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
            output_scores=scores,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(ids) :].tolist(), out.scores


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
    return {
        "sample": len(prompts),
        "new_tokens": max_new,
        "identical": sum(r["identical"] for r in rows),
        "mixed": engine.mixed,
        "prefill_forwards": engine.prefills,
        "mixed_steps": engine.mixed_steps,
        "tokens_matching_before_first_difference": sum(
            r["first_difference"] if r["first_difference"] is not None else max_new for r in rows
        ),
        "rows": rows,
    }


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
    ap.add_argument(
        "--prefill-tokens", type=int, default=2048, help="engine: prompt tokens a step while nothing decodes"
    )
    ap.add_argument(
        "--mixed-tokens", type=int, default=1024, help="engine: at most this many prompt tokens beside decode rows"
    )
    ap.add_argument("--out", default="bench/results/serve_throughput.json")
    args = ap.parse_args()

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "architecture": "tiny llama (code-path check)" if args.tiny else "Llama 3.1 8B (random weights)",
        "torch": torch.__version__,
        "prompt_tokens": f"{args.prompt_tokens} +-25%",
        "max_new_tokens": args.max_new_tokens,
    }

    def save(section: str | None = None):
        out.write_text(json.dumps(result, indent=2) + "\n")
        if section:
            print(json.dumps({section: result[section]}), flush=True)

    t0 = time.perf_counter()
    result["copy_bandwidth_tb_s"] = round(copy_bandwidth(args.device) / 1e12, 2) if cuda else None
    rng = random.Random(0)
    vocab = 4096 if args.tiny else 128256
    prompts = [
        [
            rng.randrange(3, vocab)
            for _ in range(rng.randint(int(args.prompt_tokens * 0.75), int(args.prompt_tokens * 1.25)))
        ]
        for _ in range(256)
    ]
    result["prompt_tokens_mean"] = round(statistics.mean(map(len, prompts)), 1)
    new = args.max_new_tokens
    max_len = max(map(len, prompts)) + new
    sample = prompts[: args.identity_sample]

    # --- float32: exactness of the engine's forward, graphs included
    use_mixed = True
    if not args.skip_fp32:
        model32 = build_model(args.tiny, args.device, torch.float32)
        engine = ContinuousBatchingEngine(
            model32, [], max_batch=8, max_len=max_len, prefill_tokens=1024, mixed_tokens=256
        ).start()
        result["identity_fp32_attention"] = "slot kernel" if engine.kernel else "sdpa"
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
    engine = ContinuousBatchingEngine(
        model,
        [],
        max_batch=max(levels),
        max_len=max_len,
        prefill_tokens=args.prefill_tokens,
        mixed_tokens=args.mixed_tokens,
        mixed=use_mixed,
    )
    engine.warmup(lengths=range(256, engine.max_len + 1, 256))
    result["engine_setup"] = {
        "seconds_incl_graph_capture": round(time.perf_counter() - built, 1),
        "graphs": len(engine._graphs),
        "kv_cache_gb": round(engine.cache_bytes / 1e9, 2),
        "slots": engine.max_batch,
        "max_len": engine.max_len,
        "attention": "slot kernel" if engine.kernel else "sdpa",
        "fused_elementwise": engine.ops is not EAGER_OPS,
        "mixed_steps": engine.mixed,
        "prefill_tokens": engine.prefill_tokens,
        "mixed_tokens": engine.mixed_tokens,
        "chunk_buckets": list(getattr(engine, "chunk_buckets", [])),
    }
    if engine.kernel:
        result["kernel_check"] = kernel_check(engine)
        save("kernel_check")
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
        row = drive_engine(engine, prompts, level, max(4 * level, 16), new, sync)
        row.update(decode_steps=engine.steps - steps, mixed_steps=engine.mixed_steps - mixed_steps)
        if cuda:
            row["gpu_memory_gib"] = {
                "before": round(before / 2**30, 2),
                "after": round(torch.cuda.memory_allocated() / 2**30, 2),
                "peak": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        result["engine"].append(row)
        save()
        print(json.dumps(row), flush=True)
        if level == 64:  # the same load: separate prefill passes (the engine before mixed steps), other caps
            variants = {
                "engine_64_separate_prefill_passes": {"mixed": False},
                "engine_64_not_overlapped": {"overlap": False},  # each step read before the next is queued
            }
            for cap in (512, 2048):
                if cap != engine.mixed_tokens and cap <= engine.prefill_tokens:
                    variants[f"engine_64_mixed_tokens_{cap}"] = {"mixed": True, "mixed_tokens": cap}
            for key, change in variants.items():
                kept = {name: getattr(engine, name) for name in change}
                for name, value in change.items():
                    setattr(engine, name, value)
                steps, mixed_steps = engine.steps, engine.mixed_steps
                row = drive_engine(engine, prompts, level, 4 * level, new, sync)
                row.update(change, decode_steps=engine.steps - steps, mixed_steps=engine.mixed_steps - mixed_steps)
                for name, value in kept.items():
                    setattr(engine, name, value)
                result[key] = row
                save(key)
    result["engine_batch_stats"] = {
        **engine.batch_stats(),
        "prefill_forwards": engine.prefills,
        "mixed_steps": engine.mixed_steps,
    }
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
    result["hf_generate_one_at_a_time"] = {
        "requests": args.one_at_a_time_requests,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }
    save("hf_generate_one_at_a_time")

    # --- bounds
    bw = (result["copy_bandwidth_tb_s"] or 4.3) * 1e12
    ctx = result["prompt_tokens_mean"] + new / 2
    result["limit"] = {
        "decode_tokens_per_s_at": {
            str(b): round(b / ((weight_bytes + b * ctx * kv_bytes_per_token) / bw)) for b in levels
        },
        "how": "b / ((weights + b x mean context x KV bytes per token) / copy bandwidth): every decode step reads the "
        "weights and the cache in use once",
        "prefill_seconds_per_request_at_790_tflops": round(2 * params * result["prompt_tokens_mean"] / 790e12, 4),
    }
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
                return model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
                )

        t = time.perf_counter()
        run()
        sync()
        warm = time.perf_counter() - t
        t = time.perf_counter()
        gen = run()
        sync()
        seconds = time.perf_counter() - t
        tokens = (gen.shape[1] - width) * len(batch)
        result["hf_generate_static_compiled"] = {
            "batch": len(batch),
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "first_call_seconds_incl_compile": round(warm, 1),
        }
        save("hf_generate_static_compiled")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    at64 = next((r for r in result["engine"] if r["in_flight"] == 64), None)
    if at64 and "hf_generate_static_compiled" in result:
        result["engine_64_vs_hf_static_compiled"] = round(
            at64["tokens_per_s"] / result["hf_generate_static_compiled"]["tokens_per_s"], 2
        )
        if "engine_64_separate_prefill_passes" in result:
            result["engine_64_separate_passes_vs_hf_static_compiled"] = round(
                result["engine_64_separate_prefill_passes"]["tokens_per_s"]
                / result["hf_generate_static_compiled"]["tokens_per_s"],
                2,
            )
    save()
    print("in flight | tokens/s | TTFT p50/p99 ms | ITL p50/p99 ms | limit tokens/s")
    for r in result["engine"]:
        print(
            f"{r['in_flight']:>9} | {r['tokens_per_s']:>8} | {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} | "
            f"{r['itl_ms']['p50']}/{r['itl_ms']['p99']} | "
            f"{result['limit']['decode_tokens_per_s_at'][str(r['in_flight'])]}"
        )


if __name__ == "__main__":
    main()
