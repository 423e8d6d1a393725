"""LoRA SFT through TRL + PEFT on the tiny model: what trains, what is saved, resuming."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.conftest import params
from veritune.core import chat
from veritune.model.modeling import load_model, load_tokenizer
from veritune.train.tokenization import tokenize_example
from veritune.train.training import train_adapter

EXAMPLES = [
    {
        "id": f"q{i}",
        "messages": chat.rag_messages(
            "Answer from the documents.",
            f"How much is product {i}?",
            [{"doc_id": f"doc-{i}", "title": f"Product {i}", "text": f"Product {i} retails for ${100 + i}."}],
        )
        + [{"role": "assistant", "content": f"${100 + i}"}],
    }
    for i in range(16)
]
PARAMS = params(
    "train",
    quantization="none",
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    learning_rate=1e-2,
    max_steps=4,
    batch_size=4,
    save_steps=2,
    logging_steps=1,
    max_length=256,
    warmup_ratio=0.0,
    epochs=1.0,
    sampling="random",
    val_max_examples=0,
)


class StopAfter(TrainerCallback):
    """Simulates a crash right after a given step (the checkpoint of step 2 exists by then)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def _train(tiny_checkpoint, tmp_path, name, params=PARAMS, callbacks=()):
    out = tmp_path / name
    summary = train_adapter(
        tiny_checkpoint, EXAMPLES, EXAMPLES[:4], params, out, tmp_path / f"{name}-ckpt", callbacks=callbacks
    )
    return out, summary


def test_lora_trains_adapter_only_and_saves_peft_format(tiny_checkpoint, tmp_path):
    adapter_dir, summary = _train(tiny_checkpoint, tmp_path, "adapter")
    assert (adapter_dir / "adapter_config.json").exists()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b), "LoRA B starts at zero: it must have moved"
    targeted = {k.split(".")[-3] for k in weights}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targeted
    assert summary["steps"] == 4 and summary["n_dropped_examples"] == 0
    # max_steps > 0 (the default's setting) still reports throughput: 4 steps x 4 examples' tokens
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert summary["train_tokens"] == sum(
        len(tokenize_example(e["messages"], tokenizer)["input_ids"]) for e in EXAMPLES
    )
    assert summary["train_tokens_per_second"] > 0

    from peft import PeftModel

    base = load_model(tiny_checkpoint)
    ids = load_tokenizer(tiny_checkpoint)("Product 3 retails for", return_tensors="pt")["input_ids"]
    base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(load_model(tiny_checkpoint), adapter_dir)
    assert not torch.allclose(tuned(ids).logits, base_logits), "the adapter must change the model"
    with tuned.disable_adapter():
        assert torch.allclose(tuned(ids).logits, base_logits), "base weights must be untouched"


def test_too_long_examples_are_dropped_not_cut(tiny_checkpoint, tmp_path):
    params = dataclasses.replace(PARAMS, max_length=40, max_steps=1)
    with pytest.raises(ValueError, match="no training example fits train.max_length"):
        _train(tiny_checkpoint, tmp_path, "short", params)


def test_killed_run_resumes_to_the_same_adapter(tiny_checkpoint, tmp_path):
    straight, _ = _train(tiny_checkpoint, tmp_path, "straight")
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_checkpoint, tmp_path, "resumed", callbacks=[StopAfter(3)])
    assert (tmp_path / "resumed-ckpt" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed").exists()
    _, summary = _train(tiny_checkpoint, tmp_path, "resumed")
    assert summary["resumed_from"].endswith("checkpoint-2")
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_run_are_not_resumed(tiny_checkpoint, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_checkpoint, tmp_path, "run", callbacks=[StopAfter(3)])
    other = dataclasses.replace(PARAMS, learning_rate=5e-3)
    _, summary = _train(tiny_checkpoint, tmp_path, "run", other)
    assert summary["resumed_from"] is None


@pytest.mark.parametrize(
    "gpus, visible, expected",
    [
        (0, 4, ("torchrun", 4, "0,1,2,3")),
        (2, 4, ("torchrun", 2, "0,1")),
        (1, 4, ("python", 1, "0")),
        (0, 1, None),
        (0, 0, None),
    ],
)
def test_data_parallel_launch_plan(monkeypatch, gpus, visible, expected):
    """Several GPUs: torchrun, one process each (DDP); one of several: the others hidden, so
    the Trainer never falls back to DataParallel. The GPU count is faked: this checks the plan."""
    import subprocess

    from veritune.train import training

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check, env: calls.append((cmd, env["CUDA_VISIBLE_DEVICES"])))
    launched = training.launch_data_parallel("stages/train.py", dataclasses.replace(PARAMS, gpus=gpus))
    if expected is None:
        assert not launched and not calls
        return
    kind, n, devices = expected
    ((cmd, env_devices),) = calls
    assert launched and env_devices == devices and cmd[-1] == "stages/train.py"
    assert ("torch.distributed.run" in cmd and f"--nproc_per_node={n}" in cmd) == (kind == "torchrun")
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside a torchrun worker: train in-process
    assert not training.launch_data_parallel("stages/train.py", dataclasses.replace(PARAMS, gpus=gpus))


def test_length_buckets_cover_every_example_once_and_interleave_lengths():
    from veritune.train.training import LengthBucketSampler

    lengths = [700 + i % 50 if i % 10 == 0 else 300 + i % 80 for i in range(1000)]  # 10% long (tool trajectories)
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert first != second  # a new order each epoch
    batches = [first[i : i + 8] for i in range(0, 1000 - 1000 % 8, 8)]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sorted(spread)[len(spread) // 2] < 40  # like lengths share a batch: little padding
    long = [all(lengths[i] >= 700 for i in b) for b in batches]
    assert sum(long) >= 8  # the long examples pad together...
    runs, run = [], 0
    for is_long in long:
        run = run + 1 if is_long else 0
        runs.append(run)
    assert max(runs) <= 4  # ...but not in one stretch of consecutive steps


def test_same_seed_same_batches():
    from veritune.train.training import LengthBucketSampler

    lengths = list(range(100, 400))
    assert list(LengthBucketSampler(lengths, 8, seed=3)) == list(LengthBucketSampler(lengths, 8, seed=3))


def test_label_position_loss_equals_trls_fused_head(tiny_checkpoint):
    """Same loss and the same gradients as TRL's fused LM head, on a padded batch with
    prompt tokens masked out (fp32)."""
    from trl.trainer.utils import add_fused_lm_head

    from veritune.train.training import label_position_loss

    tokenizer = load_tokenizer(tiny_checkpoint)
    tokenizer.padding_side = "right"
    texts = ["Product 3 retails for $103.", "Returns are accepted within 30 days of delivery, says the policy."]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :3] = -100  # a prompt: no loss there
    inputs = {**enc, "labels": labels}

    results = []
    for fused in (True, False):
        model = load_model(tiny_checkpoint)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        if fused:
            out = model(**inputs, fused_lm_head=True)
            loss = -out.log_probs.sum() / out.label_mask.sum()
        else:
            loss, stats = label_position_loss(model, inputs)
            assert int(stats["n"]) == int((labels[:, 1:] != -100).sum())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (loss, grads) = results
    assert torch.allclose(loss, fused_loss, atol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], fused_grads[name], atol=1e-5, rtol=1e-4), name
    # A count of items from gradient accumulation divides instead of this batch's own count.
    halved, _ = label_position_loss(load_model(tiny_checkpoint), inputs, num_items_in_batch=2 * int(stats["n"]))
    assert torch.allclose(halved, loss / 2, atol=1e-6)


def test_both_loss_heads_train_alike(tiny_checkpoint, tmp_path):
    """The trainer's loss through either head: the same batches give the same losses."""
    losses = {}
    for head in ("fused", "label_positions"):
        params = dataclasses.replace(PARAMS, loss_head=head, precision="fp32", max_steps=3, save_steps=100)
        seen = []

        class Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    seen.append(logs["loss"])

        _train(tiny_checkpoint, tmp_path, head, params, callbacks=[Record()])
        losses[head] = seen
    assert len(losses["fused"]) == 3
    assert losses["label_positions"] == pytest.approx(losses["fused"], rel=1e-3)


def test_padding_mask_dropped_only_where_causal_attention_makes_it_redundant(tiny_checkpoint):
    """Right padding: the loss without the mask is the loss of each row on its own. Left
    padding: the mask is kept, and the loss still matches each row on its own."""
    from veritune.train.training import is_right_padded, label_position_loss

    tokenizer = load_tokenizer(tiny_checkpoint)
    texts = ["Product 3 retails for $103.", "Returns are accepted within 30 days of delivery, says the policy."]
    model = load_model(tiny_checkpoint)
    alone = []
    for text in texts:
        ids = tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        loss, stats = label_position_loss(model, {"input_ids": ids, "labels": ids})
        alone.append(loss * stats["n"])
    for side in ("right", "left"):
        tokenizer.padding_side = side
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert is_right_padded(enc["attention_mask"]) == (side == "right")
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        # A row's first token has nothing before it to be predicted from, alone or padded.
        labels = enc["input_ids"].masked_fill((enc["attention_mask"] == 0) | (position_ids == 0), -100)
        inputs = {**enc, "labels": labels, **({"position_ids": position_ids} if side == "left" else {})}
        loss, stats = label_position_loss(model, inputs)
        assert torch.allclose(loss * stats["n"], sum(alone), atol=1e-4), side


def test_fp32_attention_under_bf16_autocast(tiny_checkpoint):
    """The CPU training attention: float32 SDPA inside a bf16 autocast region, the same
    function as float32 SDPA outside it, and the model's loss moves only by bf16 rounding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from veritune.model.modeling import FP32_ATTENTION, sdpa_fp32_attention, use_fp32_attention
    from veritune.train.training import label_position_loss

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_fp32_attention(module, q, k, v, None)
    ref, _ = sdpa_attention_forward(module, q, k, v.float(), None)
    assert out.dtype == torch.float32 and torch.equal(out, ref)

    tokenizer = load_tokenizer(tiny_checkpoint)
    ids = tokenizer(
        ["Returns are accepted within 30 days of delivery."], return_tensors="pt", add_special_tokens=False
    )["input_ids"]
    model = load_model(tiny_checkpoint)
    exact, _ = label_position_loss(model, {"input_ids": ids, "labels": ids})
    use_fp32_attention(model)
    assert model.config._attn_implementation == FP32_ATTENTION
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = label_position_loss(model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(mixed, exact, rtol=2e-2)
