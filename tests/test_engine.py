"""The continuous-batching engine (veritune.serve.engine) on the tiny model, eagerly on the CPU in its
SDPA form: its own forward over the static cache decodes exactly as transformers' greedy
`generate`, requests join and leave between steps, prompts are prefilled in pieces riding on
decode steps (mixed steps), and each request keeps its own limit, stop, stream, cancel and
grammar. The kernel form (Triton attention, what CUDA runs) is tested under Triton's
interpreter in tests/test_slot_attention.py; bench/serve_throughput.py checks its CUDA graphs
on a GPU."""

import json
import threading

import pytest
import torch

from tests.test_serve import call, call_many, chat, index_uri, load_talkative, loaded, make_app, sse_lines  # noqa: F401
from veritune.agent.loop import parse_reply
from veritune.agent.specs import TOOLS, check_call
from veritune.core.chat import stop_token_ids
from veritune.infer.constraints import ToolCallGrammar
from veritune.infer.decode import GenerationRequest, generate_batch
from veritune.serve.batching import BatcherStopped
from veritune.serve.engine import ContinuousBatchingEngine

QUESTIONS = [
    "Kettle?",
    "How long is parental leave for employees who adopt?",
    "Reset the router",
    "VPN",
    "What does E4 on the display mean, and how do I descale the heating plate?",
    "Returns?",
]


@pytest.fixture(scope="module")
def talkative(tiny_checkpoint):
    return load_talkative(tiny_checkpoint)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=True, add_generation_prompt=True, return_dict=False
    )


def hf_greedy(model, ids: list[int], max_new: int, stops) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    return new[:-1] if new and new[-1] in stops else new


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def test_a_mixed_forward_gives_the_logits_of_hf_forward_for_decode_rows_and_prompt_pieces():
    model = tiny_llama()
    engine = ContinuousBatchingEngine(model, [], max_batch=3, max_len=256)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(3, 300, (n,), generator=g).tolist() for n in (23, 40, 17))
    with torch.inference_mode():

        def hf_last(ids):
            return model(torch.tensor([ids])).logits[0, -1]

        # Slot 0 holds prompt a; slot 1 holds the first 25 tokens of b; slot 2 is free.
        first = engine._prefill_forward([a], [0])
        engine._mixed_forward([], [], 0, [(1, 0, b[:25])])
        # One mixed step: slot 0 decodes its next token (slot 1 and 2 run dummy rows), b's rest
        # joins after its cached prefix, c starts in slot 2 - all through the same linear layers.
        nxt = int(first[0].argmax())
        out = engine._mixed_forward(
            [nxt, 0, 0], [len(a), engine.max_len - 1, engine.max_len - 1], len(a) + 1, [(1, 25, b[25:]), (2, 0, c)]
        )
        assert out.shape == (5, 300)
        torch.testing.assert_close(first[0], hf_last(a), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[0], hf_last(a + [nxt]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[3], hf_last(b), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[4], hf_last(c), rtol=1e-4, atol=1e-4)
        # The dummy rows left slot 1's prompt in place: its next decode matches HF too.
        nb = int(out[3].argmax())
        again = engine._mixed_forward([0, nb], [engine.max_len - 1, len(b)], len(b) + 1, [])
        torch.testing.assert_close(again[1], hf_last(b + [nb]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixed", ["mixed steps", "separate passes"])
def test_engine_decodes_as_hf_generate_while_requests_join_and_leave(talkative, mixed):
    model, tokenizer = talkative
    stops = stop_token_ids(tokenizer)
    # Different prompt lengths and limits: rows leave at different steps and, with 3 slots for
    # 6 requests, later requests are admitted into freed slots while others are mid-answer.
    # Mixed: prompts enter 16 tokens a step beside the decoding rows, split across steps.
    limits = [20, 5, 12, 30, 8, 16]
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    reference = [hf_greedy(model, p, n, stops) for p, n in zip(prompts, limits)]
    engine = ContinuousBatchingEngine(
        model, stops, max_batch=3, max_len=512, prefill_tokens=64, mixed_tokens=16, mixed=mixed != "separate passes"
    )
    engine.start()
    try:
        futures = [engine.submit(GenerationRequest(p, n)) for p, n in zip(prompts, limits)]
        completions = [f.result(60) for f in futures]
    finally:
        engine.stop()
    assert [c.token_ids for c in completions] == reference
    assert all(len(t) >= 5 for t in reference)  # real text, not an immediate stop
    assert [c.finish_reason for c in completions] == [
        "length" if len(r) == n else "stop" for r, n in zip(reference, limits)
    ]
    stats = engine.batch_stats()
    assert stats["max_batch_size_seen"] == 3  # never more than the slots
    assert engine.prefills >= 3  # the prefill budget (64 tokens) and the slots spread admission out
    if (
        mixed != "separate passes"
    ):  # later prompts (all longer than 16 tokens) were prefilled piecewise beside decoding rows
        assert min(map(len, prompts)) > 16 and engine.mixed_steps >= sum(-(-len(p) // 16) for p in prompts[3:])
    else:
        assert engine.mixed_steps == 0
    assert not engine._running and not engine._prefilling and sorted(engine._free) == [0, 1, 2]  # every slot returned


def test_mixed_steps_refill_slots_as_fast_as_they_empty(talkative):
    model, _ = talkative
    engine = ContinuousBatchingEngine(model, [], max_batch=8, max_len=512, prefill_tokens=300, mixed_tokens=700)
    from veritune.serve.engine import MAX_PIECES, MIN_CHUNK, _Running

    def waiting(*lengths, new=1, credit=0.0):
        engine._credit = credit
        engine._prefilling = [
            _Running(GenerationRequest([5] * n, new), None, slot, 0, -1) for slot, n in enumerate(lengths)
        ]
        return [(run.slot, start, count) for run, start, count in engine._plan()]

    assert MIN_CHUNK == 256
    assert waiting(250, 250) == [(0, 0, 250), (1, 0, 50)]  # nothing decoding: prefill_tokens per forward
    engine._running = {7: _Running(GenerationRequest([5] * 100, 50), None, 7, 100, 5)}  # owes 100 / 50 a step
    # Owed a step: prompt / max_new_tokens over the slots held (2 + 200 + 200), all of it taken.
    assert waiting(200, 200) == [(0, 0, 200), (1, 0, 200)]
    assert waiting(300, 300) == [(0, 0, 300), (1, 0, 300)] and engine._credit == 2  # what was left is carried
    assert waiting(400, 400) == [(0, 0, 400), (1, 0, 300)]  # at most mixed_tokens (700)
    assert waiting(100, new=8) == [(0, 0, 100)]  # owed 14.5: at least MIN_CHUNK, all 100 waiting taken
    assert engine._credit == MIN_CHUNK - 100
    assert waiting(400, new=8, credit=100) == [(0, 0, MIN_CHUNK + 100)]  # credit from before adds to the pace
    assert waiting(2000, new=100) == [(0, 0, MIN_CHUNK)]  # owed 22: MIN_CHUNK
    # The kernel form (CUDA): budgets rounded down to a chunk bucket, at most MAX_PIECES pieces;
    # the credit makes the pace the owed one on average (owed 302 a step: 256 + 256 + ... + 512).
    engine.kernel, engine.chunk_buckets = True, (64, 128, 256, 512)
    engine._prefilling = [_Running(GenerationRequest([5] * 6000, 20), None, 0, 0, -1)]
    engine._credit = 0.0
    taken = [engine._plan()[0][2] for _ in range(12)]
    assert set(taken) == {256, 512} and abs(sum(taken) - 12 * 302) < 256, taken
    assert waiting(*[10] * 12) == [(slot, 0, 10) for slot in range(MAX_PIECES)]
    engine._running = {}
    assert waiting(250, 250) == [(0, 0, 250), (1, 0, 6)]  # nothing decoding: prefill_tokens (300) down to 256
    engine._running = {7: _Running(GenerationRequest([5], 4), None, 7, 1, 5)}
    engine.kernel = False
    engine.mixed = False
    assert waiting(250, 250) == [(0, 0, 250)]  # separate passes: whole prompts within prefill_tokens
    assert waiting(400) == [(0, 0, 400)]  # (the first whatever its length)


def test_engine_matches_the_micro_batching_loop_with_a_grammar_on_one_row(talkative, tiny_checkpoint):
    model, tokenizer = talkative
    stops = stop_token_ids(tokenizer)
    grammar = ToolCallGrammar(tokenizer, model.config.vocab_size, TOOLS, max_string_chars=120)
    prompt = tokenizer("Where is my order 1042?", add_special_tokens=False)["input_ids"]

    def requests():
        return [
            GenerationRequest(list(prompt), 40),
            GenerationRequest(list(prompt), 300, constraint=grammar.constraint(require_call=True)),
        ]

    expected = generate_batch(model, requests(), stops, tokenizer.pad_token_id)
    engine = ContinuousBatchingEngine(model, stops, max_batch=4, max_len=512).start()
    try:
        got = [f.result(60) for f in [engine.submit(r) for r in requests()]]
    finally:
        engine.stop()
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    called = got[1]
    assert called.finish_reason == "stop" and called.stop_token_id == grammar.eom
    reply = parse_reply(tokenizer.decode(called.token_ids + [called.stop_token_id], skip_special_tokens=False))
    assert reply.kind == "call"
    check_call(reply.name, reply.parameters)


def test_engine_samples_as_the_micro_batching_loop(talkative):
    """A sampled request (the served agent's turns: its temperature, its own seeded generator)
    draws the same tokens from the engine as from the CPU loop, constrained or not."""
    model, tokenizer = talkative
    stops = stop_token_ids(tokenizer)
    grammar = ToolCallGrammar(tokenizer, model.config.vocab_size, TOOLS, max_string_chars=120)
    prompt = tokenizer("Where is my order 1042?", add_special_tokens=False)["input_ids"]

    def requests(seed):
        return [
            GenerationRequest(list(prompt), 40, temperature=0.8, generator=torch.Generator().manual_seed(seed)),
            GenerationRequest(
                list(prompt),
                300,
                constraint=grammar.constraint(require_call=True),
                temperature=0.8,
                generator=torch.Generator().manual_seed(seed + 1),
            ),
        ]

    engine = ContinuousBatchingEngine(model, stops, max_batch=4, max_len=512).start()
    try:
        runs = {}
        for seed in (1, 2):
            expected = generate_batch(model, requests(seed), stops, tokenizer.pad_token_id)
            got = [f.result(60) for f in [engine.submit(r) for r in requests(seed)]]
            assert [c.token_ids for c in got] == [c.token_ids for c in expected], seed
            runs[seed] = got
    finally:
        engine.stop()
    greedy = generate_batch(model, [GenerationRequest(list(prompt), 40)], stops, tokenizer.pad_token_id)[0]
    assert runs[1][0].token_ids != greedy.token_ids  # sampled, not greedy
    assert runs[1][0].token_ids != runs[2][0].token_ids  # and the seed decides the draws
    reply = parse_reply(tokenizer.decode(runs[1][1].token_ids + [grammar.eom], skip_special_tokens=False))
    assert reply.kind == "call"
    check_call(reply.name, reply.parameters)


def test_each_request_keeps_its_limit_stream_and_cancel(talkative):
    model, tokenizer = talkative
    ids = prompt_ids(tokenizer, "Kettle?")
    seen: list[int] = []
    engine = ContinuousBatchingEngine(model, [], max_batch=4, max_len=512)
    short = GenerationRequest(list(ids), 3, on_token=seen.append)
    long = GenerationRequest(list(ids), 40)
    cancel_later = threading.Event()

    def cancel_after(n):  # cancelled mid-answer, from the worker's own callback
        count = [0]

        def on_token(_):
            count[0] += 1
            if count[0] == n:
                cancel_later.set()

        return on_token

    mid = GenerationRequest(list(ids), 40, on_token=cancel_after(4), cancelled=cancel_later)
    before = GenerationRequest(list(ids), 10)
    before.cancelled.set()
    engine.start()
    try:
        out = [f.result(60) for f in [engine.submit(r) for r in (short, long, mid, before)]]
    finally:
        engine.stop()
    assert (len(out[0].token_ids), out[0].finish_reason) == (3, "length")
    assert (len(out[1].token_ids), out[1].finish_reason) == (40, "length")
    assert out[0].token_ids == out[1].token_ids[:3] == seen  # same prompt, same greedy path; streamed in order
    assert out[2].finish_reason == "cancelled" and out[2].token_ids == out[1].token_ids[:4]
    assert (out[3].token_ids, out[3].finish_reason) == ([], "cancelled")


def test_stop_drains_accepted_requests_then_refuses_and_bad_requests_fail_at_once(talkative):
    model, tokenizer = talkative
    engine = ContinuousBatchingEngine(model, [], max_batch=2, max_len=256).start()
    futures = [engine.submit(GenerationRequest(prompt_ids(tokenizer, q), 6)) for q in QUESTIONS]
    with pytest.raises(ValueError, match="exceeds the engine's 256 positions"):
        engine.submit(GenerationRequest([5] * 250, 10))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):  # refused, not failing the others
        engine.submit(GenerationRequest([5, 6], 0))
    engine.stop()
    assert [len(f.result(0).token_ids) for f in futures] == [6] * len(QUESTIONS)  # all answered, none lost
    with pytest.raises(BatcherStopped):
        engine.submit(GenerationRequest([5, 6], 2))


def test_engine_refuses_models_it_cannot_run(talkative):
    model, _ = talkative
    model.config.attention_bias = True
    try:
        with pytest.raises(ValueError, match="attention or MLP biases"):
            ContinuousBatchingEngine(model, [])
    finally:
        model.config.attention_bias = False


def test_the_server_on_the_continuous_engine_answers_as_on_micro_batches(make_app):
    """`serve.engine: continuous` (what `auto` picks on CUDA) behind the real app: the same
    answers, streamed and not, as the micro-batching engine; health reports the engine."""
    bodies = [chat(q, max_tokens=12) for q in ("How do I reset the Nimbus router?", "Parental leave?", "VPN setup?")]
    answers = {}
    for engine in ("micro_batch", "continuous"):
        service, app = make_app(engine=engine, max_batch_size=2)
        assert call(app, "GET", "/health").json()["engine"] == engine
        plain = [r.json() for r in call_many(app, bodies)]
        stream = call(app, "POST", "/v1/chat/completions", json={**bodies[0], "stream": True})
        text = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in sse_lines(stream)
            if line.startswith("data: {")
        )
        answers[engine] = ([(a["choices"][0]["message"]["content"], a["usage"], a["citations"]) for a in plain], text)
    assert answers["continuous"] == answers["micro_batch"]
    assert all(usage["completion_tokens"] > 0 for _, usage, _ in answers["continuous"][0])
    assert answers["continuous"][1] == answers["continuous"][0][0][0]
