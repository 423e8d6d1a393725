"""Constrained tool calls: once a reply opens a call (`<|python_tag|>` for Llama 3.1,
`<tool_call>` for ChatML), every next token must keep the call a valid JSON call of one of the
tools, and the end of the call (`<|eom_id|>`; `</tool_call><|im_end|>`) is allowed exactly when
the call is complete.

The model still chooses everything that carries meaning (answer or call, which tool, every
argument value); the grammar only takes away the tokens that would make the call unparseable
or break its tool's JSON Schema (`veritune.agent.specs.TOOLS`): a missing brace, an unknown tool, a
misspelt or missing argument, a string where an integer belongs, a value outside an enum.
Replies that do not open a call (answers) are left alone.

The grammar is compiled by llguidance from the tools' JSON Schemas, in the format's layout
(`{"name": ..., "parameters"|"arguments": {...}}`, `", "` and `": "` separators, no other
whitespace), and
matched against the checkpoint's own tokenizer, so the same code serves the tiny default
and Llama 3.1's 128k vocabulary. Free-text arguments are capped at `max_string_chars`, so
a call always fits a turn's token budget.

A `ToolCallConstraint` is one reply's constraint in the decoder's interface (`mask()` before a
token is picked, `consume()` after; `veritune.infer.decode`): the decoding loop and the GPU
engine apply it per row, through `decode.choose`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import numpy as np
import torch

from veritune.core import chat

NUMBER_BOUND = 10**12  # numbers without bounds of their own stay within +-this (at most 13 digits)


def call_schema(tools: Sequence[dict], max_string_chars: int, args_key: str = "parameters") -> dict:
    """One JSON Schema for every valid call: `{"name": <tool>, "parameters": <its arguments>}`,
    in that key order, with free-text strings capped at `max_string_chars` and unbounded
    numbers at `NUMBER_BOUND`, so that every call can finish within a turn's tokens. Each
    tool's own schema is kept, so the grammar only ever narrows it."""

    def cap(schema: dict) -> dict:
        schema = copy.deepcopy(schema)
        for prop in schema.get("properties", {}).values():
            if prop.get("type") == "string" and "enum" not in prop:
                prop["maxLength"] = min(prop.get("maxLength", max_string_chars), max_string_chars)
            if prop.get("type") in ("integer", "number"):
                prop.setdefault("minimum", -NUMBER_BOUND)
                prop.setdefault("maximum", NUMBER_BOUND)
        return schema

    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, args_key: cap(t["parameters"])},
                "required": ["name", args_key],
                "additionalProperties": False,
            }
            for t in tools
        ],
        "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    }


class ToolCallGrammar:
    """The compiled call grammar for one tokenizer, in its chat format (building it reads the
    whole vocabulary: make one per model and share it).

    Llama 3.1: the call opens with the special token `<|python_tag|>`; the grammar covers the
    JSON after it and ends with `<|eom_id|>`. ChatML: `<tool_call>` is plain text, so the
    grammar covers `<tool_call>\n{...}\n</tool_call>` whole and ends with `<|im_end|>`; a
    reply whose first token could begin `<tool_call>` is held to it from that token on.
    """

    def __init__(self, tokenizer, vocab_size: int | None, tools: Sequence[dict], max_string_chars: int):
        import llguidance
        import llguidance.hf

        self.fmt = chat.chat_format(tokenizer)
        # Rows of the model's logits may outnumber the tokenizer's ids (a padded embedding):
        # the extra ids are never allowed inside a call.
        self.vocab_size = max(vocab_size or 0, len(tokenizer))
        schema = json.dumps(call_schema(tools, max_string_chars, self.fmt.args_key))
        if self.fmt.call_open_is_token:
            self.python_tag = self.open_token = _token_id(tokenizer, self.fmt.call_open)
            self.eom = self.end = _token_id(tokenizer, self.fmt.call_close)
            self.openers: frozenset[int] = frozenset({self.open_token})
            self._grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        else:
            self.open_token = None
            self.end = _token_id(tokenizer, self.fmt.end_of_turn)
            self._grammar = llguidance.LLMatcher.grammar_from_lark(
                f"start: {json.dumps(self.fmt.call_open)} call {json.dumps(self.fmt.call_close)}\ncall: %json {schema}"
            )
            # First tokens that can begin the opener ("<", "<tool", ...): they start a call.
            self.openers = frozenset(
                i
                for t, i in tokenizer.get_vocab().items()
                if (text := tokenizer.convert_tokens_to_string([t])) and self.fmt.call_open.startswith(text)
            )
        # The grammar's end of sequence ends the turn: a complete call then waits for its result.
        self._lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=self.end)
        probe = llguidance.LLMatcher(self._lltok, self._grammar)
        if probe.is_error():
            raise ValueError(f"tool-call grammar does not compile: {probe.get_error()}")

    def matcher(self):
        import llguidance

        return llguidance.LLMatcher(self._lltok, self._grammar)

    def constraint(self, require_call: bool = False) -> ToolCallConstraint:
        return ToolCallConstraint(self, require_call=require_call)


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: it cannot write tool calls in its chat format")
    return tid


class ToolCallConstraint:
    """The constraint on one reply. `mask()` gives the allowed next tokens (None: free), then
    `consume(token)` records the token that was picked.

    The first token decides: `<|python_tag|>` opens a call and the grammar takes over until
    `<|eom_id|>`; anything else is an answer and stays free. `require_call` allows only
    `<|python_tag|>` as the first token (a turn that must call a tool).
    """

    def __init__(self, grammar: ToolCallGrammar, require_call: bool = False):
        self.grammar, self.require_call = grammar, require_call
        self.state = "start"  # start -> call -> (close ->) done, or start -> free
        self._matcher = None

    def mask(self) -> torch.Tensor | None:
        if self.state == "start" and self.require_call:
            if self.grammar.open_token is not None:
                return self._only(self.grammar.open_token)
            self.state, self._matcher = "call", self.grammar.matcher()  # the opener is in the grammar
        if self.state == "close":  # the call is complete: only the end of the turn may follow
            return self._only(self.grammar.end)
        if self.state != "call":
            return None
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.grammar.vocab_size].astype(bool))

    def consume(self, token_id: int) -> None:
        if self.state == "start":
            if token_id not in self.grammar.openers:
                self.state = "free"
                return
            self.state, self._matcher = "call", self.grammar.matcher()
            if self.grammar.open_token is not None:
                return  # the special opener precedes the grammar
        if self.state == "call":
            if not self._matcher.consume_token(int(token_id)):
                # Only reachable if a token outside the mask was forced in: stop constraining.
                self.state = "free"
            elif token_id == self.grammar.end:
                self.state = "done"
            elif self._matcher.is_stopped():
                # Nothing can extend the call any more; llguidance stops before the end token.
                self.state = "close"
        elif self.state == "close":
            self.state = "done"

    def _only(self, token_id: int) -> torch.Tensor:
        allowed = torch.zeros(self.grammar.vocab_size, dtype=torch.bool)
        allowed[token_id] = True
        return allowed
