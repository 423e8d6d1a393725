"""RAFT-style example building and the assistant-only loss mask."""

import random

import pytest

from tests.conftest import REPO
from veritune import chat
from veritune.config import BuildSftParams
from veritune.modeling import load_tokenizer
from veritune.sft import LabelMaskError, build_examples, select_passages, tokenize_example

CHUNKS = [
    {"chunk_id": "doc-1#0", "doc_id": "doc-1", "title": "Aurora K3 Kettle", "text": "The Aurora K3 Kettle retails for $149."},
    {"chunk_id": "doc-2#0", "doc_id": "doc-2", "title": "Zephyr X5", "text": "The Zephyr X5 is sold at $509."},
    {"chunk_id": "doc-3#0", "doc_id": "doc-3", "title": "Returns", "text": "Returns within 30 days."},
    {"chunk_id": "doc-4#0", "doc_id": "doc-4", "title": "Shipping", "text": "Express shipping costs $12.50."},
]
ANSWERABLE = {"id": "q1", "question": "How much is the Aurora K3 Kettle?", "answers": ["$149"], "doc_ids": ["doc-1"],
              "kind": "single_hop"}
UNANSWERABLE = {"id": "q2", "question": "Is the Aurora K3 Kettle waterproof?", "answers": [], "doc_ids": ["doc-1"],
                "kind": "unanswerable"}
RETRIEVED = [CHUNKS[1], CHUNKS[0], CHUNKS[3], CHUNKS[2]]


def _by_doc():
    return {c["doc_id"]: [c] for c in CHUNKS}


def test_answerable_question_sees_its_oracle_among_distractors():
    p = BuildSftParams(context_chunks=3, oracle_drop_rate=0.0, retrieval_pool=4)
    passages, has_oracle = select_passages(ANSWERABLE, RETRIEVED, _by_doc(), p, random.Random(0))
    assert has_oracle
    assert len(passages) == 3
    assert sum(c["doc_id"] == "doc-1" for c in passages) == 1


def test_dropped_oracle_means_abstention_target():
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=1.0, retrieval_pool=4)
    [example] = build_examples([ANSWERABLE], [RETRIEVED], CHUNKS, p)
    assert not example["has_oracle"]
    assert all(not pid.startswith("doc-1#") for pid in example["passage_ids"])
    assert example["messages"][-1] == {"role": "assistant", "content": p.abstain_answer}


def test_unanswerable_question_is_answered_with_abstention():
    p = BuildSftParams(context_chunks=2, retrieval_pool=4)
    [example] = build_examples([UNANSWERABLE], [RETRIEVED], CHUNKS, p)
    assert example["messages"][-1]["content"] == p.abstain_answer


def test_oracle_drop_rate_is_respected_in_aggregate():
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.3, retrieval_pool=4, seed=1)
    examples = build_examples([ANSWERABLE] * 400, [RETRIEVED] * 400, CHUNKS, p)
    share = sum(not e["has_oracle"] for e in examples) / len(examples)
    assert 0.24 < share < 0.36


def test_samples_per_question_vary_the_context():
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4)
    examples = build_examples([ANSWERABLE], [RETRIEVED], CHUNKS, p, samples_per_question=6)
    assert len(examples) == 6
    assert len({tuple(e["passage_ids"]) for e in examples}) > 1


def test_loss_mask_covers_exactly_the_assistant_reply(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    messages = chat.rag_messages("Answer from the documents.", "How much is it?", CHUNKS[:2])
    messages.append({"role": "assistant", "content": "$149"})
    tokens = tokenize_example(messages, tokenizer)
    assert len(tokens["input_ids"]) == len(tokens["labels"])
    supervised = [t for t, label in zip(tokens["input_ids"], tokens["labels"]) if label != -100]
    assert tokenizer.decode(supervised) == "$149" + chat.EOT
    # Everything before the reply, the assistant header included, is masked.
    n_prompt = tokens["labels"].index(next(label for label in tokens["labels"] if label != -100))
    assert tokenizer.decode(tokens["input_ids"][:n_prompt]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokens["input_ids"] == tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                                            add_special_tokens=False)["input_ids"]


def test_template_that_breaks_the_prefix_property_is_refused(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(LabelMaskError):
        tokenize_example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenizer)


def test_follow_up_turns_ask_only_what_the_shown_passages_answer():
    second = {"id": "q3", "question": "What does the Zephyr X5 cost?", "answers": ["$509"], "doc_ids": ["doc-2"],
              "kind": "single_hop"}
    elsewhere = {"id": "q4", "question": "What does express shipping cost?", "answers": ["$12.50"],
                 "doc_ids": ["doc-4"], "kind": "single_hop"}
    not_in_text = {"id": "q5", "question": "How heavy is the Zephyr X5?", "answers": ["4 kg"], "doc_ids": ["doc-2"],
                   "kind": "single_hop"}
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4, turns_per_conversation=4)
    questions = [ANSWERABLE, second, elsewhere, not_in_text]
    examples = build_examples(questions, [RETRIEVED] * 4, CHUNKS, p)
    first = examples[0]
    shown = {pid.split("#")[0] for pid in first["passage_ids"]}
    assert shown == {"doc-1", "doc-2"}  # the oracle and the hardest distractor
    roles = [m["role"] for m in first["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert first["messages"][3]["content"] == "Question: What does the Zephyr X5 cost?"
    assert first["messages"][4]["content"] == "$509"
    assert first["follow_up_ids"] == ["q3"]  # not q4 (passage not shown), not q5 (answer not in the text)


def test_unanswerable_follow_ups_are_about_shown_documents_and_answered_with_abstention():
    second = {"id": "q3", "question": "What does the Zephyr X5 cost?", "answers": ["$509"], "doc_ids": ["doc-2"],
              "kind": "single_hop"}
    not_stated = {"id": "q6", "question": "How loud is the Zephyr X5?", "answers": [], "doc_ids": ["doc-2"],
                  "kind": "unanswerable"}
    unshown = {"id": "q7", "question": "Does express shipping reach Peru?", "answers": [], "doc_ids": ["doc-4"],
               "kind": "unanswerable"}
    no_such_product = {"id": "q8", "question": "How much is the Nimbus Z9 Toaster?", "answers": [], "doc_ids": [],
                       "kind": "unanswerable"}
    questions = [ANSWERABLE, second, not_stated, unshown, no_such_product]
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4, turns_per_conversation=3,
                       unanswerable_follow_up_rate=1.0)
    first = build_examples(questions, [RETRIEVED] * 5, CHUNKS, p)[0]
    assert {pid.split("#")[0] for pid in first["passage_ids"]} == {"doc-1", "doc-2"}
    # About a shown document first (q6), then a product no document names (q8); never q7,
    # whose document is not shown, and no question twice.
    assert first["follow_up_ids"] == ["q6", "q8"]
    assert [m["content"] for m in first["messages"][4::2]] == [p.abstain_answer] * 2

    mixed = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4, turns_per_conversation=2,
                           unanswerable_follow_up_rate=0.3, seed=3)
    examples = build_examples([ANSWERABLE] * 300 + [second, not_stated], [RETRIEVED] * 302, CHUNKS, mixed)
    follow_ups = [e["follow_up_ids"][0] for e in examples[:300]]
    assert set(follow_ups) == {"q3", "q6"}
    assert 0.22 < follow_ups.count("q6") / len(follow_ups) < 0.38


def test_zero_unanswerable_rate_leaves_the_conversations_as_before():
    second = {"id": "q3", "question": "What does the Zephyr X5 cost?", "answers": ["$509"], "doc_ids": ["doc-2"],
              "kind": "single_hop"}
    not_stated = {"id": "q6", "question": "How loud is the Zephyr X5?", "answers": [], "doc_ids": ["doc-2"],
                  "kind": "unanswerable"}
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.5, retrieval_pool=4, turns_per_conversation=3)
    with_pool = build_examples([ANSWERABLE, second, not_stated] * 20, [RETRIEVED] * 60, CHUNKS, p)
    without = build_examples([ANSWERABLE, second] * 20, [RETRIEVED] * 40, CHUNKS, p)
    asked = [e.get("follow_up_ids", []) for e in with_pool if e["kind"] != "unanswerable"]
    assert all("q6" not in ids for ids in asked)
    assert len(asked) == len(without)


def test_unanswerable_follow_up_rate_out_of_range_is_a_params_error():
    assert any("unanswerable_follow_up_rate" in m for m in BuildSftParams(unanswerable_follow_up_rate=1.5).problems())


def test_off_topic_follow_ups_are_declined_and_never_the_simulated_customers_requests():
    from veritune.config import load_params
    from veritune.csat import OFF_TOPIC_QUESTIONS

    requests = ("Tell me a joke.", "Write a haiku about the sea.")
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4, turns_per_conversation=3,
                       off_topic_follow_up_rate=1.0, off_topic_requests=requests)
    [example] = build_examples([ANSWERABLE], [RETRIEVED], CHUNKS, p)
    asked = [m["content"] for m in example["messages"][3::2]]
    assert len(asked) == 2 and all(a.removeprefix("Question: ") in requests for a in asked)
    assert [m["content"] for m in example["messages"][4::2]] == [p.abstain_answer] * 2
    # The requests trained on are not the ones the CSAT simulation asks.
    trained = {r.lower() for r in load_params("build_sft", REPO / "params.yaml").off_topic_requests}
    assert trained and not trained & {q.lower() for q in OFF_TOPIC_QUESTIONS}


def test_one_turn_per_conversation_adds_no_follow_ups():
    p = BuildSftParams(context_chunks=2, oracle_drop_rate=0.0, retrieval_pool=4, turns_per_conversation=1)
    second = {"id": "q3", "question": "What does the Zephyr X5 cost?", "answers": ["$509"], "doc_ids": ["doc-2"],
              "kind": "single_hop"}
    examples = build_examples([ANSWERABLE, second], [RETRIEVED] * 2, CHUNKS, p)
    assert all(len(e["messages"]) == 3 and "follow_up_ids" not in e for e in examples)


def test_follow_up_turns_are_all_supervised(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    messages = chat.rag_messages("Answer.", "How much is the Aurora K3 Kettle?", CHUNKS[:2])
    messages += [{"role": "assistant", "content": "$149"}, {"role": "user", "content": "Question: And the Zephyr X5?"},
                 {"role": "assistant", "content": "$509"}]
    row = tokenize_example(messages, tokenizer)
    learnt = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    assert "$149" in learnt and "$509" in learnt and "Zephyr" not in learnt
