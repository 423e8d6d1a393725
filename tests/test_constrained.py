"""Constrained tool calls (veritune.infer.constraints): every call the grammar lets through is valid
for its tool's schema, complete calls end in <|eom_id|>, answers are left alone, and both
decoding loop applies it per row, in offline batches (`generate_ids`) and serving ones (`generate_batch`)."""

import json
import random

import pytest
import torch

from tests.conftest import LLAMA3_TOKENIZER
from veritune.agent.loop import parse_reply
from veritune.agent.specs import MAX_ID, TOOLS, check_call
from veritune.core import chat
from veritune.core.chat import stop_token_ids
from veritune.infer.constraints import NUMBER_BOUND, ToolCallGrammar, call_schema
from veritune.infer.decode import GenerationRequest, generate_batch, generate_ids
from veritune.model.modeling import load_model, load_tokenizer

GOOD_CALLS = [
    {"name": "get_order", "parameters": {"order_id": 1042}},
    {"name": "list_orders", "parameters": {"customer_id": "C-101"}},
    {"name": "search_kb", "parameters": {"query": "warranty of the Aurora K3 Kettle"}},
    {"name": "calculate", "parameters": {"expression": "2024-07-01 + 30"}},
    {
        "name": "open_ticket",
        "parameters": {"order_id": 1042, "category": "warranty", "summary": "Kettle stopped heating"},
    },
    {"name": "request_refund", "parameters": {"order_id": 1042, "amount": 149.5, "reason": "faulty"}},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def grammar(tokenizer):
    return ToolCallGrammar(tokenizer, 600, TOOLS, max_string_chars=120)


def walk(grammar, tokenizer, text: str):
    """Feed `text` (after <|python_tag|>) token by token; the index of the first refused token, or None."""
    c = grammar.constraint()
    c.consume(grammar.python_tag)
    for n, t in enumerate(tokenizer(text, add_special_tokens=False)["input_ids"]):
        if not c.mask()[t]:
            return n, c
        c.consume(t)
    return None, c


def test_every_well_formed_call_is_accepted_and_ends_with_eom(grammar, tokenizer):
    for call in GOOD_CALLS:
        refused, c = walk(grammar, tokenizer, chat.tool_call_text(call["name"], call["parameters"]))
        assert refused is None, call
        allowed = c.mask().nonzero().flatten().tolist()
        assert allowed == [grammar.eom], call  # complete: nothing but the end of the call
        c.consume(grammar.eom)
        assert c.state == "done" and c.mask() is None


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "drop_tables", "parameters": {}}',  # unknown tool
        '{"name": "get_order", "parameters": {"order_id": "1042"}}',  # string for an integer
        '{"name": "get_order", "parameters": {}}',  # required argument missing
        '{"name": "get_order", "parameters": {"order": 1042}}',  # misspelt argument
        '{"name": "open_ticket", "parameters": {"order_id": 1, "category": "billing", "summary": "x"}}',  # not in enum
        '{"name": "get_order", "parameters": {"order_id": 1042}}}',  # extra brace
        '{"name":"get_order","parameters":{"order_id":1042}}',  # not Meta's layout
    ],
)
def test_malformed_calls_are_refused_somewhere_along_the_way(grammar, tokenizer, text):
    refused, _ = walk(grammar, tokenizer, text)
    assert refused is not None


def test_random_walks_through_the_grammar_always_give_valid_calls(grammar, tokenizer):
    """Whatever the model prefers, picking any allowed token at every step ends in a call that
    the tools' own JSON Schema validation accepts."""
    for seed in range(25):
        rng = random.Random(seed)
        c = grammar.constraint()
        ids = [grammar.python_tag]
        c.consume(grammar.python_tag)
        for _ in range(500):
            token = rng.choice(c.mask().nonzero().flatten().tolist())
            ids.append(token)
            c.consume(token)
            if c.state == "done":
                break
        assert c.state == "done", seed  # finite strings and numbers: every walk completes
        reply = parse_reply(tokenizer.decode(ids, skip_special_tokens=False))
        assert reply.kind == "call", reply
        check_call(reply.name, reply.parameters)  # raises ToolError if invalid


def test_answers_are_not_constrained(grammar, tokenizer):
    c = grammar.constraint()
    assert c.mask() is None
    c.consume(tokenizer("The", add_special_tokens=False)["input_ids"][0])
    assert c.state == "free" and c.mask() is None


def test_require_call_allows_only_python_tag_first(grammar):
    c = grammar.constraint(require_call=True)
    assert c.mask().nonzero().flatten().tolist() == [grammar.python_tag]


def test_schema_only_narrows_each_tools_own_schema():
    schema = call_schema(TOOLS, max_string_chars=40)
    by_name = {alt["properties"]["name"]["const"]: alt["properties"]["parameters"] for alt in schema["anyOf"]}
    assert set(by_name) == {t["name"] for t in TOOLS}
    assert by_name["search_kb"]["properties"]["query"]["maxLength"] == 40
    assert by_name["get_order"]["properties"]["order_id"]["maximum"] == MAX_ID  # a tool's own bound is kept
    unbounded = {"name": "t", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    assert (
        call_schema([unbounded], max_string_chars=120)["anyOf"][0]["properties"]["parameters"]["properties"]["n"][
            "maximum"
        ]
        == NUMBER_BOUND
    )
    assert "maxLength" not in by_name["open_ticket"]["properties"]["category"]  # an enum stays an enum
    assert TOOLS[0]["parameters"]["properties"]["order_id"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_ID,
    }  # the tools are untouched


def _tiny(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    model.eval()
    return model


def test_generate_batch_constrains_only_its_own_row(tiny_checkpoint, tokenizer, grammar):
    model = _tiny(tiny_checkpoint)
    stops = stop_token_ids(tokenizer)
    prompt = tokenizer("Where is my order 1042?", add_special_tokens=False)["input_ids"]
    free = generate_batch(model, [GenerationRequest(list(prompt), 40)], stops, tokenizer.pad_token_id)[0]
    both = generate_batch(
        model,
        [
            GenerationRequest(list(prompt), 40),
            GenerationRequest(list(prompt), 300, constraint=grammar.constraint(require_call=True)),
        ],
        stops,
        tokenizer.pad_token_id,
    )
    assert both[0].token_ids == free.token_ids  # the unconstrained row decodes as it does alone
    called = both[1]
    assert called.finish_reason == "stop" and called.stop_token_id == grammar.eom
    reply = parse_reply(tokenizer.decode(called.token_ids + [called.stop_token_id], skip_special_tokens=False))
    assert reply.kind == "call"
    check_call(reply.name, reply.parameters)
    # The same random model left alone does not write a call at all.
    assert parse_reply(tokenizer.decode(free.token_ids, skip_special_tokens=False)).kind == "answer"


def test_the_same_constraints_hold_in_offline_batches(tiny_checkpoint, tokenizer, grammar):
    model = _tiny(tiny_checkpoint)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("Where is my order 1042?", "Hi")]
    kwargs = dict(stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    plain = generate_ids(model, rows, max_new_tokens=20, **kwargs)
    free = generate_ids(model, rows, max_new_tokens=20, constraints=[grammar.constraint() for _ in rows], **kwargs)
    forced = generate_ids(
        model, rows, max_new_tokens=300, constraints=[grammar.constraint(require_call=True) for _ in rows], **kwargs
    )
    # No reply opened with <|python_tag|>: the constraint changes nothing.
    assert torch.equal(plain, free)
    for row in forced:
        reply = parse_reply(tokenizer.decode(row, skip_special_tokens=False))
        assert reply.kind == "call", reply
        check_call(reply.name, reply.parameters)


@pytest.mark.skipif(not LLAMA3_TOKENIZER.exists(), reason="Meta's Llama 3 tokenizer.model is not present")
def test_grammar_on_llama3_vocabulary():
    """The 128k-token Llama 3 vocabulary (as an HF fast tokenizer, the layout of Meta's
    checkpoints): the special ids are Meta's, and every well-formed call passes."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=TikTokenConverter(str(LLAMA3_TOKENIZER), pattern=pattern).converted()
    )
    tok.add_tokens(list(chat.LLAMA3_SPECIAL_TOKENS), special_tokens=True)
    grammar = ToolCallGrammar(tok, 128256, TOOLS, max_string_chars=120)
    assert (grammar.python_tag, grammar.eom) == (128010, 128008)
    for call in GOOD_CALLS:
        refused, c = walk(grammar, tok, json.dumps(call))
        assert refused is None, call
        assert c.mask().nonzero().flatten().tolist() == [128008]
    assert walk(grammar, tok, '{"name": "get_order", "parameters": {"order_id": "x"}}')[0] is not None
