"""Building the tiny default and loading real Llama checkpoints (local directory or hub id)."""

import json
import logging

import pytest
import torch
import yaml

from tests.conftest import PARAMS_YAML
from veritune.core import chat
from veritune.model.modeling import (
    CheckpointError,
    check_checkpoint,
    load_model,
    load_tokenizer,
    materialize_checkpoint,
)


def test_tiny_model_has_the_llama31_architecture(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["hidden_act"] == "silu"  # SwiGLU
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert tokenizer.bos_token == chat.BEGIN_OF_TEXT and tokenizer.eos_token == chat.EOT
    assert tokenizer.pad_token == chat.PAD
    assert (tiny_checkpoint / "tokenizer.json").exists() and (tiny_checkpoint / "model.safetensors").exists()


def test_local_checkpoint_directory_is_materialized_and_loads(tiny_checkpoint, tmp_path):
    dest = tmp_path / "base"
    materialize_checkpoint(str(tiny_checkpoint), "", dest)
    info = check_checkpoint(dest)
    assert info["model_type"] == "llama" and info["num_layers"] == 2
    original, copied = load_model(tiny_checkpoint), load_model(dest)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(original(ids).logits, copied(ids).logits)


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        materialize_checkpoint(str(tmp_path / "weights"), "", tmp_path / "dest")


def test_checkpoint_without_chat_template_is_refused(tiny_checkpoint, tmp_path):
    dest = tmp_path / "base"
    materialize_checkpoint(str(tiny_checkpoint), "", dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no chat template"):
        check_checkpoint(dest)


def test_hub_checkpoint_is_fetched_pinned_with_token_never_logged(monkeypatch, tmp_path, caplog):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        kwargs["local_dir"].mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with caplog.at_level(logging.DEBUG):
        materialize_checkpoint(
            "meta-llama/Llama-3.1-8B-Instruct", "0e9e39f249a16976918f6564b8830bc894c89659", tmp_path / "base"
        )
    [call] = calls
    assert call["repo_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert call["revision"] == "0e9e39f249a16976918f6564b8830bc894c89659"
    assert call["token"] == "hf_secret_value_123"
    assert "hf_secret_value_123" not in caplog.text


def test_gated_hub_model_without_access_says_how_to_fix(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    httpx = pytest.importorskip("httpx2")  # the HTTP client huggingface_hub raises with

    def gated(**kwargs):
        request = httpx.Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-3.1-8B-Instruct")
        raise GatedRepoError("403 gated", response=httpx.Response(403, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CheckpointError, match="export HF_TOKEN"):
        materialize_checkpoint("meta-llama/Llama-3.1-8B-Instruct", "main", tmp_path / "base")


def test_base_stage_takes_a_local_checkpoint_by_params_alone(tiny_checkpoint, tmp_path, monkeypatch):
    from stages.base import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"base": {**PARAMS_YAML["base"], "model": str(tiny_checkpoint)}})
    )
    main()
    assert check_checkpoint(tmp_path / "models/base")["model_type"] == "llama"
    saved = json.loads((tmp_path / "models/base/base_config.json").read_text())
    assert saved["model"] == str(tiny_checkpoint)
    assert json.loads((tmp_path / "metrics/base.json").read_text())["num_layers"] == 2


def test_nf4_needs_a_gpu():
    from veritune.model.modeling import resolve_quantization

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_quantization("auto") == "none"
    with pytest.raises(CheckpointError, match="needs a CUDA GPU"):
        resolve_quantization("nf4")


def test_bf16_autocast_follows_the_precision_param(monkeypatch):
    from veritune.model import modeling

    assert modeling.use_bf16("bf16") and not modeling.use_bf16("fp32")
    monkeypatch.setattr(modeling.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: False)
    assert not modeling.use_bf16("auto")  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda: True)
    assert modeling.use_bf16("auto")


def _tool_conversation(order_id: int) -> list[dict]:
    call = {"name": "get_order", "parameters": {"order_id": order_id}}
    return [
        {"role": "system", "content": "Environment: ipython\n\nYou are the support agent."},
        {"role": "user", "content": f"Where is my order {order_id}?"},
        {"role": "assistant", "content": "", "tool_call": call},
        {"role": "ipython", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": f"Order {order_id} has shipped."},
    ]


def test_tiny_base_learns_the_tool_format_from_the_sft_conversations(tmp_path):
    from tests.conftest import params
    from veritune.model.pretrain import build_tiny_base

    documents = [
        {"id": f"d{i}", "title": f"Kettle K{i}", "text": f"The Kettle K{i} costs ${i}9 and weighs {i} kg."}
        for i in range(40)
    ]
    conversations = [_tool_conversation(1000 + i) for i in range(30)]
    call = chat.PYTHON_TAG + chat.tool_call_text("get_order", {"order_id": 1042}) + chat.EOM
    n_call, n_docs = {}, {}
    for from_sft in (False, True):
        p = params(
            "base",
            tiny={
                "vocab_size": 800,
                "hidden_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 1,
                "intermediate_size": 64,
                "max_position_embeddings": 256,
            },
            pretrain={"steps": 0, "tool_prompts": from_sft},
            tokenizer_from_sft=from_sft,
        )
        out = tmp_path / str(from_sft)
        out.mkdir()
        n_docs[from_sft] = build_tiny_base(documents, {d["id"]: "train" for d in documents}, p, out, conversations)[
            "n_pretrain_docs"
        ]
        n_call[from_sft] = len(load_tokenizer(out)(call, add_special_tokens=False)["input_ids"])
    assert n_call[True] <= 0.7 * n_call[False]  # the format's pieces ('{"', 'name', '":') became tokens
    assert (n_docs[False], n_docs[True]) == (40, 40 + 30)  # + the tool conversations' prompts
