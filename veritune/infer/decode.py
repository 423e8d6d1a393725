"""The decoder: every reply veritune generates comes from here.

    replies = generate(model, tokenizer, conversations, max_new_tokens=24, batch_size=32)   # greedy chat replies
    rows = generate_ids(model, prompt_ids, max_new_tokens=96, stop_ids=stops, pad_id=pad,
                        temperature=0.3, constraints=[grammar.constraint() for _ in prompt_ids])
    completions = generate_batch(model, [GenerationRequest(ids, max_new_tokens=64)], stops, pad)

One decoding loop, `generate_batch`, over `GenerationRequest`s: each request its own prompt,
`max_new_tokens`, constraint, temperature and sampling generator, per-token callback
(streaming) and cancel flag, and the stop tokens of the checkpoint's own chat format
(`chat.stop_token_ids`). Prompts are left-padded into one batch; positions count only real
tokens, so a padded row decodes as it would alone. Two ways for a finished row:

* serving (`keep_finished=False`, the server's micro-batches): a row that finishes (stop
  token, its own `max_new_tokens`, cancelled) leaves the batch and the key/value cache at
  once, so the rest decode at the cost of the rows still running;
* offline (`keep_finished=True`, through `generate_ids`): a finished row stays in the batch,
  fed padding, until every row is done, as transformers' `generate` keeps it. The batch's
  arithmetic then never depends on when its neighbours finish, and a sampled batch draws
  from torch's generator exactly as `generate` draws: `tests/test_decode.py` checks that
  `generate_ids` writes `generate`'s tokens, greedy, sampled, constrained and with a shared
  prefix. `generate` (evaluation, RAG robustness, CSAT, the judge) and the agent's
  `ModelPolicy` decode through it, with an optional shared-prefix cache (`PrefixCache`).

The GPU engine (`veritune.serve.engine`) runs its own forward over a static cache, but picks
every token with this module's `choose`, as the loop does.

A constraint, one per row (`veritune.infer.constraints.ToolCallConstraint` keeps tool calls
valid), has two methods: `mask()`, the allowed next tokens (a bool tensor over token ids) or
None for any, asked before a token is picked, and `consume(token_id)`, told the token picked.

Picking (`choose`): the disallowed logits become -inf; then greedy is the argmax, and sampling
(temperature > 0) is transformers' own: the temperature, top-k `TOP_K`, a draw from the
softmax, from the request's generator (None: torch's global one). Served agent turns
therefore sample as `agent_eval`'s do.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper

from veritune.core import chat
from veritune.infer import calc
from veritune.model.modeling import inference_autocast

TOP_K = 50  # transformers' default top-k, which its sampling applies when nothing else is set


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    on_token: Callable[[int], None] | None = None  # called from the worker thread after each new token
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Allowed next tokens (`mask()`, None: any) and the token picked (`consume`), e.g. a
    # `veritune.infer.constraints.ToolCallConstraint`; called from the worker thread.
    constraint: Any = None
    temperature: float = 0.0  # 0: greedy; > 0: sampled (`choose`)
    generator: torch.Generator | None = None  # the request's own draws (None: torch's global generator)


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens, the stop token excluded
    finish_reason: str  # "stop" (a stop token), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    batch_size: int  # how many requests shared this request's forward passes
    stop_token_id: int | None = None  # the stop token that ended it (finish_reason "stop")


# --------------------------------------------------------------------------- picking a token


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in place (`allowed`: a bool mask over token
    ids; ids past its end are disallowed, entries past the logits' end ignored)."""
    n = logits.shape[-1]
    keep = torch.zeros(n, dtype=torch.bool, device=logits.device)
    m = min(n, allowed.shape[0])
    keep[:m] = allowed[:m].to(logits.device)
    logits.masked_fill_(~keep, float("-inf"))


def sample_rows(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of (masked) logits [rows, vocab], drawn as transformers' sampling draws
    a batch: the temperature, top-k TOP_K, one multinomial draw over the softmax of all rows."""
    scores = logits.to(dtype=torch.float32)
    scores = TopKLogitsWarper(top_k=TOP_K)(None, TemperatureLogitsWarper(temperature)(None, scores))
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[:, 0]


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """One token drawn from one row of (masked) logits, as `sample_rows` draws a batch of one."""
    return int(sample_rows(logits.unsqueeze(0), temperature, generator)[0])


def choose(logits: torch.Tensor, request: GenerationRequest, greedy: int | None = None) -> int:
    """The next token of `request` from its row of logits: its constraint's mask, then the
    argmax at temperature 0, else a draw at its temperature from its generator. `greedy`, the
    row's argmax when the caller has it (a batched argmax), saves the work for a plain greedy row."""
    allowed = request.constraint.mask() if request.constraint is not None else None
    if allowed is None and request.temperature <= 0 and greedy is not None:
        return greedy
    scores = logits.to(dtype=torch.float32, copy=True)
    if allowed is not None:
        apply_mask(scores, allowed)
    if request.temperature > 0:
        return sample(scores, request.temperature, request.generator)
    return int(scores.argmax())


# --------------------------------------------------------------------------- the loop


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


def padded_batch(
    rows: Sequence[Sequence[int]], pad_id: int, shared: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of `rows` laid out [shared prefix][padding][rest of the
    prompt] (`shared` 0: plain left padding), so every row ends at the last column."""
    head = list(rows[0][:shared])
    width = max(len(r) for r in rows)
    ids = torch.tensor([head + [pad_id] * (width - len(r)) + list(r[shared:]) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows])
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(
    model,
    requests: Sequence[GenerationRequest],
    stop_ids: Sequence[int],
    pad_id: int,
    *,
    keep_finished: bool = False,
    prefix: PrefixCache | None = None,
) -> list[Completion]:
    """Completions of `requests`, decoded together in one batch (each greedy or sampled as it
    asks; see the module docstring for `keep_finished`). `prefix`: take the rows' shared
    prompt prefix from this cache instead of prefilling it."""
    device = next(model.parameters()).device
    n = len(requests)
    prompts = [r.prompt_ids for r in requests]
    shared = prefix.length(prompts) if prefix is not None else 0
    input_ids, attention_mask = padded_batch(prompts, pad_id, shared, device)
    # Positions count real tokens only (transformers' rule: cumulative mask, padding at 0).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if shared:
        cache = prefix.for_batch(model, list(prompts[0][:shared]), n, device)
        input_ids, position_ids = input_ids[:, shared:], position_ids[:, shared:]
    else:
        cache = DynamicCache(config=model.config)  # filled in place by each forward
    stops = set(stop_ids)
    generated: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    stopped_by: list[int | None] = [None] * n
    live = list(range(n))  # request index of each row of the batch
    # An offline batch sampled at one temperature from one generator draws all its rows at once,
    # finished ones included, as `generate` does: on CUDA a draw depends on the shape drawn.
    first = requests[0]
    one_draw = keep_finished and first.temperature > 0
    one_draw = one_draw and all(r.temperature == first.temperature and r.generator is first.generator for r in requests)
    # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    while True:
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
        greedy = logits.argmax(dim=-1).tolist()
        if one_draw:
            scores = logits.to(dtype=torch.float32, copy=True)
            for row, i in enumerate(live):
                constraint = requests[i].constraint
                allowed = constraint.mask() if constraint is not None and reasons[i] is None else None
                if allowed is not None:
                    apply_mask(scores[row], allowed)
            drawn = sample_rows(scores, first.temperature, first.generator).tolist()
        tokens = []
        for row, i in enumerate(live):
            r = requests[i]
            if reasons[i] is not None:  # finished, kept in the batch: padding
                if r.temperature > 0 and not one_draw:  # its draw keeps the generator in step
                    sample(logits[row], r.temperature, r.generator)
                tokens.append(pad_id)
                continue
            token = drawn[row] if one_draw else choose(logits[row], r, greedy[row])
            tokens.append(token)
            if r.constraint is not None:
                r.constraint.consume(token)
            if r.cancelled.is_set():
                reasons[i] = "cancelled"
            elif token in stops:
                reasons[i], stopped_by[i] = "stop", token
            else:
                generated[i].append(token)
                if r.on_token is not None:
                    r.on_token(token)
                if len(generated[i]) >= r.max_new_tokens:
                    reasons[i] = "length"
        if all(reasons[i] is not None for i in live):
            break
        next_ids = torch.tensor(tokens, dtype=torch.long, device=device)
        if not keep_finished:
            keep = [row for row, i in enumerate(live) if reasons[i] is None]
            if len(keep) < len(live):
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


# --------------------------------------------------------------------------- offline batches


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
    """One offline batch of prompts (token ids): greedy, or sampled at `temperature` from
    torch's global generator; `constraints` one per row. Returns each row's new tokens as
    `generate` does: its stop token, then padding to the batch's longest."""
    constraints = constraints if constraints is not None else [None] * len(rows)
    requests = [
        GenerationRequest(list(r), max_new_tokens, constraint=c, temperature=temperature)
        for r, c in zip(rows, constraints)
    ]
    with inference_autocast(model):
        done = generate_batch(model, requests, stop_ids, pad_id, keep_finished=True, prefix=prefix)
    written = [c.token_ids + ([c.stop_token_id] if c.stop_token_id is not None else []) for c in done]
    width = max(len(w) for w in written)
    device = next(model.parameters()).device
    return torch.tensor([w + [pad_id] * (width - len(w)) for w in written], dtype=torch.long, device=device)


@torch.inference_mode()
def generate(
    model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int, batch_size: int, desc: str = "generate"
) -> list[str]:
    """Greedy replies to each conversation, rendered in the checkpoint's own chat format
    (prompts left-padded, batched; special tokens dropped from the replies, calculator spans
    resolved, `veritune.infer.calc`)."""
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
            replies[i] = calc.finish(tokenizer.decode(row, skip_special_tokens=True)).strip()
    return replies
