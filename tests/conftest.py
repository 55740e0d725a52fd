"""Shared fixtures: tiny random Llama-family models with a real (tiny, trained) BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext-2-valid.tokens.txt"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw-test.txt"

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model of language predicts the next token. "
    "Quantization stores weights in fewer bits; groups share a scale and a zero. "
    "Memory budgets decide how many bits each layer may keep. "
) * 20


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests write caches to a temporary folder, except the real model's conversion (slow to redo)."""
    if "AQSEARCH_CACHE" not in os.environ:
        os.environ["AQSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str = "llama", **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    base = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=True)
    base.update(kw)
    return cls(**base)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    # Random init gives near-uniform outputs; scale up so the distributions have shape.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable by ``aqsearch`` like any HF folder."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(CORPUS.replace(". ", ".\r\n"))
    return p


@pytest.fixture(scope="session")
def other_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text2") / "other.txt"
    p.write_text(("Layers that fail a gate keep more bits. The budget is met by the smaller groups. ") * 40)
    return p


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A PostgreSQL server on loopback for the test session (Debian's postgresql package)."""
    import glob
    import shutil
    import socket
    import subprocess

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    import tempfile
    from pathlib import Path

    bindir = bins[-1]
    d = Path(tempfile.mkdtemp(prefix="aqsearch-pg-"))  # not under pytest's 0700 folders: postgres must reach it
    data = d / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(d, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(d / "log"), "-w", "start", "-o",
                    f"-p {port} -k {d} -h 127.0.0.1"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
