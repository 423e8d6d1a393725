"""Llama 3.1 chat format and the grounded-QA prompt.

The chat layout follows Meta's Llama 3.1 model card:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>

A real checkpoint brings its own chat template and that template is used for it; the tiny
default model gets `LLAMA3_CHAT_TEMPLATE`, which renders exactly `format_chat`.

Tool use follows Meta's Llama 3.1 JSON tool calling (llama-models `prompt_format.md`, the
`tools_in_user_message` layout of Llama-3.1-8B-Instruct's template): the system turn opens
with `Environment: ipython` and the date lines, the custom tool definitions go into the
first user turn as JSON indented by 4, a tool call is an assistant turn
`<|python_tag|>{"name": ..., "parameters": ...}<|eom_id|>` and its result comes back in
the `ipython` role:

    ...<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>{"name": "get_order", ...}<|eom_id|>
    <|start_header_id|>ipython<|end_header_id|>\n\n{"order_id": 1042, ...}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{final answer}<|eot_id|>

An assistant message carries a call as `{"role": "assistant", "content": "", "tool_call":
'{"name": ..., "parameters": ...}'}` (the JSON text as generated; `tool_call_text` writes
it canonically).
"""

from __future__ import annotations

import json
from typing import Sequence

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PYTHON_TAG = "<|python_tag|>"
PAD = "<|finetune_right_pad_id|>"

# The Llama 3.1 tokenizer reserves ids 128000-128255 for these, in this order.
LLAMA3_SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    PYTHON_TAG,
]

ROLES = ("system", "user", "assistant", "ipython")

# The header of a tool-using conversation, as Llama 3.1's template writes it.
KNOWLEDGE_DATE = "December 2023"
TODAY_DATE = "26 Jul 2024"
TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)

# Jinja twin of `format_chat`, stored in the tiny tokenizer so `apply_chat_template` works.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['tool_call'] is defined and message['tool_call'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>' + message['tool_call'] + '<|eom_id|>' }}"
    "{%- elif message['role'] == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render messages in the Llama 3.1 layout (content is stripped, as Meta's template does,
    except tool results, which Meta's template passes through untouched)."""
    parts = [BEGIN_OF_TEXT]
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown chat role {m['role']!r}; expected one of {ROLES}")
        if m.get("tool_call"):
            if m["role"] != "assistant":
                raise ValueError(f"only assistant messages make tool calls, got role {m['role']!r}")
            parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n{PYTHON_TAG}{m['tool_call']}{EOM}")
        elif m["role"] == "ipython":
            parts.append(f"{START_HEADER}ipython{END_HEADER}\n\n{m['content']}{EOT}")
        else:
            parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def format_context(passages: Sequence[dict]) -> str:
    """Passages as the model sees them: an id it can cite, the title, the text."""
    return "\n\n".join(f"[{p['doc_id']}] {p['title']}\n{p['text']}" for p in passages)


def rag_messages(system_prompt: str, question: str, passages: Sequence[dict] | None,
                 question_position: str = "end") -> list[dict]:
    """The grounded-QA prompt; `passages=None` is the closed-book variant.

    `question_position="both"` also states the question before the passages, so a model
    reads them already knowing what to look for (query-aware contextualisation, Liu et al.
    2023, "Lost in the Middle"); small models find the answer much more easily that way.
    """
    if passages is None:
        user = f"Question: {question}"
    else:
        body = format_context(passages) if passages else "(none)"
        user = f"Documents:\n{body}\n\nQuestion: {question}"
        if question_position == "both":
            user = f"Question: {question}\n\n{user}"
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def tool_call_text(name: str, parameters: dict) -> str:
    """A tool call as Llama 3.1 writes it: `{"name": ..., "parameters": {...}}`."""
    return json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)


def tool_result_text(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)


def header_date(day) -> str:
    """A date as Llama 3.1's system header writes it: 26 Jul 2024."""
    return f"{day:%d %b %Y}"


def tool_messages(system_prompt: str, tools: Sequence[dict], request: str, today: str = TODAY_DATE) -> list[dict]:
    """The opening of a tool-using conversation: the ipython system header and the tool
    definitions in the first user turn (Llama 3.1's default `tools_in_user_message`)."""
    system = f"Environment: ipython\nCutting Knowledge Date: {KNOWLEDGE_DATE}\nToday Date: {today}\n\n{system_prompt.strip()}"
    definitions = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    return [{"role": "system", "content": system},
            {"role": "user", "content": TOOLS_PREAMBLE + definitions + request.strip()}]


def neutralise_special_tokens(text: str) -> str:
    """Text from outside (a customer, a tool result) must not forge turns: `<|eot_id|>` in
    it would otherwise become the real special token. A space after `<` keeps it readable."""
    return text.replace("<|", "< |")
