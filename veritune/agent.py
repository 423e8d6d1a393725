"""The tool-using loop: a policy (a fine-tuned model, or a scripted oracle) drives a
customer workflow through the shop's tools in the checkpoint's tool-calling format
(`chat.ChatFormat`: Llama 3.1's or ChatML's).

Each turn the policy writes either a tool call (Llama 3.1: `<|python_tag|>{"name": ...,
"parameters": ...}<|eom_id|>`; ChatML: `<tool_call>\n{"name": ..., "arguments": ...}\n
</tool_call><|im_end|>`) or the final answer ending the turn. A call is parsed, checked
against its tool's JSON schema and run on the episode's own copy of the database; its
result (or the refusal, with what to fix) goes back in the format's tool role. The loop never
raises on what a model writes: malformed JSON, unknown tools, wrong or missing arguments
are reported back and count as a retry; too many retries in a row, too many steps or too
much wall time end the episode.

Episodes run in lockstep so one batched `generate` serves every open episode per turn.
`run_agent` drives one customer request through the same loop for the server's agent mode.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessorList
from tqdm.auto import tqdm

from veritune import chat
from veritune.config import BuildSftParams
from veritune.constrained import ConstrainedCalls, ToolCallGrammar
from veritune.modeling import inference_autocast
from veritune.tools import TODAY, Toolbox, ToolError, authorised_writes, check_call, episode_database, tool_definitions

DB = "data/agent/business.sqlite"  # the shop database `agent_db` builds


@dataclass(frozen=True)
class AgentLimits:
    max_steps: int = 8  # model turns per episode (a task needs 2-5)
    max_retries: int = 2  # refused calls in a row before the episode is given up
    max_seconds: float = 120.0  # wall time per episode


@dataclass(frozen=True)
class Reply:
    kind: str  # "call", "malformed" or "answer"
    text: str  # the call's JSON text or the answer
    name: str | None = None
    parameters: dict | None = None
    error: str | None = None


@dataclass
class Episode:
    id: str
    request: str
    messages: list[dict]
    toolbox: Toolbox
    steps: list[dict] = field(default_factory=list)
    answer: str | None = None
    stop: str | None = None  # answer, max_retries, max_steps or time_limit once ended
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    fmt: chat.ChatFormat = chat.LLAMA3  # the chat format the policy writes

    @property
    def calls(self) -> list[dict]:
        return [s for s in self.steps if s["type"] == "call"]


def parse_reply(raw: str, fmt: chat.ChatFormat = chat.LLAMA3) -> Reply:
    """What a policy wrote, up to its first stop token: a tool call or an answer."""
    text = raw.replace(chat.PAD, "") if fmt is chat.LLAMA3 else raw
    stops = [(text.find(s), s) for s in fmt.stop_tokens if s in text]
    ended = bool(stops)
    if stops:
        text = text[: min(stops)[0]]
    text = text.strip()
    # Llama 3.1 calls open with <|python_tag|>, ChatML calls with <tool_call>; a bare JSON
    # call (what Meta's HF template writes without ipython mode) is taken as a call too.
    opener = fmt.call_open.strip()
    if not (text.startswith(opener) or text.startswith('{"name"')):
        return Reply("answer", text)
    body = text.removeprefix(opener).strip()
    if fmt is chat.CHATML:
        closer = fmt.call_close.strip()
        ended = closer in body
        body = body.split(closer)[0].strip()
    if not ended:
        return Reply("malformed", body, error=f"the call was cut off before {fmt.call_close.strip()}; keep calls short")
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return Reply("malformed", body, error=f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict) or set(obj) != {"name", fmt.args_key} or not isinstance(obj["name"], str):
        return Reply("malformed", body, error=f'a call is {{"name": tool name, "{fmt.args_key}": {{argument: value}}}}')
    return Reply("call", body, name=obj["name"], parameters=obj[fmt.args_key])


def start_episode(episode_id: str, request: str, toolbox: Toolbox, system_prompt: str, tools: Sequence[dict],
                  today: str = chat.TODAY_DATE, fmt: chat.ChatFormat = chat.LLAMA3) -> Episode:
    messages = fmt.tool_messages(system_prompt, tools, fmt.neutralise(request), today)
    return Episode(episode_id, request, messages, toolbox, fmt=fmt)


def advance(episode: Episode, raw: str, limits: AgentLimits) -> None:
    """Apply one policy turn to an episode; never raises on what the policy wrote."""
    reply = parse_reply(raw, episode.fmt)
    if reply.kind == "answer":
        episode.messages.append({"role": "assistant", "content": reply.text})
        episode.steps.append({"type": "answer", "text": reply.text})
        episode.answer, episode.stop = reply.text, "answer"
        return
    episode.messages.append({"role": "assistant", "content": "", "tool_call": reply.text})
    valid = False
    if reply.kind == "malformed":
        result = {"error": f"malformed tool call: {reply.error}"}
    else:
        try:
            check_call(reply.name, reply.parameters)
            valid = True
            result = episode.toolbox.execute(reply.name, reply.parameters)
        except ToolError as e:
            result = {"error": str(e)}
    content = episode.fmt.neutralise(chat.tool_result_text(result))
    episode.messages.append({"role": episode.fmt.tool_role, "content": content})
    episode.steps.append({"type": "call", "text": reply.text, "name": reply.name, "parameters": reply.parameters,
                          "valid": valid, "result": result})
    episode.retries = 0 if valid else episode.retries + 1
    if episode.retries > limits.max_retries:
        episode.stop = "max_retries"
    elif len(episode.steps) >= limits.max_steps:
        episode.stop = "max_steps"
    elif time.monotonic() - episode.started > limits.max_seconds:
        episode.stop = "time_limit"


Policy = Callable[[Sequence[Episode]], list[str]]


def episode_prompt(episode: Episode) -> str:
    """The text a policy continues: the conversation so far in the format's tool layout, then
    the assistant header."""
    return episode.fmt.render(episode.messages, add_generation_prompt=True)


def run_episodes(policy: Policy, episodes: Sequence[Episode], limits: AgentLimits, desc: str = "agent",
                 progress: bool = True) -> None:
    """Drive every episode to its end; each round asks the policy once for all open ones."""
    bar = tqdm(total=len(episodes), desc=desc, unit="episode", disable=not progress)
    while True:
        active = [e for e in episodes if e.stop is None]
        if not active:
            break
        for episode in active:
            if time.monotonic() - episode.started > limits.max_seconds:
                episode.stop = "time_limit"
        active = [e for e in active if e.stop is None]
        for episode, raw in zip(active, policy(active), strict=True):
            advance(episode, raw, limits)
        bar.update(sum(e.stop is not None for e in active))
    bar.close()


# generate()'s name for a prefilled cache: `cache` from transformers 5.24, `past_key_values` before.
GENERATE_CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens all `rows` begin with, leaving each at least one of its own to prefill."""
    shortest = min(len(r) for r in rows)
    for j in range(shortest - 1):
        if any(r[j] != rows[0][j] for r in rows):
            return j
    return max(0, shortest - 1)


class ModelPolicy:
    """A causal LM writing each turn from the rendering of the conversation in its own chat
    format's tool layout (`chat.ChatFormat.render`).

    Every episode's prompt opens with the same system turn (agent prompt and tool
    definitions: ~600 of SmolLM2's ~1,000 prompt tokens), so its keys and values are computed
    once (`prefix_cache`) and copied into each batch; only the rest of each prompt is
    prefilled. The replies are those of prefilling everything, up to float rounding."""

    MIN_SHARED_PREFIX = 32  # tokens: below this, copying a cache costs more than it saves

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int, temperature: float = 0.0,
                 seed: int = 0, grammar: "ToolCallGrammar | None" = None, prefix_cache: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.temperature, self.seed = temperature, seed
        self.grammar = grammar  # constrained tool calls (veritune.constrained); None: free decoding
        self.fmt = chat.chat_format(tokenizer)
        self.stops = chat.stop_token_ids(tokenizer)
        self.prefix_cache = prefix_cache
        self._prefix: tuple[tuple[int, ...], object] | None = None  # (token ids, their cache)

    @torch.inference_mode()
    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        device = next(self.model.parameters()).device
        prompts = [episode_prompt(e) for e in episodes]
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # Batches of similar length: padding to the longest prompt is computed like any other
        # token, and episodes' prompts differ by hundreds of tokens after a few turns.
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        replies: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [ids[i] for i in batch]
            shared = shared_prefix_length(rows) if self.prefix_cache and len(rows) > 1 else 0
            if shared < self.MIN_SHARED_PREFIX:
                shared = 0
            prefix = rows[0][:shared]
            width = max(len(r) for r in rows) - shared
            pad = self.tokenizer.pad_token_id
            # [shared prefix][padding][rest of the prompt]: the mask skips the padding and the
            # positions count only real tokens, so each row reads as its unpadded prompt.
            input_ids = torch.tensor([prefix + [pad] * (width - len(r) + shared) + r[shared:] for r in rows],
                                     device=device)
            mask = torch.tensor([[1] * shared + [0] * (width - len(r) + shared) + [1] * (len(r) - shared)
                                 for r in rows], device=device)
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0} \
                if self.temperature > 0 else {"do_sample": False}
            if self.grammar is not None:
                sampling["logits_processor"] = LogitsProcessorList([ConstrainedCalls(self.grammar, len(rows))])
            if shared:
                sampling[GENERATE_CACHE_KWARG] = self._cache_for(prefix, len(rows), device)
            with inference_autocast(self.model):
                out = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                          max_new_tokens=self.max_new_tokens, eos_token_id=self.stops,
                                          pad_token_id=pad, **sampling)
            for i, row in zip(batch, out[:, input_ids.shape[1]:]):
                replies[i] = self.tokenizer.decode(row, skip_special_tokens=False)
        return [replies[i] for i in range(len(prompts))]

    def _cache_for(self, prefix: list[int], batch_size: int, device):
        """The prefix's key/value cache, computed once per prefix, repeated for the batch."""
        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            with inference_autocast(self.model):
                cache = self.model(torch.tensor([prefix], device=device), use_cache=True).past_key_values
            self._prefix = (key, cache)
        cache = copy.deepcopy(self._prefix[1])
        cache.batch_repeat_interleave(batch_size)
        return cache

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


# Stands in for the answer when an episode ends without one; the stop reason says which limit.
STOPPED = {
    "max_steps": "Sorry, I could not finish this request within the allowed number of steps.",
    "max_retries": "Sorry, I could not finish this request: my tool calls were refused too many times in a row.",
    "time_limit": "Sorry, I could not finish this request in the time allowed.",
}


def run_agent(messages: Sequence[dict], *, generate: Callable[[str, int], str], customer_id: str,
              search: Callable[[str], list[dict]] | None = None, max_new_tokens: int, db_path: str | Path = DB,
              system_prompt: str = BuildSftParams.agent_system_prompt, tools: Sequence[dict] | None = None,
              today: date = TODAY, limits: AgentLimits = AgentLimits(), persist_writes: bool = False,
              max_writes: int | None = None, fmt: chat.ChatFormat = chat.LLAMA3) -> dict:
    """One customer request through the tool-using loop (`start_episode`, `run_episodes`).

    The request is the last user message; earlier turns and any system message are left out,
    because the episode opens with the agent's own system prompt and tool definitions (the
    layout the model was trained on), and writes are authorised by this request's words alone
    (`authorised_writes`). `generate(prompt_text, max_new_tokens)` continues `episode_prompt`
    and returns the reply with its special tokens (`fmt`'s: `<|python_tag|>`, `<|eom_id|>`,
    `<|eot_id|>` for Llama 3.1; `<tool_call>`, `<|im_end|>` for ChatML).
    `search(query)` backs `search_kb` ({"doc_id", "title", "text"} passages; None: refused).
    `tools` defaults to the `build_sft.agent_tool_definitions` default style.

    `customer_id` is the authenticated customer (the server binds it to the API key, never
    to the chat text): the tools see only that customer's orders (`Toolbox`), and the
    episode writes at most `max_writes` rows.

    The episode works on a private copy of `db_path`, so writes are guarded, reported and then
    discarded; with `persist_writes` they land in `db_path` itself (a live shop database).

    Returns {"answer", "citations" (doc ids of the search_kb results seen, in order), "steps"
    (Episode.steps: each call with its parameters, validity and result or refusal, then the
    answer), "stop" ("answer", "max_steps", "max_retries" or "time_limit")}; without an
    answer, "answer" says which limit ended the episode.
    """
    request = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    if not request or not request.strip():
        raise ValueError("run_agent needs a user message: the customer's request")
    if not isinstance(customer_id, str) or not customer_id:
        raise ValueError("run_agent needs the authenticated customer's id (customer_id), e.g. 'C-101'")
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"shop database {db_path} not found: run `dvc repro agent_db`")
    tools = tool_definitions(BuildSftParams.agent_tool_definitions) if tools is None else tools

    def policy(episodes: Sequence[Episode]) -> list[str]:
        return [generate(episode_prompt(e), max_new_tokens) for e in episodes]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(db_path) if persist_writes else episode_database(db_path, tmp, "request")
        with Toolbox(path, search=search, allowed_writes=authorised_writes(request), today=today,
                     customer_id=customer_id, max_writes=max_writes) as box:
            episode = start_episode("request", request, box, system_prompt, tools, chat.header_date(today), fmt)
            run_episodes(policy, [episode], limits, progress=False)
    seen = [r["doc_id"] for s in episode.calls if s["name"] == "search_kb" for r in s["result"].get("results", [])]
    answer = episode.answer if episode.stop == "answer" else STOPPED[episode.stop]
    return {"answer": answer, "citations": list(dict.fromkeys(seen)), "steps": episode.steps, "stop": episode.stop}
