"""The Llama 3.1 chat layout, on the tiny tokenizer and on Meta's real tokenizer."""

import pytest

from tests.conftest import LLAMA3_TOKENIZER
from veritune.core import chat
from veritune.model.modeling import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "Answer from the documents."},
    {"role": "user", "content": "How much is the Aurora K3 Kettle?"},
    {"role": "assistant", "content": "$149"},
]


def test_format_chat_is_meta_layout():
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer from the documents.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow much is the Aurora K3 Kettle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n$149<|eot_id|>"
    )
    assert chat.format_chat(MESSAGES) == expected
    assert chat.format_chat(MESSAGES[:2], add_generation_prompt=True).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown chat role"):
        chat.format_chat([{"role": "robot", "content": "hi"}])


def test_tiny_tokenizer_template_renders_format_chat(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == chat.format_chat(MESSAGES)
    assert tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True) == chat.format_chat(
        MESSAGES[:2], add_generation_prompt=True
    )
    ids = tokenizer(chat.format_chat(MESSAGES), add_special_tokens=False)["input_ids"]
    for token in (chat.BEGIN_OF_TEXT, chat.START_HEADER, chat.END_HEADER, chat.EOT):
        assert tokenizer.convert_tokens_to_ids(token) in ids, f"{token} must be one special token"
    assert tokenizer.decode(ids) == chat.format_chat(MESSAGES)


def test_rag_prompt_carries_passages_with_ids():
    passages = [{"doc_id": "doc-7", "title": "Aurora K3 Kettle — Specifications", "text": "It retails for $149."}]
    [system, user] = chat.rag_messages("S", "How much?", passages)
    assert system == {"role": "system", "content": "S"}
    assert user["content"] == (
        "Documents:\n[doc-7] Aurora K3 Kettle — Specifications\nIt retails for $149.\n\nQuestion: How much?"
    )
    assert chat.rag_messages("S", "How much?", None)[1]["content"] == "Question: How much?"
    both = chat.rag_messages("S", "How much?", passages, question_position="both")[1]["content"]
    assert both.startswith("Question: How much?\n\nDocuments:") and both.endswith("Question: How much?")


@pytest.mark.skipif(not LLAMA3_TOKENIZER.exists(), reason="Meta's Llama 3 tokenizer.model is not present")
def test_prompt_tokenizes_to_meta_special_token_ids():
    """With Meta's tokenizer, the rendered prompt has the Llama 3.1 special-token ids in place."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
    specials = {t: len(ranks) + i for i, t in enumerate(chat.LLAMA3_SPECIAL_TOKENS)}
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    enc = tiktoken.Encoding("llama3", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    ids = enc.encode(chat.format_chat(MESSAGES), allowed_special="all")
    assert specials[chat.BEGIN_OF_TEXT] == 128000 and specials[chat.EOT] == 128009
    assert specials[chat.START_HEADER] == 128006 and specials[chat.END_HEADER] == 128007
    header = lambda role: [128006, *enc.encode(role), 128007, *enc.encode("\n\n")]  # noqa: E731
    expected = [128000]
    for m in MESSAGES:
        expected += header(m["role"]) + enc.encode(m["content"]) + [128009]
    assert ids == expected
    assert enc.decode(ids) == chat.format_chat(MESSAGES)
