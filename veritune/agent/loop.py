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

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from tqdm.auto import tqdm

from veritune.agent.shop import episode_database
from veritune.agent.specs import ToolError, check_call
from veritune.agent.tools import Toolbox, authorised_writes
from veritune.core import chat
from veritune.infer import calc


@dataclass(frozen=True)
class AgentLimits:
    """What ends an episode: `agent_eval.max_steps`, `max_retries` and `max_seconds`."""

    max_steps: int  # model turns per episode (a task needs 2-5)
    max_retries: int  # refused calls in a row before the episode is given up
    max_seconds: float  # wall time per episode


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
        return Reply("answer", calc.finish(text))  # calculator spans, as in RAG answers
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


def start_episode(
    episode_id: str,
    request: str,
    toolbox: Toolbox,
    system_prompt: str,
    tools: Sequence[dict],
    today: str,
    fmt: chat.ChatFormat = chat.LLAMA3,
) -> Episode:
    messages = fmt.tool_messages(system_prompt, tools, fmt.neutralize(request), today)
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
    content = episode.fmt.neutralize(chat.tool_result_text(result))
    episode.messages.append({"role": episode.fmt.tool_role, "content": content})
    episode.steps.append(
        {
            "type": "call",
            "text": reply.text,
            "name": reply.name,
            "parameters": reply.parameters,
            "valid": valid,
            "result": result,
        }
    )
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


def run_episodes(
    policy: Policy, episodes: Sequence[Episode], limits: AgentLimits, desc: str = "agent", progress: bool = True
) -> None:
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


# Stands in for the answer when an episode ends without one; the stop reason says which limit.
STOPPED = {
    "max_steps": "Sorry, I could not finish this request within the allowed number of steps.",
    "max_retries": "Sorry, I could not finish this request: my tool calls were refused too many times in a row.",
    "time_limit": "Sorry, I could not finish this request in the time allowed.",
}


def run_agent(
    messages: Sequence[dict],
    *,
    generate: Callable[[str, int], str],
    customer_id: str,
    search: Callable[[str], list[dict]] | None = None,
    max_new_tokens: int,
    db_path: str | Path,
    system_prompt: str,
    tools: Sequence[dict],
    today: date,
    limits: AgentLimits,
    persist_writes: bool = False,
    max_writes: int | None = None,
    fmt: chat.ChatFormat = chat.LLAMA3,
) -> dict:
    """One customer request through the tool-using loop (`start_episode`, `run_episodes`).

    The request is the last user message; earlier turns and any system message are left out,
    because the episode opens with the agent's own system prompt and tool definitions (the
    layout the model was trained on), and writes are authorised by this request's words alone
    (`authorised_writes`). `generate(prompt_text, max_new_tokens)` continues `episode_prompt`
    and returns the reply with its special tokens (`fmt`'s: `<|python_tag|>`, `<|eom_id|>`,
    `<|eot_id|>` for Llama 3.1; `<tool_call>`, `<|im_end|>` for ChatML).
    `search(query)` backs `search_kb` ({"doc_id", "title", "text"} passages; None: refused).
    `system_prompt`, `tools`, `today` and `limits` are `agent_eval`'s (params `build_sft`,
    `agent_db`, `agent_eval`), so a request runs the episode that stage measures.

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

    def policy(episodes: Sequence[Episode]) -> list[str]:
        return [generate(episode_prompt(e), max_new_tokens) for e in episodes]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(db_path) if persist_writes else episode_database(db_path, tmp, "request")
        with Toolbox(
            path,
            search=search,
            allowed_writes=authorised_writes(request),
            today=today,
            customer_id=customer_id,
            max_writes=max_writes,
        ) as box:
            episode = start_episode("request", request, box, system_prompt, tools, chat.header_date(today), fmt)
            run_episodes(policy, [episode], limits, progress=False)
    seen = [r["doc_id"] for s in episode.calls if s["name"] == "search_kb" for r in s["result"].get("results", [])]
    answer = episode.answer if episode.stop == "answer" else STOPPED[episode.stop]
    return {"answer": answer, "citations": list(dict.fromkeys(seen)), "steps": episode.steps, "stop": episode.stop}
