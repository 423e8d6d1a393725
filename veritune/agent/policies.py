"""Who writes an agent's turns: a causal LM (`ModelPolicy`) or a scripted oracle (`OraclePolicy`).

A policy is called with the open episodes of a round and returns one reply per episode, the
text up to and including the token that ended it (`veritune.agent.loop.parse_reply` reads it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from veritune.agent.loop import Episode, episode_prompt
from veritune.core import chat
from veritune.infer.constraints import ToolCallGrammar
from veritune.infer.decode import PrefixCache, generate_ids


class ModelPolicy:
    """A causal LM writing each turn from the rendering of the conversation in its own chat
    format's tool layout (`chat.ChatFormat.render`), in offline batches of the decoding loop
    (`veritune.infer.decode.generate_ids`): greedy at temperature 0, else sampled from torch's
    global generator (`reseed` sets it per trial).

    Every episode's prompt opens with the same system turn (agent prompt and tool definitions),
    so its keys and values are computed once (`PrefixCache`) and copied into each batch. The
    replies are those of prefilling everything, up to float rounding."""

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int,
        batch_size: int,
        temperature: float,
        seed: int,
        grammar: ToolCallGrammar | None = None,
        prefix_cache: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.temperature, self.seed = temperature, seed
        self.grammar = grammar  # constrained tool calls (veritune.infer.constraints); None: free decoding
        self.fmt = chat.chat_format(tokenizer)
        self.stops = chat.stop_token_ids(tokenizer)
        self.prefix_cache = PrefixCache() if prefix_cache else None

    @torch.inference_mode()
    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        prompts = [episode_prompt(e) for e in episodes]
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # Batches of similar length: padding to the longest prompt is computed like any other
        # token, and episodes' prompts differ by hundreds of tokens after a few turns.
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        replies: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [ids[i] for i in batch]
            constraints = [self.grammar.constraint() for _ in rows] if self.grammar is not None else None
            out = generate_ids(
                self.model,
                rows,
                max_new_tokens=self.max_new_tokens,
                stop_ids=self.stops,
                pad_id=self.tokenizer.pad_token_id,
                temperature=self.temperature,
                constraints=constraints,
                prefix=self.prefix_cache,
            )
            for i, row in zip(batch, out):
                replies[i] = self.tokenizer.decode(row, skip_special_tokens=False)
        return [replies[i] for i in range(len(prompts))]

    def reseed(self, seed: int) -> None:
        self.seed = seed
        torch.manual_seed(seed)


class OraclePolicy:
    """A scripted policy that replays each task's gold calls, then gives its gold answer:
    it scores 1.0 exactly when the tasks, the tools and the checker agree."""

    def __init__(self, tasks: Sequence[dict]):
        self.tasks = {t["id"]: t for t in tasks}

    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        out = []
        for e in episodes:
            task = self.tasks[e.id.split("#")[0]]
            turn = sum(m["role"] == "assistant" for m in e.messages)
            if turn < len(task["gold_calls"]):
                c = task["gold_calls"][turn]
                out.append(e.fmt.written_call(e.fmt.call_text(c["name"], c["parameters"])))
            else:
                out.append(task["answer"] + e.fmt.end_of_turn)
        return out
