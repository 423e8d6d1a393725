"""A short causal-LM pretraining of the tiny base model on the training documents.

A randomly initialised model cannot learn to copy facts out of a prompt within a few CPU
minutes of LoRA. Reading the documents first gives it the domain's words; windows that
repeat one of their documents (`repeat_prob`) make the next tokens predictable only by
looking back, which is what forms the induction (copy) heads grounded QA depends on.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from veritune.core.params import PretrainParams
from veritune.model.modeling import use_bf16

log = logging.getLogger(__name__)


def make_window(docs: Sequence[list[int]], seq_len: int, repeat_prob: float, rng: random.Random) -> list[int]:
    """One training window of `seq_len + 1` tokens built from whole documents."""
    window: list[int] = []
    used: list[list[int]] = []
    repeat_at = seq_len // 2 if rng.random() < repeat_prob else None
    while len(window) <= seq_len:
        if repeat_at is not None and len(window) >= repeat_at and used:
            doc = rng.choice(used)
            repeat_at = None
        else:
            doc = docs[rng.randrange(len(docs))]
            used.append(doc)
        window.extend(doc)
    return window[: seq_len + 1]


def pretrain(model, docs: Sequence[list[int]], p: PretrainParams, seed: int) -> list[dict]:
    """Full-parameter LM training of `model` in place; returns the loss log."""
    if p.steps == 0:
        return []
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.train()
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    no_decay = [q for n, q in model.named_parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p.learning_rate,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < p.warmup_steps:
            return p.learning_rate * (step + 1) / p.warmup_steps
        progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
        return p.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    history = []
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16())
    bar = tqdm(range(p.steps), desc="pretrain base", unit="step")
    for step in bar:
        batch = torch.tensor(
            [make_window(docs, p.seq_len, p.repeat_prob, rng) for _ in range(p.batch_size)], device=device
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            loss = _next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # No wall-clock times in the log: it is part of the artifact, which must not change
        # between identical runs.
        history.append({"step": step + 1, "loss": loss.item(), "lr": lr_at(step)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.to("cpu")
    return history


def _next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def build_tiny_base(
    documents: Sequence[dict], doc_split: dict[str, str], p, out_dir, sft_conversations: Sequence[list[dict]] = ()
) -> dict:
    """Tokenizer, model and pretraining of the tiny default from the training documents;
    saved to `out_dir` in the Hugging Face layout. `p` is a BaseParams.

    `sft_conversations` (the SFT train set's messages) feed the tokenizer where
    `p.tokenizer_from_sft` (a tool call then costs ~20 tokens instead of ~40, a tool prompt
    ~350 instead of ~800) and, where `p.pretrain.tool_prompts`, the pretraining: the tool
    conversations' system and user prompts, so the format's tokens have trained embeddings
    before LoRA, which leaves embeddings frozen, has to use them."""
    from veritune.core import chat
    from veritune.core.config import as_dict
    from veritune.core.io import write_jsonl
    from veritune.model.modeling import TinyArch, build_tiny_model, build_tiny_tokenizer, save_tokenizer
    from veritune.train.tokenization import is_tool_conversation

    # Only training documents: held-out documents must stay unseen until test time.
    texts = [f"{d['title']}\n{d['text']}" for d in documents if doc_split[d["id"]] == "train"]
    conversations = [chat.format_chat(m) for m in sft_conversations] if p.tokenizer_from_sft else []
    tokenizer = build_tiny_tokenizer(texts + conversations, p.tiny.vocab_size)
    model = build_tiny_model(TinyArch(**as_dict(p.tiny)), tokenizer, p.seed)
    if p.pretrain.tool_prompts:
        texts += [
            chat.format_chat(m[:2]).removeprefix(chat.BEGIN_OF_TEXT)
            for m in sft_conversations
            if is_tool_conversation(m)
        ]
    bos, eot = tokenizer.convert_tokens_to_ids([chat.BEGIN_OF_TEXT, chat.END_OF_TEXT])
    docs = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eot] for t in texts]
    start = time.time()
    history = pretrain(model, docs, p.pretrain, p.seed)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    write_jsonl(out_dir / "pretrain_log.jsonl", history)
    tail = history[-20:]
    return {
        "n_params": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_pretrain_docs": len(docs),
        "pretrain_final_loss": round(sum(h["loss"] for h in tail) / len(tail), 4) if tail else None,
        "pretrain_seconds": round(time.time() - start, 1),
    }
