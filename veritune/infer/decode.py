"""The decoder: every reply veritune generates comes from here.

    replies = generate(model, tokenizer, conversations, max_new_tokens=24, batch_size=32)   # greedy chat replies
    rows = generate_ids(model, prompt_ids, max_new_tokens=96, stop_ids=stops, pad_id=pad,
                        temperature=0.3, constraints=[grammar.constraint() for _ in prompt_ids])
    completions = generate_batch(model, [GenerationRequest(ids, max_new_tokens=64)], stops, pad)

Two loops over one model, with one constraint interface, one sampling rule and the stop tokens
of the checkpoint's own chat format (`chat.stop_token_ids`):

* `generate_ids`: transformers' `generate` over a left-padded batch, greedy or sampled, with an
  optional shared-prefix key/value cache (`PrefixCache`). `generate` renders and decodes chat
  replies with it (evaluation, RAG robustness, CSAT, the judge); the agent's `ModelPolicy`
  decodes its tool-calling turns with it (`veritune.agent.policies`).
* `generate_batch`: a hand-written loop for serving, with what `generate` lacks there: each
  request its own `max_new_tokens`, stop, per-token callback (streaming), cancel flag and
  sampling generator, and a row that finishes leaves the batch (and the cache) at once. The
  server's micro-batches run it; the GPU engine (`veritune.serve.engine`) serves the same
  `GenerationRequest`s greedily. On the same prompts its greedy tokens are `generate`'s
  (tests/test_serve.py), but its float arithmetic is its own, so the offline stages keep
  transformers' loop.

A constraint, one per row (`veritune.infer.constraints.ToolCallConstraint` keeps tool calls
valid), has two methods: `mask()`, the allowed next tokens (a bool tensor over token ids) or
None for any, asked before a token is picked, and `consume(token_id)`, told the token picked.
Both loops apply it alike: the disallowed logits become -inf, then the token is picked.

Picking: greedy is the argmax. Sampling (temperature > 0) is transformers' own: the grammar
mask, the temperature, top-k `TOP_K`, a draw from the softmax; `generate_batch` runs the same
transformers warpers per row, so a served agent turn samples as `agent_eval`'s do.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from packaging.version import Version
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from veritune.core import chat
from veritune.model.modeling import inference_autocast

TOP_K = 50  # transformers' default top-k, which its sampling applies when nothing else is set

# generate()'s name for a prefilled cache: `cache` from transformers 5.24, `past_key_values` before.
GENERATE_CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in place (`allowed`: a bool mask over token
    ids; ids past its end are disallowed, entries past the logits' end ignored)."""
    n = logits.shape[-1]
    keep = torch.zeros(n, dtype=torch.bool, device=logits.device)
    m = min(n, allowed.shape[0])
    keep[:m] = allowed[:m].to(logits.device)
    logits.masked_fill_(~keep, float("-inf"))


class _RowConstraints(LogitsProcessor):
    """The constraints of a `generate` batch, one per row, as a transformers logits processor
    (a fresh one per `generate` call)."""

    def __init__(self, constraints: Sequence[Any]):
        self.rows = list(constraints)
        self._prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self._prompt_len:
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                if row.state in ("start", "call", "close"):
                    row.consume(token)
        for i, row in enumerate(self.rows):
            allowed = row.mask()
            if allowed is not None:
                apply_mask(scores[i], allowed)
        return scores


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """One token drawn from a row of (masked) logits as transformers' sampling draws it."""
    scores = logits.unsqueeze(0).to(dtype=torch.float32)
    scores = TopKLogitsWarper(top_k=TOP_K)(None, TemperatureLogitsWarper(temperature)(None, scores))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[0, 0])


# --------------------------------------------------------------------------- transformers' loop


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens all `rows` begin with, leaving each at least one of its own to prefill."""
    shortest = min(len(r) for r in rows)
    for j in range(shortest - 1):
        if any(r[j] != rows[0][j] for r in rows):
            return j
    return max(0, shortest - 1)


class PrefixCache:
    """The key/value cache of the prompt prefix a batch's rows share (an agent's system turn and
    tool definitions: ~600 of SmolLM2's ~1,000 prompt tokens), computed once and copied into
    each batch, so that only the rest of each prompt is prefilled. The replies are those of
    prefilling everything, up to float rounding."""

    MIN_TOKENS = 32  # below this, copying a cache costs more than it saves

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()  # the prefix whose cache is held
        self._cache = None

    def length(self, rows: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of `rows` to take from the cache (0: none)."""
        shared = shared_prefix_length(rows) if len(rows) > 1 else 0
        return shared if shared >= self.MIN_TOKENS else 0

    def for_batch(self, model, prefix: list[int], batch_size: int, device):
        """The prefix's cache, computed on first use of this prefix, repeated for the batch."""
        key = tuple(prefix)
        if self._cache is None or self.tokens != key:
            with inference_autocast(model):
                cache = model(torch.tensor([prefix], device=device), use_cache=True).past_key_values
            self.tokens, self._cache = key, cache
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch_size)
        return cache


@torch.inference_mode()
def generate_ids(
    model,
    rows: Sequence[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    constraints: Sequence[Any] | None = None,
    prefix: PrefixCache | None = None,
) -> torch.Tensor:
    """One batch of prompts (token ids) through transformers' `generate`: greedy, or sampled at
    `temperature` from torch's global generator; `constraints` one per row. Returns each row's
    new tokens (padding after its stop token)."""
    device = next(model.parameters()).device
    shared = prefix.length(rows) if prefix is not None else 0
    head = rows[0][:shared]
    width = max(len(r) for r in rows) - shared
    # [shared prefix][padding][rest of the prompt]: the mask skips the padding and the
    # positions count only real tokens, so each row reads as its unpadded prompt.
    input_ids = torch.tensor([head + [pad_id] * (width - len(r) + shared) + r[shared:] for r in rows], device=device)
    mask = torch.tensor(
        [[1] * shared + [0] * (width - len(r) + shared) + [1] * (len(r) - shared) for r in rows], device=device
    )
    options: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    )
    if constraints is not None:
        options["logits_processor"] = LogitsProcessorList([_RowConstraints(constraints)])
    if shared:
        options[GENERATE_CACHE_KWARG] = prefix.for_batch(model, head, len(rows), device)
    with inference_autocast(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            **options,
        )
    return out[:, input_ids.shape[1] :]


@torch.inference_mode()
def generate(
    model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int, desc: str = "generate"
) -> list[str]:
    """Greedy replies to each conversation, rendered in the checkpoint's own chat format
    (prompts left-padded, batched; special tokens dropped from the replies)."""
    stops = chat.stop_token_ids(tokenizer)
    prompts = [chat.render_conversation(tokenizer, c, add_generation_prompt=True) for c in conversations]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Longest first keeps padding per batch small; the order is restored at the end.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        out = generate_ids(
            model, [ids[i] for i in idx], max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=tokenizer.pad_token_id
        )
        for i, row in zip(idx, out):
            replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return replies


# --------------------------------------------------------------------------- the serving loop


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    on_token: Callable[[int], None] | None = None  # called from the worker thread after each new token
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Allowed next tokens (`mask()`, None: any) and the token picked (`consume`), e.g. a
    # `veritune.infer.constraints.ToolCallConstraint`; called from the worker thread.
    constraint: Any = None
    temperature: float = 0.0  # 0: greedy; > 0: sampled as `sample` does (the GPU engine decodes greedily)
    generator: torch.Generator | None = None  # the request's own draws (None: torch's global generator)


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens, the stop token excluded
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    batch_size: int  # how many requests shared this request's forward passes
    stop_token_id: int | None = None  # the stop token that ended it (finish_reason "stop")


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of `rows`, padded on the left so every row ends at the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(
    model, requests: Sequence[GenerationRequest], stop_ids: Sequence[int], pad_id: int
) -> list[Completion]:
    """Completions of `requests`, decoded together in one batch (each greedy or sampled as it asks).

    Left padding keeps each row's newest token in the last column; positions count only real
    tokens (cumulative attention mask), so a padded row decodes exactly as it would alone.
    A row that finishes (stop token, its own max_new_tokens, cancelled) leaves the batch and
    the KV cache at once, so the rest decode at the cost of the rows still running.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(requests)
    input_ids, attention_mask = left_pad([r.prompt_ids for r in requests], pad_id, device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    stopped_by: list[int | None] = [None] * n
    live = list(range(n))  # request index of each row still in the batch
    cache = DynamicCache(config=model.config)  # filled in place by each forward
    # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    while live:
        # logits_to_keep=1: only the last position's logits are needed, not the prompt's.
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        logits = out.logits[:, -1, :]
        for row, i in enumerate(live):
            constraint = requests[i].constraint
            allowed = constraint.mask() if constraint is not None else None
            if allowed is not None:
                apply_mask(logits[row], allowed)
        next_ids = logits.argmax(dim=-1)
        for row, i in enumerate(live):
            if requests[i].temperature > 0:
                next_ids[row] = sample(logits[row], requests[i].temperature, requests[i].generator)
        is_stop = torch.isin(next_ids, stops).tolist()
        tokens = next_ids.tolist()
        keep = []
        for row, i in enumerate(live):
            r = requests[i]
            if r.constraint is not None:
                r.constraint.consume(tokens[row])
            if r.cancelled.is_set():
                reasons[i] = "cancelled"
            elif is_stop[row]:
                reasons[i], stopped_by[i] = "stop", tokens[row]
            else:
                generated[i].append(tokens[row])
                if r.on_token is not None:
                    r.on_token(tokens[row])
                if len(generated[i]) >= r.max_new_tokens:
                    reasons[i] = "length"
            if reasons[i] is None:
                keep.append(row)
        if len(keep) < len(live):
            if not keep:
                break
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(rows)
            next_ids, attention_mask, position_ids = next_ids[rows], attention_mask[rows], position_ids[rows]
            live = [live[row] for row in keep]
        input_ids = next_ids.unsqueeze(-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return [
        Completion(
            token_ids=generated[i],
            finish_reason=reasons[i] or "length",
            prompt_tokens=len(r.prompt_ids),
            batch_size=n,
            stop_token_id=stopped_by[i],
        )
        for i, r in enumerate(requests)
    ]
