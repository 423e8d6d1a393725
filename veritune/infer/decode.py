"""Batched greedy generation from chat prompts."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from veritune.core import chat
from veritune.model.modeling import inference_autocast


stop_token_ids = chat.stop_token_ids  # the end-of-turn tokens of the checkpoint's own format


@torch.inference_mode()
def generate(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int,
             desc: str = "generate") -> list[str]:
    """Greedy replies to each conversation (prompts left-padded, batched)."""
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    prompts = [chat.render_conversation(tokenizer, c, add_generation_prompt=True) for c in conversations]
    # Longest first keeps padding per batch small; the order is restored at the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with inference_autocast(model):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return replies
