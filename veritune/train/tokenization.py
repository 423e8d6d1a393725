"""Chat examples as training rows: token ids and labels with the loss on the assistant turns only.

`train` tokenizes the SFT set with `tokenize_example` (the base `base` stage's pretraining reads
the tool prompts, `is_tool_conversation`); the conversations are laid out exactly as the agent
loop and the evaluation render them at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

from veritune.core import chat


class LabelMaskError(ValueError):
    """The chat template does not render the prompt as a prefix of the full conversation."""


def is_tool_conversation(messages: Sequence[dict]) -> bool:
    return any(m.get("tool_call") or m["role"] in ("ipython", "tool") for m in messages)


def tokenize_example(
    messages: list[dict], tokenizer, tools: Sequence[dict] | None = None, today: str | None = None
) -> dict:
    """Token ids and labels with the loss on the assistant turns only (the rest -> -100).

    Format-neutral messages (and `tools` for a tool conversation) are first laid out in the
    checkpoint's own chat format (`chat.formatted_messages`). The checkpoint's chat template
    renders each prompt (with the generation header) and the conversation through the
    following assistant turn (`chat.render_conversation`: tool conversations in the format's
    tool layout, exactly as the agent loop renders them at inference); each rendering must
    extend the previous one, which is checked rather than assumed.
    """
    messages = chat.formatted_messages(chat.chat_format(tokenizer), messages, tools, today)
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = chat.render_conversation(tokenizer, messages[:i], True)
        full = chat.render_conversation(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LabelMaskError("chat template output for the prompt is not a prefix of the full conversation")
        prompt_ids = tokenizer(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        input_ids += prompt_ids + reply_ids
        labels += [-100] * len(prompt_ids) + reply_ids
        done = full
    return {"input_ids": input_ids, "labels": labels}
