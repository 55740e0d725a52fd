import pytest
import torch

from aqsearch.errors import AqError
from aqsearch.models import BLOCK_LINEARS, decoder_blocks, decoder_layers, fingerprint, load_model, resolve_source
from tinymodels import tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_family_layers_and_fused_groups(arch):
    m = tiny_model(arch)
    layers = decoder_layers(m)
    assert len(decoder_blocks(m)) == 2 and len(layers) == 2 * len(BLOCK_LINEARS)
    assert [l.suffix for l in layers[:7]] == list(BLOCK_LINEARS)
    by = {l.suffix: l for l in layers if l.block == 1}
    assert by["self_attn.k_proj"].fused == by["self_attn.v_proj"].fused == by["self_attn.q_proj"].fused == "qkv"
    assert by["mlp.gate_proj"].fused == by["mlp.up_proj"].fused == "gate_up"
    assert by["mlp.up_proj"].unit == "model.layers.1.gate_up"
    assert (by["mlp.down_proj"].out_features, by["mlp.down_proj"].in_features) == (64, 160)
    assert (by["self_attn.k_proj"].out_features, by["self_attn.k_proj"].in_features) == (32, 64)  # 2 kv heads x 16


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(AqError, match="expected a Llama-family decoder"):
        decoder_layers(m)


def test_missing_model_paths():
    with pytest.raises(AqError, match="model file not found"):
        resolve_source("/nonexistent/model.gguf")
    with pytest.raises(AqError, match="model path not found"):
        resolve_source("./no/such/folder")


def test_load_folder_and_fingerprint(tiny_dir):
    a = load_model(str(tiny_dir))
    b = load_model(str(tiny_dir))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    with torch.no_grad():
        a.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert fingerprint(a.model) != b.fingerprint
    assert not any(p.requires_grad for p in a.model.parameters())


def test_a_hub_id_without_the_hub_is_one_quick_line(capsys, monkeypatch):
    """A Hugging Face id while the hub cannot be reached: one line within seconds. The hub's client
    alone retries for about a minute (56 s measured) before its error."""
    import time

    from huggingface_hub import constants

    from aqsearch.cli import main

    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    t0 = time.time()
    rc = main(["eval", "--model", "no-such-org/no-such-model", "--scheme", "w4g64", "--eval-tokens", "64",
               "--seqlen", "32"])
    took = time.time() - t0
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "cannot be reached" in err and "no-such-org/no-such-model" in err
    assert took < 15, f"{took:.0f} s before the error"
