"""Shared fixtures: a tiny Llama-architecture checkpoint written locally in the Hugging Face
layout, the same layout a real Llama 3.1 checkpoint directory has."""

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = REPO.parent / "shared" / "llama3" / "tokenizer.model"
PARAMS_YAML = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def _merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def params(section: str, **overrides):
    """params.yaml's `section` with `overrides` (a nested section as a mapping of its changed
    keys), checked as a stage loads it; the links to other sections are not checked."""
    from veritune.core.config import parse_params

    return parse_params(section, _merged(PARAMS_YAML[section], overrides))


CORPUS = [
    "The Aurora K3 Kettle retails for $149. It weighs 1.2 kg.",
    "Returns are accepted within 30 days of delivery.",
    "The Zephyr X5 Air Purifier is sold at a list price of $509.",
    "If the display shows E4, descale the heating plate.",
] * 20


def _write_tiny(path: Path, chat_format: str, max_positions: int) -> Path:
    """A 2-layer Llama-architecture model and its tokenizer, saved with save_pretrained."""
    from veritune.model.modeling import TinyArch, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(CORPUS, vocab_size=600, chat_format=chat_format)
    arch = TinyArch(
        vocab_size=600,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_positions,
    )
    build_tiny_model(arch, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer Llama 3.1-architecture model and tokenizer saved with save_pretrained."""
    return _write_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama3", 512)


@pytest.fixture(scope="session")
def tiny_chatml_checkpoint(tmp_path_factory) -> Path:
    """The same tiny model with a ChatML tokenizer and veritune's tool-aware ChatML template:
    the layout of the default SmolLM2 base, at test size."""
    return _write_tiny(tmp_path_factory.mktemp("tiny-chatml"), "chatml", 1024)
