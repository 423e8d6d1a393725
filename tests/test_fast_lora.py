"""The fast training path computes what PEFT computes; packing keeps samples apart; the
merged export equals base + adapter."""

import copy
import json

import pytest
import torch
from peft import get_peft_model

from tests.conftest import params
from veritune.core import chat
from veritune.model.modeling import load_model, load_tokenizer
from veritune.train.export import export_merged, merged_model
from veritune.train.fast_lora import fuse_lora_layers, prepare_for_training
from veritune.train.tokenization import tokenize_example
from veritune.train.training import lora_config

VOCAB = 200  # below the tiny tokenizer's vocabulary size


def _peft_pair(tiny_checkpoint, dropout=0.0, adapter_dtype=torch.float32):
    """Two identical PEFT models with non-zero LoRA B (so the adapter path matters)."""
    torch.manual_seed(0)
    ref = get_peft_model(
        load_model(tiny_checkpoint),
        lora_config(params("train", lora_r=4, lora_alpha=8, lora_dropout=dropout, quantization="none")),
    )
    assert ref.config.vocab_size > VOCAB
    for name, param in ref.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
        if param.requires_grad:
            param.data = param.data.to(adapter_dtype)
    return ref, copy.deepcopy(ref)


def _loss_and_grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft_loss_and_gradients(tiny_checkpoint, dropout):
    ref, fast = _peft_pair(tiny_checkpoint, dropout)
    assert prepare_for_training(fast, liger=True, gradient_checkpointing=True)["fused_lora_layers"] == 14
    ref.train(), fast.train()
    ids = torch.randint(0, VOCAB, (3, 40))
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt without loss, as in SFT
    batch = {"input_ids": ids, "labels": labels}
    loss_ref, grads_ref = _loss_and_grads(ref, batch)
    loss_fast, grads_fast = _loss_and_grads(fast, batch)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_ref.keys() == grads_fast.keys() and len(grads_ref) == 28
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_returns_gradients_in_the_adapter_dtype(tiny_checkpoint):
    _, fast = _peft_pair(tiny_checkpoint, adapter_dtype=torch.bfloat16)
    fuse_lora_layers(fast)
    ids = torch.randint(0, VOCAB, (2, 16))
    fast(input_ids=ids, labels=ids).loss.backward()
    dtypes = {p.grad.dtype for p in fast.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}


def test_fused_lora_leaves_base_weights_frozen_and_adapter_switchable(tiny_checkpoint):
    ref, fast = _peft_pair(tiny_checkpoint)
    fuse_lora_layers(fast)
    ids = torch.randint(0, VOCAB, (1, 12))
    with fast.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits)
    fast(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in fast.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------- packing


def _examples(tokenizer):
    rows = []
    for i, (question, answer) in enumerate(
        [
            ("How much is the K3?", "$149."),
            ("Return window?", "30 days from delivery."),
            ("What does E4 mean on the display of the kettle?", "Descale it."),
        ]
    ):
        messages = chat.rag_messages(
            "Answer from the documents.",
            question,
            [
                {"doc_id": f"d{i}", "title": "Doc", "text": chat_text}
                for chat_text in ["The Aurora K3 Kettle retails for $149." * (i + 1)]
            ],
        )
        rows.append(tokenize_example(messages + [{"role": "assistant", "content": answer}], tokenizer))
    return rows


@pytest.mark.parametrize("fused", [False, True])
def test_packed_batch_gives_the_same_loss_as_unpacked(tiny_checkpoint, fused):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = load_tokenizer(tiny_checkpoint)
    rows = _examples(tokenizer)
    assert len({len(r["input_ids"]) for r in rows}) == 3, "samples of different lengths"
    model, _ = _peft_pair(tiny_checkpoint)
    if fused:
        fuse_lora_layers(model)
    model.eval()
    pad = tokenizer.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows)), "no padding when packed"
    assert "attention_mask" not in packed
    # The assistant-only mask survives packing: the same tokens carry loss.
    n_labelled = int((padded["labels"][:, 1:] != -100).sum())
    assert (
        int((packed["labels"][:, 1:] != -100).sum())
        == n_labelled
        == sum(sum(t != -100 for t in r["labels"][1:]) for r in rows)
    )
    # use_cache=False as in training (SFTTrainer sets it): the sample boundaries are read from
    # the position ids only when no KV cache is being built.
    with torch.no_grad():
        loss_padded = model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            labels=padded["labels"],
            use_cache=False,
        ).loss
        loss_packed = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"], use_cache=False
        ).loss
        # No cross-sample attention: the last sample's logits are the same alone and packed.
        last = rows[-1]["input_ids"]
        alone = model(input_ids=torch.tensor([last]), use_cache=False).logits[0]
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_logits[-len(last) :], alone, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- export


def _trained_adapter(tiny_checkpoint, tmp_path):
    model, _ = _peft_pair(tiny_checkpoint)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return adapter_dir


def test_merged_model_gives_the_logits_of_base_plus_adapter(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    adapter_dir = _trained_adapter(tiny_checkpoint, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_checkpoint), adapter_dir)(input_ids=ids).logits
        base = load_model(tiny_checkpoint)(input_ids=ids).logits
        merged = merged_model(tiny_checkpoint, adapter_dir, dtype="float32")(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter must matter for this test to mean anything"
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_exported_checkpoint_loads_with_plain_transformers(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = _trained_adapter(tiny_checkpoint, tmp_path)
    out = tmp_path / "merged"
    info = export_merged(tiny_checkpoint, adapter_dir, out, dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and json.loads((out / "merge_info.json").read_text()) == info
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_checkpoint), adapter_dir)(input_ids=ids).logits
        got = model.float()(input_ids=ids).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max(), "bf16 rounding only"
