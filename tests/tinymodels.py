"""Helpers the tests import: tiny random Llama-family models with a real (tiny, trained) BPE tokenizer,
and where the shared WikiText-2 files lie. (A plain module: ``conftest`` is not importable by name when
several folders have one.)"""

from __future__ import annotations

from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext-2-valid.tokens.txt"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw-test.txt"

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A model of language predicts the next token. "
    "Quantization stores weights in fewer bits; groups share a scale and a zero. "
    "Memory budgets decide how many bits each layer may keep. "
) * 20


def load_smollm2():
    """The real SmolLM2-135M from the user's cache (``AQSEARCH_CACHE`` unset for the load): its conversion takes a
    minute and half a gigabyte, so the real tests share one converted copy across tests and runs instead of
    converting again into each session's temporary cache."""
    import os

    from aqsearch.models import load_model

    saved = os.environ.pop("AQSEARCH_CACHE", None)
    try:
        return load_model("smollm2-135m")
    finally:
        if saved is not None:
            os.environ["AQSEARCH_CACHE"] = saved


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


# `aqsearch search` / `run` on a tiny model in seconds: few windows, two polish steps, a small score study.
TINY_FRONT = ["--eval-tokens", "64", "--seqlen", "32", "--calib-windows", "4", "--calib-seqlen", "32", "--polish-steps",
              "2", "--trials", "10"]


def read_only_sqlite(path, monkeypatch) -> None:
    """Make the SQLite file ``path`` read-only. ``chmod`` does it for a normal user; root ignores file
    modes, so there SQLite is made to open this one file read-only (``mode=ro``), which is what it does
    with a 0444 file for anyone else: reads work, every write fails with "attempt to write a readonly
    database"."""
    import os
    import sqlite3

    path = Path(path).resolve()
    path.chmod(0o444)
    if os.geteuid() != 0:
        return
    real = sqlite3.dbapi2.connect

    def connect(database, *a, **kw):
        if str(database) != ":memory:" and Path(str(database)).resolve() == path:
            kw.pop("uri", None)
            return real(f"file:{path}?mode=ro", *a, uri=True, **kw)
        return real(database, *a, **kw)

    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)
