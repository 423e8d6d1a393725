"""The `train` stage's LoRA step on a CPU: what the padding mask and the attention precision cost.

    python bench/train_step_cpu.py          # after `dvc repro build_sft base` (2-core CPU: ~2 min)

Builds LoRA (the default's r=32 on all linear layers) on `models/base` and times optimizer
steps on real batches of `data/sft/train.jsonl` (8 examples of like length, padded on the
right as the trainer pads them: nine QA batches of 220-430 tokens and one of tool-calling
trajectories of ~950), under bf16 autocast, with the loss of `veritune.train.training` computed
three ways in the same run, fastest last:
  mask       the padding mask passed to attention, SDPA in bf16 (the step before this change)
  no_mask    right padding under causal attention: no mask, so SDPA takes its causal kernel
  fp32_attn  no mask, and SDPA in float32 inside the autocast region (`use_fp32_attention`)
Configurations are timed in turn, five rounds after a warm-up, and each reports the median.
Each configuration's loss on the same batches before any update is printed beside its time:
dropping the mask leaves it unchanged to the last digit, float32 attention moves it by rounding.
Also times SDPA alone (forward + backward, causal, 8 heads of 32) in bf16 and float32 by
length. Writes `bench/results/train_step_cpu.json`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from veritune.core.io import read_jsonl, write_json  # noqa: E402
from veritune.model.modeling import load_model, load_tokenizer, use_fp32_attention  # noqa: E402
from veritune.train.tokenization import is_tool_conversation, tokenize_example  # noqa: E402
from veritune.train.training import label_position_loss  # noqa: E402

REPEATS = 1  # passes over the 10 batches per timing
ROUNDS = 5  # timings per configuration, interleaved; the median is reported


def batches(tokenizer) -> list[dict]:
    examples = read_jsonl(REPO / "data/sft/train.jsonl")
    qa = [tokenize_example(e["messages"], tokenizer) for e in examples[:360] if not is_tool_conversation(e["messages"])]
    tools = [tokenize_example(e["messages"], tokenizer) for e in examples if is_tool_conversation(e["messages"])][:8]
    qa.sort(key=lambda r: len(r["input_ids"]))
    groups = [qa[i : i + 8] for i in range(0, len(qa), len(qa) // 9)][:9] + [tools]
    out = []
    for rows in groups:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def time_steps(config: str, data: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(REPO / "models/base")
    if config == "fp32_attn":
        use_fp32_attention(model)
    model = get_peft_model(
        model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.train()
    causal_lm = model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_of(batch):
        inputs = dict(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if config == "mask":  # the model's own forward keeps the mask; same loss head
                hidden = causal_lm.model(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
                targets = inputs["labels"][:, 1:]
                keep = targets != -100
                logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
                return F.cross_entropy(logits, targets[keep])
            return label_position_loss(causal_lm, inputs)[0]

    with torch.no_grad():
        initial = sum(float(loss_of(b)) for b in data) / len(data)
    loss_of(data[0]).backward()
    optimizer.zero_grad()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for batch in data:
            loss_of(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
        times.append((time.perf_counter() - start) / len(data))
    return {"ms_per_step": round(1000 * median(times), 1), "initial_loss": round(initial, 6)}


def sdpa_ms(length: int, dtype: torch.dtype, batch: int = 8, heads: int = 8, head_dim: int = 32) -> float:
    q, k, v = (torch.randn(batch, heads, length, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        times.append(time.perf_counter() - start)
    return round(1000 * median(times[1:]), 1)


def main() -> None:
    tokenizer = load_tokenizer(REPO / "models/base")
    data = batches(tokenizer)
    configs = ("mask", "no_mask", "fp32_attn")
    time_steps("mask", data)  # warm-up: the first model built in a process pays for allocation
    runs = {c: [] for c in configs}
    for _ in range(ROUNDS):  # interleaved, so a busy spell on a shared machine hits all alike
        for c in configs:
            runs[c].append(time_steps(c, data))
    steps = {
        c: {
            "ms_per_step": median(r["ms_per_step"] for r in rows),
            "ms_per_step_runs": [r["ms_per_step"] for r in rows],
            "initial_loss": rows[0]["initial_loss"],
        }
        for c, rows in runs.items()
    }
    results = {
        "threads": torch.get_num_threads(),
        "batch_lengths": [b["input_ids"].shape[1] for b in data],
        "steps": steps,
        "sdpa_fwd_bwd_ms": {
            str(n): {"bf16": sdpa_ms(n, torch.bfloat16), "fp32": sdpa_ms(n, torch.float32)}
            for n in (256, 384, 512, 768, 1024, 1536)
        },
    }
    base = results["steps"]["mask"]["ms_per_step"]
    for row in results["steps"].values():
        row["speedup_vs_mask"] = round(base / row["ms_per_step"], 2)
    write_json(REPO / "bench/results/train_step_cpu.json", results)
    print(f"batches of 8, lengths {results['batch_lengths']}, {results['threads']} threads")
    for name, row in results["steps"].items():
        print(
            f"{name:10s} {row['ms_per_step']:7.1f} ms/step  x{row['speedup_vs_mask']:.2f}  "
            f"loss before training {row['initial_loss']}"
        )
    print(
        "SDPA fwd+bwd, 8 x 8 heads x 32, causal:  "
        + "  ".join(f"{n}: bf16 {v['bf16']} / fp32 {v['fp32']} ms" for n, v in results["sdpa_fwd_bwd_ms"].items())
    )


if __name__ == "__main__":
    main()
