"""Chat formats (Llama 3.1 and ChatML) and the grounded-QA prompt.

The chat layout follows Meta's Llama 3.1 model card:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>

A real checkpoint brings its own chat template and that template is used for it; the tiny
default model gets `LLAMA3_CHAT_TEMPLATE`, which renders exactly `format_chat`.

Tool use follows the checkpoint (`ChatFormat`, read off its tokenizer by `chat_format`):

* Llama 3.1 (`LLAMA3`): Meta's JSON tool calling (llama-models `prompt_format.md`, the
  `tools_in_user_message` layout of Llama-3.1-8B-Instruct's template): the system turn opens
  with `Environment: ipython` and the date lines, the custom tool definitions go into the
  first user turn as JSON indented by 4, a call is an assistant turn
  `<|python_tag|>{"name": ..., "parameters": ...}<|eom_id|>`, its result comes back in the
  `ipython` role.
* ChatML (`CHATML`, SmolLM2 and most open instruct models): tools in the system turn inside
  `<tools></tools>`, a call is `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
  ending the assistant turn with `<|im_end|>`, its result comes back in a `tool` turn.

An assistant message carries a call as `{"role": "assistant", "content": "", "tool_call":
text}` (the JSON as generated), or format-neutral as a `{"name", "arguments"}` dict that
`formatted_messages` writes in the checkpoint's layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

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

ROLES = ("system", "user", "assistant", "ipython", "tool")  # "tool": the neutral name of ipython

# The header of a tool-using conversation, as Llama 3.1's template writes it.
KNOWLEDGE_DATE = "December 2023"
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
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"  # noqa: E501
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
        elif m["role"] in ("ipython", "tool"):
            parts.append(f"{START_HEADER}ipython{END_HEADER}\n\n{m['content']}{EOT}")
        else:
            parts.append(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}")
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def format_context(passages: Sequence[dict]) -> str:
    """Passages as the model sees them: an id it can cite, the title, the text."""
    return "\n\n".join(f"[{p['doc_id']}] {p['title']}\n{p['text']}" for p in passages)


def rag_messages(
    system_prompt: str, question: str, passages: Sequence[dict] | None, question_position: str = "end"
) -> list[dict]:
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


def tool_messages(system_prompt: str, tools: Sequence[dict], request: str, today: str) -> list[dict]:
    """The opening of a tool-using conversation: the ipython system header (`today` as
    `header_date` writes params `agent_db.today`) and the tool definitions in the first user
    turn (Llama 3.1's default `tools_in_user_message`)."""
    header = f"Environment: ipython\nCutting Knowledge Date: {KNOWLEDGE_DATE}\nToday Date: {today}"
    system = f"{header}\n\n{system_prompt.strip()}"
    definitions = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": TOOLS_PREAMBLE + definitions + request.strip()},
    ]


def neutralize_special_tokens(text: str) -> str:
    """Text from outside (a customer, a tool result) must not forge turns: `<|eot_id|>` in
    it would otherwise become the real special token. A space after `<` keeps it readable."""
    return text.replace("<|", "< |")


# --------------------------------------------------------------------------- ChatML (SmolLM2 and others)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
# The default system turn SmolLM2-Instruct's template writes when a conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# SmolLM2-Instruct's own template, extended with tool calls in the widely used ChatML layout
# (Hermes / Qwen 2.5): the assistant writes `<tool_call>\n{"name": ..., "arguments": ...}\n
# </tool_call>`, the result comes back in a `tool` turn. Messages without tool calls render
# byte for byte as the checkpoint's own template does (tests/test_chat.py checks it).
CHATML_TOOLS_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['tool_call'] is defined and message['tool_call'] %}"
    "{{- '<|im_start|>assistant\\n<tool_call>\\n' + message['tool_call'] + '\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CHATML_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
CHATML_TOOLS_POSTAMBLE = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

CHATML_ROLES = ("system", "user", "assistant", "tool")


def format_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render messages in the ChatML layout of `CHATML_TOOLS_TEMPLATE` (its Python twin)."""
    parts = []
    if messages and messages[0]["role"] != "system":
        parts.append(f"{IM_START}system\n{SMOLLM2_DEFAULT_SYSTEM}{IM_END}\n")
    for m in messages:
        if m["role"] not in CHATML_ROLES:
            raise ValueError(f"unknown chat role {m['role']!r}; expected one of {CHATML_ROLES}")
        if m.get("tool_call"):
            if m["role"] != "assistant":
                raise ValueError(f"only assistant messages make tool calls, got role {m['role']!r}")
            parts.append(f"{IM_START}assistant\n{TOOL_CALL_OPEN}{m['tool_call']}{TOOL_CALL_CLOSE}{IM_END}\n")
        else:
            parts.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


# --------------------------------------------------------------------------- one checkpoint's format


@dataclass(frozen=True)
class ChatFormat:
    """How one checkpoint family lays out tool calls and ends its turns.

    `llama3`: Meta's Llama 3.1 JSON tool calling (`<|python_tag|>{...}<|eom_id|>`, results in
    the `ipython` role); `chatml`: `<tool_call>\\n{...}\\n</tool_call><|im_end|>`, results in a
    `tool` turn (SmolLM2, Qwen, Hermes). Plain turns always come from the checkpoint's own
    chat template; `render` is this format's rendering of tool conversations.
    """

    name: str
    end_of_turn: str  # ends an answer
    call_open: str  # opens a tool call
    call_close: str  # closes it; for llama3 this token also ends the turn
    call_open_is_token: bool  # call_open is one special token (llama3) or plain text (chatml)
    args_key: str  # the call's arguments: "parameters" (Meta) or "arguments" (ChatML)
    tool_role: str  # the role tool results come back in
    stop_tokens: tuple[str, ...]  # any of these ends generation
    reserved: tuple[str, ...]  # control tokens outside text must never forge

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return (format_chat if self.name == "llama3" else format_chatml)(messages, add_generation_prompt)

    def call_text(self, name: str, arguments: dict) -> str:
        """A call's JSON as this format writes it (canonical separators, key order name first)."""
        return json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)

    def written_call(self, call_json: str) -> str:
        """A call exactly as the model writes it, through the token that ends its turn."""
        if self.name == "llama3":
            return f"{PYTHON_TAG}{call_json}{EOM}"
        return f"{TOOL_CALL_OPEN}{call_json}{TOOL_CALL_CLOSE}{IM_END}"

    def tool_messages(self, system_prompt: str, tools: Sequence[dict], request: str, today: str) -> list[dict]:
        """The opening of a tool-using conversation in this format."""
        if self.name == "llama3":
            return tool_messages(system_prompt, tools, request, today)
        definitions = "".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) + "\n" for t in tools)
        system = (
            f"{system_prompt.strip()}\nToday Date: {today}\n\n"
            f"{CHATML_TOOLS_PREAMBLE}{definitions}{CHATML_TOOLS_POSTAMBLE}"
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": request.strip()}]

    def neutralize(self, text: str) -> str:
        """Outside text (a customer, a tool result) must not forge turns or calls."""
        text = neutralize_special_tokens(text)
        if self.name == "chatml":
            text = text.replace("<tool_call>", "< tool_call>").replace("</tool_call>", "</ tool_call>")
        return text


LLAMA3 = ChatFormat(
    name="llama3",
    end_of_turn=EOT,
    call_open=PYTHON_TAG,
    call_close=EOM,
    call_open_is_token=True,
    args_key="parameters",
    tool_role="ipython",
    stop_tokens=(EOT, EOM, END_OF_TEXT),
    reserved=tuple(LLAMA3_SPECIAL_TOKENS),
)
CHATML = ChatFormat(
    name="chatml",
    end_of_turn=IM_END,
    call_open=TOOL_CALL_OPEN,
    call_close=TOOL_CALL_CLOSE,
    call_open_is_token=False,
    args_key="arguments",
    tool_role="tool",
    stop_tokens=(IM_END, ENDOFTEXT),
    reserved=(IM_START, IM_END, ENDOFTEXT),
)
FORMATS = {f.name: f for f in (LLAMA3, CHATML)}


def chat_format(tokenizer) -> ChatFormat:
    """The format a tokenizer's checkpoint was trained on, read off its special tokens."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in (START_HEADER, END_HEADER, EOT)):
        return LLAMA3
    if IM_START in vocab and IM_END in vocab:
        return CHATML
    raise ValueError(
        "the tokenizer has neither Llama 3.1's header tokens nor ChatML's <|im_start|>/<|im_end|>: "
        "veritune cannot tell which chat format the checkpoint was trained on"
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens that end a reply in the tokenizer's chat format."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in chat_format(tokenizer).stop_tokens if t in vocab]


def render_conversation(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The prompt text for `messages`: the checkpoint's own chat template, except that tool
    conversations (calls, results) use the format's tool layout (`ChatFormat.render`), which
    the checkpoint's template may not know."""
    if any(m.get("tool_call") or m["role"] in ("ipython", "tool") for m in messages):
        return chat_format(tokenizer).render(messages, add_generation_prompt)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def formatted_messages(
    fmt: ChatFormat, messages: Sequence[dict], tools: Sequence[dict] | None = None, today: str | None = None
) -> list[dict]:
    """Format-neutral messages in `fmt`'s own layout.

    Neutral messages (what `build_sft` stores, so one SFT set serves any base) carry a call as
    `{"role": "assistant", "content": "", "tool_call": {"name": ..., "arguments": {...}}}` and
    a result in role `tool`; with `tools`, the first two messages (the agent's system prompt
    and the customer's request) become the format's tool-calling opening, dated `today` (the
    example's own "today", as build_sft stores it). Calls already written as text (what a
    model generated) pass through unchanged.
    """
    out: list[dict] = []
    if tools is not None:
        if today is None:
            raise ValueError("a tool conversation needs its date (`today`, e.g. '26 Jul 2024')")
        system, user, *messages = messages
        out = fmt.tool_messages(system["content"], tools, user["content"], today)
    for m in messages:
        call = m.get("tool_call")
        if isinstance(call, dict):
            m = {"role": "assistant", "content": "", "tool_call": fmt.call_text(call["name"], call["arguments"])}
        elif m["role"] in ("tool", "ipython"):
            m = {**m, "role": fmt.tool_role}
        out.append(m)
    return out
