"""Llama 3.1 chat format and the grounded-QA prompt.

The chat layout follows Meta's Llama 3.1 model card:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>

A real checkpoint brings its own chat template and that template is used for it; the tiny
default model gets `LLAMA3_CHAT_TEMPLATE`, which renders exactly `format_chat`.
"""

from __future__ import annotations

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

# Jinja twin of `format_chat`, stored in the tiny tokenizer so `apply_chat_template` works.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render messages in the Llama 3.1 layout (content is stripped, as Meta's template does)."""
    parts = [BEGIN_OF_TEXT]
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown chat role {m['role']!r}; expected one of {ROLES}")
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
