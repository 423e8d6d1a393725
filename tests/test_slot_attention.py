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


def test_the_kernel_form_of_the_engine_decodes_as_hf_generate():
    """Six requests through three slots: prompts longer than a step's budget are split over
    mixed steps beside the decoding rows (and over prefill steps with separate passes)."""
    out = run_interpreted("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from veritune.infer.decode import GenerationRequest
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
        for mixed in (True, False):
            engine = ContinuousBatchingEngine(model, [], max_batch=3, max_len=256, prefill_tokens=64,
                                              mixed_tokens=64, mixed=mixed, attention="kernel").start()
            got = [f.result(300).token_ids for f in [engine.submit(GenerationRequest(p, n))
                                                     for p, n in zip(prompts, limits)]]
            engine.stop()
            print(mixed, got == reference, engine.kernel, engine.mixed_steps, sorted(engine._free))
    """)
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows[0][:3] == ["True", "True", "True"] and int(rows[0][3]) >= 3  # prompts rode on decode steps
    assert rows[1][:4] == ["False", "True", "True", "0"]
    assert all(r[4:] == ["[0,", "1,", "2]"] for r in rows)  # every slot returned
