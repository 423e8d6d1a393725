"""LoRA / QLoRA supervised fine-tuning with TRL and PEFT.

The same function trains the tiny default on a CPU and Llama 3.1 8B on one or several GPUs:
only the base checkpoint and `TrainParams` differ. Examples arrive already tokenized with the
loss mask on assistant tokens (veritune.sft.tokenize_example), so TRL trains exactly that.
On a GPU the step runs through veritune.fast_lora (fused LoRA linears, Liger kernels, TRL's
fused LM head); on several GPUs `launch_data_parallel` reruns the stage under torchrun (DDP).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from veritune.config import TrainParams
from veritune.fast_lora import prepare_for_training
from veritune.modeling import (load_model, load_tokenizer, resolve_quantization, save_tokenizer, use_bf16,
                               use_fp32_attention)
from veritune.chat import TODAY_DATE
from veritune.sft import tokenize_example

log = logging.getLogger(__name__)


def tokenize_examples(examples: Sequence[dict], tokenizer, max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenize chat examples; those longer than `max_length` are dropped (ids returned),
    since cutting them would cut the answer or the passage that holds it."""
    kept, dropped = [], []
    for ex in examples:
        tokens = tokenize_example(ex["messages"], tokenizer, ex.get("tools"), ex.get("today", TODAY_DATE))
        if len(tokens["input_ids"]) > max_length:
            dropped.append(ex["id"])
        else:
            kept.append(tokens)
    return kept, dropped


def lora_config(p: TrainParams):
    from peft import LoraConfig

    targets = p.target_modules if p.target_modules == "all-linear" else [m.strip() for m in p.target_modules.split(",")]
    return LoraConfig(r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def run_fingerprint(base_dir: Path, train_examples: Sequence[dict], p: TrainParams) -> str:
    """What a checkpoint must match to be resumed: the params, the data and the base."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(p), sort_keys=True).encode())
    for ex in train_examples:
        h.update(json.dumps(ex["messages"], sort_keys=True).encode())
    config = base_dir / "config.json"
    h.update(config.read_bytes() if config.exists() else b"")
    return h.hexdigest()


def resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The newest checkpoint of an interrupted run with the same fingerprint, if any.

    Checkpoints of a run with other params or data are removed, never resumed."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = checkpoint_dir / "fingerprint.txt"
    if checkpoint_dir.is_dir() and (not stamp.exists() or stamp.read_text() != fingerprint):
        log.info("train: discarding checkpoints of a different run in %s", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return get_last_checkpoint(str(checkpoint_dir))


def _has_dvclive() -> bool:
    import importlib.util

    if importlib.util.find_spec("dvclive") is None:
        log.warning("train: dvclive is not installed; training without the per-step curves")
        return False
    return True


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def launch_data_parallel(script: str, p: TrainParams) -> bool:
    """Rerun `script` on the GPUs `train.gpus` asks for and return True once that run has
    finished: under torchrun with one process per GPU (DDP) for two or more, in one process
    with the other GPUs hidden for one of several (the Trainer would otherwise fall back to
    DataParallel). Returns False, so the caller trains in-process, inside a torchrun worker
    or when the visible GPUs are already exactly the ones to use."""
    import torch

    if "LOCAL_RANK" in os.environ:
        return False
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = available if p.gpus == 0 else min(p.gpus, available)
    if available < 2 and n == available:
        return False
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(_visible_gpus()[:n])}
    if n >= 2:
        log.info("train: %d GPUs, data-parallel under torchrun", n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script]
    else:
        log.info("train: 1 of %d GPUs (train.gpus=%d)", available, p.gpus)
        cmd = [sys.executable, script]
    subprocess.run(cmd, check=True, env=env)
    return True


def _visible_gpus() -> list[str]:
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar length, in random order.

    Each epoch: shuffle, cut into windows of `window` batches, sort each window by length and
    cut it into batches, then shuffle the batches (leftovers of each window go last). Padding
    stays as low as with transformers' group_by_length, whose megabatches run from the longest
    batch down: there all batches of one kind of example (the long tool trajectories) come in a
    run, followed by dozens of steps of the other kind, and the tiny default never learnt the
    tool-call format (0 valid calls vs 0.97 with these batches, same data and steps).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 32):
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        full, rest = [], []
        span = self.batch_size * self.window
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=self.lengths.__getitem__)
            cut = len(window) - len(window) % self.batch_size
            full += [window[i : i + self.batch_size] for i in range(0, cut, self.batch_size)]
            rest += window[cut:]
        rng.shuffle(full)
        return iter([i for batch in full for i in batch] + rest)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros: real tokens first, padding (if any) after them."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def label_position_loss(causal_lm, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    """The SFT loss as TRL's fused LM head defines it (summed negative log-likelihood of each
    next token whose label is not -100, over `num_items_in_batch` or the number of such
    tokens), computed from the logits of the label positions only, plus the token accuracy
    and entropy TRL logs. Without Triton, TRL's chunked head runs as a dozen full-size torch
    passes per tile (entropy, top-1, rescaling); on a CPU this is a third of the work."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    if "attention_mask" in kwargs and is_right_padded(kwargs["attention_mask"]):
        # Under causal attention no real token sees the padding after it, so the mask changes
        # nothing the loss reads; without it SDPA takes its causal kernel (a CPU step 1.11x faster).
        del kwargs["attention_mask"]
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
    targets = targets[mask]
    n = mask.sum()
    denominator = n if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / denominator.clamp(min=1)
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)
        stats = {"n": n, "correct": (logits.argmax(-1) == targets).sum(), "entropy": -(log_p.exp() * log_p).sum()}
    return loss, stats


def _trainer_class(sampling: str, loss_head: str):
    """SFTTrainer, with `LengthBucketSampler` batches (`train.sampling: bucketed`) and the loss
    from `label_position_loss` where `loss_head` resolves to label_positions."""
    from trl import SFTTrainer

    label_positions = loss_head == "label_positions" or (loss_head == "auto" and not torch.cuda.is_available())

    class PipelineSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if sampling != "bucketed":
                return super()._get_train_sampler(train_dataset)
            dataset = self.train_dataset if train_dataset is None else train_dataset
            return LengthBucketSampler([len(ids) for ids in dataset["input_ids"]],
                                       self.args.per_device_train_batch_size, self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not label_positions or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            peft_model = self.accelerator.unwrap_model(model)
            causal_lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
            # The backbone is called directly, past accelerate's autocast wrapper of the model's forward.
            with torch.autocast(causal_lm.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                loss, stats = label_position_loss(causal_lm, inputs, num_items_in_batch)
            n = max(int(stats["n"]), 1)
            self._metrics[mode]["entropy"].append(float(stats["entropy"]) / n)
            self._metrics[mode]["mean_token_accuracy"].append(float(stats["correct"]) / n)
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs \
                    else inputs["position_ids"].size(1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return PipelineSFTTrainer


def train_adapter(base_dir: Path, train_examples: Sequence[dict], val_examples: Sequence[dict], p: TrainParams,
                  adapter_dir: Path | None, checkpoint_dir: Path, live_dir: Path | None = None,
                  callbacks: Sequence = ()) -> dict:
    """Fine-tune a LoRA adapter on `base_dir`; save it (PEFT format) and the tokenizer to
    `adapter_dir` (None: don't save, as on the non-main ranks of a data-parallel run).
    Resumes from the newest checkpoint in `checkpoint_dir` if one exists."""
    from datasets import Dataset
    from trl import SFTConfig

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before loading: the model goes to this GPU
    quantization = resolve_quantization(p.quantization)
    tokenizer = load_tokenizer(base_dir)
    train_rows, dropped_train = tokenize_examples(train_examples, tokenizer, p.max_length)
    if 0 < p.val_max_examples < len(val_examples):
        val_examples = list(val_examples)[:: math.ceil(len(val_examples) / p.val_max_examples)]
    val_rows, dropped_val = tokenize_examples(val_examples, tokenizer, p.max_length)
    if dropped_train:
        log.warning("train: %d examples longer than train.max_length=%d dropped (e.g. %s)",
                    len(dropped_train), p.max_length, dropped_train[:3])
    if not train_rows:
        raise ValueError("no training example fits train.max_length; raise it or shorten the contexts")

    # No prepare_model_for_kbit_training: its fp32 copies of norms, embeddings and head cost
    # ~3 GiB on 8B and buy nothing, since RMSNorm and the loss accumulate in fp32 anyway.
    model = load_model(base_dir, quantization)
    bf16 = use_bf16(p.precision)
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        seed=p.seed,
        data_seed=p.seed,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # a float in [0, 1) is a share of all steps
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        gradient_checkpointing=p.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        max_length=p.max_length,
        packing=p.packing,
        train_sampling_strategy="random" if p.sampling == "bucketed" else p.sampling,
        padding_free=p.packing,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on a CPU (where it has native bf16) needs this said
        logging_steps=p.logging_steps,
        save_strategy="steps",
        save_steps=p.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if p.eval_steps > 0 else "no",
        eval_steps=p.eval_steps if p.eval_steps > 0 else None,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=not is_main_process(),
    )
    with args.main_process_first(desc="checkpoints"):  # rank 0 discards stale checkpoints first
        resume = resumable_checkpoint(checkpoint_dir, run_fingerprint(base_dir, train_examples, p))
    callbacks = list(callbacks)
    if live_dir is not None and is_main_process() and _has_dvclive():
        from dvclive import Live
        from transformers.integrations import DVCLiveCallback

        callbacks.append(DVCLiveCallback(live=Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False,
                                                        resume=resume is not None)))
    trainer = _trainer_class(p.sampling, p.loss_head)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(val_rows) if val_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(p),
        callbacks=callbacks,
    )
    # The fused LoRA function is written for CUDA's bf16 weights; under CPU autocast the fp32
    # weights meet bf16 activations, so the CPU keeps PEFT's own forward.
    speedups = prepare_for_training(trainer.model, fused_lora=p.fused_lora and torch.cuda.is_available(),
                                    liger=p.liger,
                                    gradient_checkpointing=False)  # the Trainer switches checkpointing on itself
    if not torch.cuda.is_available() and bf16:
        # Faster on the 2-core CPU for the tiny base (bench/train_step_cpu.py) and for SmolLM2:
        # the whole train stage ran 303 tokens/s with it, 286 with bf16 SDPA.
        use_fp32_attention(trainer.model)
        speedups["attention"] = "sdpa in float32 under bf16 autocast"
    log.info("train: %s", speedups)
    if resume:
        log.info("train: resuming from %s", resume)
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    val_loss = trainer.evaluate()["eval_loss"] if val_rows else float("nan")
    if adapter_dir is not None:
        trainer.model.save_pretrained(adapter_dir)
        _sort_target_modules(adapter_dir / "adapter_config.json")
        save_tokenizer(tokenizer, adapter_dir)
    trainable = sum(t.numel() for t in trainer.model.parameters() if t.requires_grad)
    return {
        "train_loss": result.training_loss,
        "val_loss": val_loss,
        "n_train_examples": len(train_rows),
        "n_dropped_examples": len(dropped_train) + len(dropped_val),
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        # Tokens the trainer actually fed (non-padding, every process), so max_steps runs count too.
        "train_tokens": trainer._total_train_tokens,
        "train_tokens_per_second": round(trainer._total_train_tokens / seconds, 1) if seconds > 0 else None,
        "gpus": world_size() if torch.cuda.is_available() else 0,
        "trainable_params": trainable,
        "quantization": quantization,
        "resumed_from": resume,
    }


def _sort_target_modules(config_path: Path) -> None:
    """PEFT writes `target_modules` from a set, in hash order: sort it so the same run
    gives byte-identical files (and DVC sees an unchanged adapter)."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
