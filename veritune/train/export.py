"""Merge a LoRA adapter into its base: one checkpoint plain transformers (or vLLM) loads.

An adapter trained with QLoRA learned against the *de-quantised* nf4 weights, not the
original bf16 ones: merging it onto the originals would add the quantisation error back
as an unseen shift. So an nf4-trained adapter is merged onto `dequantize(quantize(W))`,
exactly what the forward pass used during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from veritune.model.modeling import load_model, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def merged_model(base_dir: Path, adapter_dir: Path, quantization: str = "none", dtype: str = "bfloat16"):
    """The base with the adapter folded into its weights, in `dtype`."""
    from peft import PeftModel

    model = load_model(base_dir, quantization)
    if quantization == "nf4":
        model = model.dequantize()  # nf4 -> the compute dtype, the weights the adapter trained against
    model = model.to(torch.float32)  # merge in fp32: W + s B A without a bf16 rounding of the sum's parts
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.to(DTYPES[dtype])


def export_merged(
    base_dir: Path, adapter_dir: Path, out_dir: Path, quantization: str = "none", dtype: str = "bfloat16"
) -> dict:
    """Write the merged checkpoint (safetensors, config, tokenizer with chat template)."""
    model = merged_model(base_dir, adapter_dir, quantization, dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    save_tokenizer(
        load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir), out_dir
    )
    params = sum(p.numel() for p in model.parameters())
    info = {
        "dtype": dtype,
        "merged_onto": "dequantized nf4" if quantization == "nf4" else "base weights",
        "parameters": params,
    }
    (out_dir / "merge_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("export: merged %s parameters into %s (%s)", f"{params:,}", out_dir, dtype)
    return info
