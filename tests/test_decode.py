"""The one decoding loop (veritune.infer.decode) against transformers' `generate`: offline
batches (`generate_ids`) write `generate`'s tokens exactly, greedy and sampled (the same draws
from torch's generator), under the tool-call grammar and with a shared-prefix cache; and
`choose`, the picking the GPU engine shares, samples a served request from its own generator."""

import copy

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList

from veritune.agent.specs import TOOLS
from veritune.core.chat import stop_token_ids
from veritune.infer.constraints import ToolCallGrammar
from veritune.infer.decode import GenerationRequest, PrefixCache, choose, generate_batch, generate_ids
from veritune.model.modeling import inference_autocast, load_model, load_tokenizer

# generate()'s name for a prefilled cache: `cache` from transformers 5.24, `past_key_values` before.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"

TEXTS = ["Where is my order 1042?", "Hi", "Returns are accepted within 30 days of delivery. Can I return it?"]


class _Constraints(LogitsProcessor):
    """The rows' constraints as a transformers logits processor: the reference's way in."""

    def __init__(self, constraints):
        self.rows, self.prompt_len = constraints, None

    def __call__(self, input_ids, scores):
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                if row.state in ("start", "call", "close"):
                    row.consume(token)
        for i, row in enumerate(self.rows):
            allowed = row.mask()
            if allowed is not None:
                keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
                keep[: allowed.shape[0]] = allowed[: scores.shape[-1]]
                scores[i].masked_fill_(~keep, float("-inf"))
        return scores


def reference(model, rows, *, max_new_tokens, stop_ids, pad_id, temperature=0.0, constraints=None, shared=0):
    """transformers' `generate` on the layout `generate_ids` uses: [shared prefix][padding][rest]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r[:shared] + [pad_id] * (width - len(r)) + r[shared:] for r in rows])
    mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows])
    options = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    if constraints is not None:
        options["logits_processor"] = LogitsProcessorList([_Constraints(constraints)])
    if shared:
        with torch.inference_mode(), inference_autocast(model):
            cache = model(torch.tensor([rows[0][:shared]]), use_cache=True).past_key_values
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(rows))
        options[CACHE_KWARG] = cache
    with torch.inference_mode(), inference_autocast(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            **options,
        )
    return out[:, ids.shape[1] :]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    model.eval()
    return model, load_tokenizer(tiny_checkpoint)


def _rows(tokenizer, prefix=""):
    return [tokenizer(prefix + t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _stops(model, rows, pad_id):
    """Stop tokens that end rows at different steps: the second row's first greedy token (this
    random model repeats one token per row), and a band of ids the sampled rows meet at times."""
    first = reference(model, rows, max_new_tokens=1, stop_ids=[], pad_id=pad_id)[:, 0].tolist()
    return [first[1]] + [t for t in range(100, 160) if t not in first]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_offline_batches_write_generates_tokens(tiny, temperature):
    model, tokenizer = tiny
    rows, pad = _rows(tokenizer), tokenizer.pad_token_id
    stops = _stops(model, rows, pad)
    finished = []
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(model, rows, max_new_tokens=24, stop_ids=stops, pad_id=pad, temperature=temperature)
        torch.manual_seed(seed)
        got = generate_ids(model, rows, max_new_tokens=24, stop_ids=stops, pad_id=pad, temperature=temperature)
        assert torch.equal(got, expected), (seed, got.tolist(), expected.tolist())
        finished.append((got == pad).any(dim=1).tolist())
    # Some rows finished before others (padding after their stop token) in some batch.
    assert any(any(f) and not all(f) for f in finished), finished
    if temperature > 0:  # and the draws depend on the seed: the check above compared samples
        torch.manual_seed(0)
        first = generate_ids(model, rows, max_new_tokens=24, stop_ids=[], pad_id=pad, temperature=temperature)
        torch.manual_seed(1)
        second = generate_ids(model, rows, max_new_tokens=24, stop_ids=[], pad_id=pad, temperature=temperature)
        assert not torch.equal(first, second)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_constrained_and_prefixed_batches_write_generates_tokens(tiny, temperature):
    model, tokenizer = tiny
    grammar = ToolCallGrammar(tokenizer, 600, TOOLS, max_string_chars=120)
    system = "Returns are accepted within 30 days of delivery. The Aurora K3 Kettle retails for $149. " * 2
    rows, pad = _rows(tokenizer, prefix=system), tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer)
    prefix = PrefixCache()
    shared = prefix.length(rows)
    assert shared >= PrefixCache.MIN_TOKENS
    common = dict(max_new_tokens=80, stop_ids=stops, pad_id=pad, temperature=temperature)
    for require_call in (False, True):
        torch.manual_seed(7)
        constraints = [grammar.constraint(require_call=require_call) for _ in rows]
        expected = reference(model, rows, constraints=constraints, shared=shared, **common)
        torch.manual_seed(7)
        constraints = [grammar.constraint(require_call=require_call) for _ in rows]
        got = generate_ids(model, rows, constraints=constraints, prefix=prefix, **common)
        assert torch.equal(got, expected), (require_call, got.tolist(), expected.tolist())
    assert (got[:, 0] == grammar.python_tag).all()  # the forced calls were constrained


def test_choose_samples_a_request_from_its_own_generator(tiny):
    model, tokenizer = tiny
    logits = torch.randn(600)
    draws = [
        choose(logits, GenerationRequest([1], 1, temperature=0.8, generator=torch.Generator().manual_seed(s)))
        for s in (3, 3, 4, 5, 6)
    ]
    assert draws[0] == draws[1] and len(set(draws)) > 1
    assert choose(logits, GenerationRequest([1], 1)) == int(logits.argmax())
    # A served request at the agent's temperature draws what an offline batch of one draws.
    rows, pad = _rows(tokenizer)[:1], tokenizer.pad_token_id
    torch.manual_seed(11)
    offline = generate_ids(model, rows, max_new_tokens=16, stop_ids=[], pad_id=pad, temperature=0.8)[0].tolist()
    gen = torch.Generator().manual_seed(11)
    with inference_autocast(model):
        served = generate_batch(model, [GenerationRequest(rows[0], 16, temperature=0.8, generator=gen)], [], pad)
    assert served[0].token_ids == offline
