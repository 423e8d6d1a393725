"""The engine's kernel form on a CPU, under Triton's interpreter: the slot-attention kernel
(veritune.serve.slot_attention) against plain attention, and the whole engine on it (mixed steps and
separate passes) against transformers' greedy `generate`. Triton decides at import whether a
kernel is interpreted (TRITON_INTERPRET=1), so each check runs in a fresh interpreter process.
Skipped where Triton is not installed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# Triton 3.5's interpreter turns a loaded scalar into a Python int with int(array), which numpy
# >= 2.3 refuses for a one-element array of ndim 1: the same conversion through .item().
PATCH = """
import numpy as np
import triton.runtime.interpreter as interp
if hasattr(interp, "_patch_lang_tensor"):
    _patch = interp._patch_lang_tensor
    def _patched(tensor):
        _patch(tensor)
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
    interp._patch_lang_tensor = _patched
"""


def run_interpreted(code: str) -> str:
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", PATCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_row_attends_over_its_own_slot_up_to_its_own_position():
    out = run_interpreted("""
        import torch
        from veritune.serve import slot_attention as sa
        torch.manual_seed(0)
        for heads, kv_heads, dim in ((6, 2, 64), (8, 2, 32)):  # SmolLM2's group of 3, Llama 3.1's of 4
            slots_n, length = 4, 200
            kc, vc = torch.randn(slots_n, kv_heads, length, dim), torch.randn(slots_n, kv_heads, length, dim)
            # Decode rows of slots 0-2 (slot 1 a free slot's dummy row: sees nothing), then a
            # 70-token prompt piece of slot 3 after 10 cached tokens.
            slots = torch.tensor([0, 1, 2] + [3] * 70)
            ctx = torch.tensor([50, 0, 130] + list(range(11, 81)))
            q = torch.randn(len(slots), heads, dim)
            out = torch.full_like(q, float("nan"))
            sa.slot_attention(q, kc, vc, slots, ctx, torch.arange(3), torch.ones(3, dtype=torch.long),
                              sa.DECODE_QUERIES, dim ** -0.5, out=out)
            rpt = sa.rows_per_tile(heads // kv_heads)
            starts = list(range(3, 73, rpt))
            rows = [min(rpt, 73 - s) for s in starts]
            sa.slot_attention(q, kc, vc, slots, ctx, torch.tensor(starts + [0, 0]), torch.tensor(rows + [0, 0]),
                              sa.PIECE_QUERIES, dim ** -0.5, out=out)  # two unused tiles write nothing
            ref = sa.reference(q, kc, vc, slots, ctx)
            print(heads // kv_heads, float((out - ref).abs().max()), bool((out[1] == 0).all()))
    """)
    lines = [line.split() for line in out.strip().splitlines()]
    assert [group for group, _, _ in lines] == ["3", "4"]
    for _, err, dummy_zero in lines:
        assert float(err) < 1e-5 and dummy_zero == "True"


def test_rope_store_rotates_queries_and_writes_keys_and_values_into_the_cache():
    out = run_interpreted("""
        import torch
        from veritune.serve import slot_attention as sa
        from veritune.serve.engine import _rope
        torch.manual_seed(0)
        for heads, kv_heads, dim in ((9, 3, 64), (32, 8, 128)):  # SmolLM2's heads, Llama 3.1 8B's
            rows, slots_n, length = 5, 3, 40
            qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
            cos, sin = torch.randn(rows, dim), torch.randn(rows, dim)
            slots, positions = torch.tensor([0, 2, 1, 1, 1]), torch.tensor([7, 0, 3, 4, 5])
            dest = ((slots[:, None] * kv_heads + torch.arange(kv_heads)) * length + positions[:, None]).reshape(-1)
            kc, vc = torch.randn(slots_n, kv_heads, length, dim), torch.randn(slots_n, kv_heads, length, dim)
            k_ref, v_ref = kc.clone(), vc.clone()
            q = sa.rope_store(qkv, cos, sin, kc, vc, dest, heads, kv_heads)
            qr = qkv[:, : heads * dim].view(rows, heads, dim)
            kr = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
            vr = qkv[:, (heads + kv_heads) * dim :].reshape(rows, kv_heads, dim)
            q_ref = _rope(qr, cos[:, None], sin[:, None])
            k_ref.view(-1, dim).index_copy_(0, dest, _rope(kr, cos[:, None], sin[:, None]).reshape(-1, dim))
            v_ref.view(-1, dim).index_copy_(0, dest, vr.reshape(-1, dim))
            print(float((q - q_ref).abs().max()), float((kc - k_ref).abs().max()), bool(torch.equal(vc, v_ref)))
    """)
    for line in out.strip().splitlines():
        q_err, k_err, v_same = line.split()
        assert float(q_err) < 1e-5 and float(k_err) < 1e-5 and v_same == "True", line


def test_the_kernel_form_of_the_engine_decodes_as_hf_generate():
    """Six requests through three slots: prompts longer than a step's budget are split over
    mixed steps beside the decoding rows (and over prefill steps with separate passes). The next
    step is queued before the last is read (its decode rows take their tokens on the device): a
    request that writes a stop token there still ends at it, and a sampled request (its token
    picked on the host) draws as the CPU loop draws."""
    out = run_interpreted("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from veritune.infer.decode import GenerationRequest, generate_batch
        from veritune.serve.engine import ContinuousBatchingEngine
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=300, max_position_embeddings=512)
        model = LlamaForCausalLM(config).eval()
        model.generation_config.eos_token_id = None  # no stop token: every request runs to its limit
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (23, 70, 17, 41, 90, 5)]
        limits = [12, 5, 9, 15, 7, 10]
        with torch.inference_mode():
            reference = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                                        pad_token_id=0)[0, len(p):].tolist() for p, n in zip(prompts, limits)]
        # Stop tokens: what the first and fourth requests write 4th and 7th (and nothing earlier).
        stops = [t for t in (reference[0][3], reference[3][6]) if t not in reference[0][:3] + reference[3][:6]]
        def cut(row):
            ends = [i for i, t in enumerate(row) if t in stops]
            return row[: ends[0]] if ends else row
        def sampled():
            return GenerationRequest(prompts[1], 12, temperature=0.9, generator=torch.Generator().manual_seed(5))
        drawn = generate_batch(model, [sampled()], stops, 0)[0].token_ids
        for mixed in (True, False):
            engine = ContinuousBatchingEngine(model, [], max_batch=3, max_len=256, prefill_tokens=64,
                                              mixed_tokens=64, mixed=mixed, attention="kernel").start()
            got = [f.result(300).token_ids for f in [engine.submit(GenerationRequest(p, n))
                                                     for p, n in zip(prompts, limits)]]
            engine.stop()
            print(mixed, got == reference, engine.kernel, engine.mixed_steps, sorted(engine._free), engine.overlap)
            engine = ContinuousBatchingEngine(model, stops, max_batch=3, max_len=256, prefill_tokens=64,
                                              mixed_tokens=64, mixed=mixed, attention="kernel").start()
            futures = [engine.submit(GenerationRequest(p, n)) for p, n in zip(prompts, limits)]
            futures.append(engine.submit(sampled()))
            got = [f.result(300) for f in futures]
            engine.stop()
            ended = [c.finish_reason for c in got]
            print("stops", [c.token_ids for c in got[:6]] == [cut(r) for r in reference], ended[0], ended[3],
                  got[6].token_ids == drawn, got[6].token_ids[:5] != reference[1], sorted(engine._free))
    """)
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows[0][:3] == ["True", "True", "True"] and int(rows[0][3]) >= 3  # prompts rode on decode steps
    assert rows[0][-1] == "True" and rows[2][-1] == "True"  # one step ahead, mixed steps or not
    assert rows[2][:4] == ["False", "True", "True", "0"]
    for r in (rows[1], rows[3]):
        assert r[1:6] == ["True", "stop", "stop", "True", "True"], r
    assert all("[0," in r and "2]" in r for r in rows)  # every slot returned
