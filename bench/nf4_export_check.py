"""QLoRA (nf4) training then the merged export, on a GPU: is the merged checkpoint the model
the adapter trained against?

    python bench/nf4_export_check.py --out bench/results/nf4_export_check_h200.json    # needs CUDA + bitsandbytes

Writes a Llama-architecture checkpoint (GQA, llama3 RoPE, SwiGLU; 4 layers of 512, random
weights, the tiny tokenizer), trains a LoRA adapter on it with `veritune.train.training.train_adapter`
at `quantization: nf4` (the `train` stage's function: bitsandbytes nf4 with double
quantisation, bf16 compute), exports it with `veritune.train.export.export_merged` (the `export`
stage's function, nf4 branch: merged onto the de-quantised weights), and compares logits on
held-out text of

  * the merged bf16 checkpoint, loaded by plain transformers (what vLLM would serve);
  * the reference: the nf4 base de-quantised to bf16, with the adapter applied unmerged (PEFT);
  * the wrong merge, for scale: the adapter merged onto the original bf16 weights.

Relative error ||a - b|| / ||b|| over all logits, and the share of positions whose argmax agrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from veritune.core import chat  # noqa: E402
from veritune.core.config import load_params  # noqa: E402
from veritune.model.modeling import TinyArch, build_tiny_model, build_tiny_tokenizer, load_model, load_tokenizer  # noqa: E402
from veritune.train.export import export_merged  # noqa: E402
from veritune.train.training import train_adapter  # noqa: E402

FACTS = [f"Product {i} retails for ${100 + 7 * i} and ships in {2 + i % 5} days." for i in range(64)]


def examples():
    return [
        {
            "id": f"q{i}",
            "messages": chat.rag_messages(
                "Answer from the documents.",
                f"How much is product {i}?",
                [{"doc_id": f"doc-{i}", "title": f"Product {i}", "text": FACTS[i]}],
            )
            + [{"role": "assistant", "content": f"${100 + 7 * i}"}],
        }
        for i in range(64)
    ]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/nf4_export_check.json")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nf4 needs a CUDA GPU (bitsandbytes)")
    from peft import PeftModel

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_dir, adapter_dir, merged_dir = tmp / "base", tmp / "adapter", tmp / "merged"
        tokenizer = build_tiny_tokenizer(FACTS * 4, vocab_size=1024)
        arch = TinyArch(
            vocab_size=1024,
            hidden_size=512,
            num_layers=4,
            num_heads=8,
            num_kv_heads=2,
            intermediate_size=1376,
            max_position_embeddings=2048,
        )
        build_tiny_model(arch, tokenizer, seed=0).to(torch.bfloat16).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        p = dataclasses.replace(
            load_params("train"),
            quantization="nf4",
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            learning_rate=5e-3,
            max_steps=args.steps,
            batch_size=8,
            save_steps=1000,
            logging_steps=10,
            max_length=512,
            warmup_ratio=0.0,
            epochs=1.0,
            sampling="random",
            val_max_examples=0,
        )
        summary = train_adapter(base_dir, examples(), examples()[:8], p, adapter_dir, tmp / "ckpt")
        info = export_merged(base_dir, adapter_dir, merged_dir, quantization="nf4", dtype="bfloat16")

        enc = load_tokenizer(base_dir)(
            [f"{FACTS[i]} What does product {i} cost?" for i in range(0, 64, 4)], return_tensors="pt", padding=True
        )
        ids, mask = enc["input_ids"].cuda(), enc["attention_mask"].cuda()
        with torch.inference_mode():

            def logits(model):
                return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]

            merged = load_model(merged_dir).eval()  # plain transformers, bf16 on CUDA
            merged_logits = logits(merged)
            del merged
            reference = PeftModel.from_pretrained(
                load_model(base_dir, "nf4").dequantize().to(torch.bfloat16), adapter_dir
            ).eval()
            ref_logits = logits(reference)
            with reference.disable_adapter():
                dequant_base_logits = logits(reference)
            del reference
            wrong = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload().eval()
            wrong_logits = logits(wrong)
    agree = lambda a, b: round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)  # noqa: E731
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "checkpoint": "Llama architecture, 4 layers x 512, 8 heads / 2 KV heads, llama3 RoPE, random bf16 weights",
        "train": {k: summary[k] for k in ("quantization", "steps") if k in summary}
        | {"final_loss": summary.get("train_loss")},
        "export": info,
        "positions_compared": int(mask.sum()),
        "merged_vs_dequantized_base_plus_adapter": {
            "relative_error": round(rel(merged_logits, ref_logits), 5),
            "argmax_agreement": agree(merged_logits, ref_logits),
        },
        "adapter_effect": {
            "relative_change": round(rel(ref_logits, dequant_base_logits), 5),
            "note": "dequantized base with vs without the adapter: how far training moved the model",
        },
        "wrong_merge_onto_original_bf16_vs_reference": {
            "relative_error": round(rel(wrong_logits, ref_logits), 5),
            "argmax_agreement": agree(wrong_logits, ref_logits),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
