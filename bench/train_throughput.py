"""Training-step throughput of veritune's LoRA / QLoRA path on the Llama 3.1 8B architecture.

    python bench/train_throughput.py                       # the two headline modes
    python bench/train_throughput.py qlora_nf4,qlora_nf4-fused_lora,lora_bf16+ckpt
    python bench/train_throughput.py --peer ../shared/bench/peer_lora_bench.py   # adds the peer's loss curve

Random weights (speed and memory do not depend on their values), sequence 2048, 4 sequences
= 8,192 tokens per step, LoRA r=16 / alpha 32 on all linear layers of every block, AdamW.
Every mode runs in its own process (clean peak-memory reading, no kernel patching shared
between modes) through the same calls the `train` stage makes: veritune.model.modeling.load_model,
veritune.train.training.lora_config, veritune.train.fast_lora.prepare_for_training.

A mode is `qlora_nf4` or `lora_bf16`, then `+flag` / `-flag` to switch one of fused_lora,
liger, ckpt (activation checkpointing), liger_ce, compile (torch.compile per decoder layer)
against the mode's default:
    qlora_nf4: fused_lora, liger, ckpt     lora_bf16: fused_lora, liger (no checkpointing: 80 GB holds it)
The loss is the stage's: TRL's fused LM head (log-probs of the labelled tokens, in tiles,
never the full logits) and TRL's mean over labelled tokens; `+liger_ce` swaps in Liger's
fused linear cross-entropy instead. As in the stage (SFTTrainer), QLoRA adapters are bf16.

MFU counts what the peer counts, so the two are comparable: 4 x matmul params (forward and
the backward wrt activations; frozen weights get no gradient) + causal attention, per token,
over PEAK_TFLOPS (790: a measured bf16 dense matmul on an H100; see README).

Loss match: `--peer FILE` also builds the peer's `qlora_nf4_liger_noupcast` model with the
peer's own code, trains it 20 steps on the same batches from the same LoRA initialisation
and writes both loss curves, so the maths of the two steps can be compared step by step.
Environment: SEQ (2048), BS (4), STEPS (20: loss steps; the first WARM=3 are not timed),
CKPT (/tmp/llama31_8b_random), OUT (results directory).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

SEQ = int(os.environ.get("SEQ", 2048))
BS = int(os.environ.get("BS", 4))
STEPS = int(os.environ.get("STEPS", 20))
WARM = int(os.environ.get("WARM", 3))
PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", 790))
CKPT = Path(os.environ.get("CKPT", "/tmp/llama31_8b_random"))
DEFAULTS = {
    "qlora_nf4": {"fused_lora": True, "liger": True, "ckpt": True, "liger_ce": False, "compile": False},
    "lora_bf16": {"fused_lora": True, "liger": True, "ckpt": False, "liger_ce": False, "compile": False},
}


def llama31_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
    )


def ensure_checkpoint(path: Path) -> None:
    """Random 8B weights saved in the Hugging Face layout, so loading takes the real path."""
    if (path / "config.json").exists():
        return
    from transformers import LlamaForCausalLM

    start = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama31_8b_config())
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"# wrote a random 8B checkpoint to {path} in {time.time() - start:.0f}s", flush=True)


def parse_mode(mode: str) -> tuple[str, dict]:
    match = re.fullmatch(r"(qlora_nf4|lora_bf16)((?:[+-]\w+)*)", mode)
    if not match:
        raise SystemExit(f"unknown mode {mode!r}: qlora_nf4 or lora_bf16, then +flag / -flag")
    flags = dict(DEFAULTS[match[1]])
    for sign, flag in re.findall(r"([+-])(\w+)", match[2]):
        if flag not in flags:
            raise SystemExit(f"unknown flag {flag!r} in mode {mode!r}; flags: {sorted(flags)}")
        flags[flag] = sign == "+"
    return match[1], flags


def flops_per_token(config) -> float:
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    matmul_params = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + vocab * d
    attention = 2 * 2 * layers * SEQ * d
    return 4 * matmul_params + 2 * attention


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randint(0, vocab, (BS, SEQ), device="cuda", generator=g) for _ in range(4)]


def stage_loss(model, x: torch.Tensor) -> torch.Tensor:
    """The train stage's loss: TRL's fused LM head, mean -log p over labelled tokens."""
    out = model(input_ids=x, labels=x, fused_lm_head=True)
    return -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)


def plain_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def train_steps(model, vocab: int, loss_fn=plain_loss) -> tuple[list[float], list[float]]:
    """STEPS optimizer steps on fixed random batches; per-step losses and seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    data = batches(vocab)
    losses, seconds = [], []
    for step in range(STEPS):
        x = data[step % len(data)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return losses, seconds


def profile_step(model, loss_fn, out: Path | None) -> None:
    """One more step under the torch profiler: where the time goes, by kernel."""
    from torch.profiler import ProfilerActivity, profile

    x = batches(model.config.vocab_size)[0]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss_fn(model, x).backward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    print(table, flush=True)
    if out:
        (out / "profile.txt").write_text(table)


def run_one(mode: str, lora_init: Path | None, out: Path | None) -> dict:
    import dataclasses

    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from veritune.core.config import load_params
    from veritune.model.modeling import load_model
    from veritune.train.fast_lora import prepare_for_training
    from veritune.train.training import lora_config

    name, flags = parse_mode(mode)
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    model = load_model(CKPT, "nf4" if name == "qlora_nf4" else "none")
    print(f"# {mode}: loaded in {time.time() - start:.0f}s", flush=True)
    params = dataclasses.replace(
        load_params("train"), lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
    )
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(params))
    if lora_init is not None and lora_init.exists():
        missing = model.load_state_dict(torch.load(lora_init), strict=False).unexpected_keys
        if missing:
            raise SystemExit(f"LoRA init does not match the model: {missing[:3]}")
    if name == "qlora_nf4":  # SFTTrainer keeps QLoRA adapters in bf16 (QLoRA paper, section 3)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if not flags["liger_ce"]:
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    switched = prepare_for_training(
        model,
        fused_lora=flags["fused_lora"],
        liger=flags["liger"],
        gradient_checkpointing=flags["ckpt"],
        liger_cross_entropy=flags["liger_ce"],
        compile=flags["compile"],
    )
    model.train()
    losses, seconds = train_steps(model, model.config.vocab_size, plain_loss if flags["liger_ce"] else stage_loss)
    timed = sorted(seconds[WARM:])
    step_s = timed[len(timed) // 2]
    tok_s = BS * SEQ / step_s
    row = {
        "mode": mode,
        **{k: v for k, v in flags.items()},
        "seq": SEQ,
        "bs": BS,
        "step_s": round(step_s, 3),
        "tok_s": round(tok_s),
        "mfu": round(tok_s * flops_per_token(model.config) / (PEAK_TFLOPS * 1e12), 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "losses": [round(x, 5) for x in losses],
        "switched": switched,
        "device": torch.cuda.get_device_name(),
    }
    print("ROW", json.dumps(row), flush=True)
    if os.environ.get("PROFILE") == mode:
        profile_step(model, plain_loss if flags["liger_ce"] else stage_loss, out)
    return row


def peer_losses(peer_file: Path, lora_init: Path, out: Path | None) -> dict:
    """The peer's own model build (qlora_nf4_liger_noupcast), our loop, the same batches."""
    spec = importlib.util.spec_from_file_location("peer_bench", peer_file)
    peer = importlib.util.module_from_spec(spec)
    sys.argv = [sys.argv[0], "qlora_nf4_liger_noupcast"]
    spec.loader.exec_module(peer)
    peer.CKPT_DIR = str(CKPT)
    torch.manual_seed(0)
    model = peer.build("qlora_nf4_liger_noupcast")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}, lora_init)
    model.train()
    losses, seconds = train_steps(model, model.config.vocab_size)
    row = {
        "mode": "peer:qlora_nf4_liger_noupcast",
        "losses": [round(x, 5) for x in losses],
        "step_s": round(sorted(seconds[WARM:])[len(seconds[WARM:]) // 2], 3),
    }
    print("ROW", json.dumps(row), flush=True)
    if out:
        (out / "peer_losses.json").write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", nargs="?", default="qlora_nf4,lora_bf16")
    parser.add_argument("--peer", type=Path, help="peer_lora_bench.py: also compare loss curves")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--peer-losses", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-init", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if args.one:
        run_one(args.one, args.lora_init, out)
        return
    if args.peer_losses:
        peer_losses(args.peer, args.lora_init, out)
        return

    ensure_checkpoint(CKPT)
    lora_init = Path("/tmp/veritune_lora_init.pt")
    rows = []

    def child(*extra: str) -> None:
        proc = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
        for line in proc.stdout.splitlines():
            print(line, flush=True)
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))

    if args.peer:
        child("--peer-losses", "--peer", str(args.peer), "--lora-init", str(lora_init))
    for mode in args.modes.split(","):
        child("--one", mode, *(["--lora-init", str(lora_init)] if args.peer else []))

    print(f"\n{'mode':<28} {'tok/s':>7} {'MFU':>5} {'peak GiB':>8} {'step s':>6}")
    for r in rows:
        if "tok_s" in r:
            print(f"{r['mode']:<28} {r['tok_s']:>7} {r['mfu']:>5.2f} {r['peak_gib']:>8.2f} {r['step_s']:>6.3f}")
    peer = next((r for r in rows if r["mode"].startswith("peer:")), None)
    if peer:
        for r in rows:
            if "tok_s" in r and r["mode"].startswith("qlora_nf4"):
                worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], peer["losses"]))
                print(
                    f"loss vs peer over {len(peer['losses'])} steps ({r['mode']}): max relative difference {worst:.4%}"
                )
    if out:
        (out / "train_throughput.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
