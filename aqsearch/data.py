"""Token sets for calibration and evaluation: fixed-length windows with a content hash.

Sources, in the order a caller usually meets them:

- a text file (``wikitext-2-raw-test.txt``): read, CRLF -> LF, tokenized whole;
- a Hugging Face dataset, ``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` (needs ``datasets`` and a reachable hub);
- nothing: text sampled from the model itself (seeded, cached), the default. Calibration and
  evaluation samples use different seeds, so they never share text.

The same text for calibration and evaluation is refused unless the caller asks for a split
(``split=0.5``: the first half of the tokens calibrates, the second half evaluates).

>>> import torch
>>> ts = TokenSet.from_ids(torch.arange(10), seqlen=4, n_windows=2, source="demo")
>>> ts.windows.tolist()
[[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from aqsearch.errors import AqError
from aqsearch.io import atomic_path, cache_dir, sha256_bytes, sha256_file


@dataclass(frozen=True)
class TokenSet:
    """``windows[n, seqlen]`` (int64) cut from one source; ``hash`` covers the ids and the shape."""

    windows: torch.Tensor
    source: str
    hash: str

    @classmethod
    def from_ids(cls, ids: torch.Tensor, seqlen: int, n_windows: int, source: str, spread: bool = False) -> TokenSet:
        """Cut ``n_windows`` non-overlapping windows from 1-D ``ids``.

        Consecutive from the start, or (``spread=True``) evenly spaced over the whole text, which
        samples more of it for calibration.
        """
        if seqlen < 2:
            raise AqError(f"seqlen must be at least 2, got {seqlen}")
        if n_windows < 1:
            raise AqError(f"need at least one window of {seqlen} tokens")
        avail = ids.numel() // seqlen
        if n_windows > avail:
            raise AqError(
                f"{source} holds {ids.numel()} tokens: not enough for {n_windows} windows of {seqlen} "
                f"({n_windows * seqlen} tokens)"
            )
        if spread and avail > n_windows:
            starts = torch.linspace(0, avail - 1, n_windows).round().long() * seqlen
        else:
            starts = torch.arange(n_windows) * seqlen
        w = torch.stack([ids[s : s + seqlen] for s in starts.tolist()]).long()
        h = sha256_bytes(w.to(torch.int32).numpy().tobytes(), str(tuple(w.shape)).encode())[:16]
        return cls(w, source, h)

    @property
    def n_tokens(self) -> int:
        return self.windows.numel()

    @property
    def seqlen(self) -> int:
        return self.windows.shape[1]

    def describe(self) -> dict:
        return {"source": self.source, "hash": self.hash, "windows": self.windows.shape[0], "seqlen": self.seqlen}


def _log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise AqError(f"data file not found: {path}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AqError(f"data file {path} is not UTF-8 text (byte {e.start}): binary data?") from None
    if "\x00" in text:
        raise AqError(f"data file {path} holds NUL bytes: binary data, not text")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise AqError(f"data file is empty: {path}")
    return text


def tokenize_text(text: str, tokenizer, source: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) == 0:
        raise AqError(f"{source} has no tokens")
    return torch.tensor(ids, dtype=torch.long)


def file_ids(path: str, tokenizer) -> torch.Tensor:
    """Token ids of a text file, cached by file hash and tokenizer."""
    tk = sha256_bytes(type(tokenizer).__name__.encode(), str(len(tokenizer)).encode(),
                      "".join(tokenizer.convert_ids_to_tokens(list(range(0, len(tokenizer), 97)))).encode())[:12]
    cached = cache_dir("tokens") / f"{sha256_file(path)[:16]}-{tk}.pt"
    if cached.exists():
        return torch.load(cached)
    ids = tokenize_text(read_text(path), tokenizer, path)
    with atomic_path(cached) as tmp:
        torch.save(ids, tmp)
    return ids


def hf_ids(spec: str, tokenizer) -> torch.Tensor:
    """``hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]`` -> token ids (rows joined by blank lines, as is usual)."""
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    column = parts[3] if len(parts) > 3 and parts[3] else "text"
    try:
        import datasets
    except ImportError:
        raise AqError(f"data {spec!r} needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise AqError(f"cannot load dataset {spec!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if column not in ds.column_names:
        raise AqError(f"dataset {spec!r} has no column {column!r} (has {', '.join(ds.column_names)})")
    return tokenize_text("\n\n".join(ds[column]), tokenizer, spec)


def sample_ids(model, tokenizer, n_tokens: int, seqlen: int, seed: int, fingerprint: str) -> torch.Tensor:
    """``n_tokens`` (rounded up to whole windows) of text sampled from the model, seeded and cached."""
    n_seq = -(-n_tokens // seqlen)
    cached = cache_dir("samples") / f"{fingerprint}-s{seed}-{n_seq}x{seqlen}.pt"
    if cached.exists():
        return torch.load(cached)
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    out = []
    batch = 16
    _log(f"sampling {n_seq} x {seqlen} tokens of text from the model (seed {seed}; cached afterwards)")
    # Ancestral sampling at temperature 1 (no top-k/top-p), end-of-text suppressed so every window is
    # full; a forked RNG keeps the global random state untouched and the result reproducible.
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n_seq, batch):
            b = min(batch, n_seq - start)
            ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, pad_token_id=pad,
            )
            out.append(gen[:, :seqlen].cpu())
    ids = torch.cat(out).reshape(-1)
    with atomic_path(cached) as tmp:
        torch.save(ids, tmp)
    return ids


def check_sources(*specs: str | None) -> None:
    """Fail early, before any model is loaded, on a data file that is not there."""
    for spec in specs:
        if spec is not None and not spec.startswith("hf:") and not Path(spec).is_file():
            raise AqError(f"data file not found: {spec}")


def source_identity(spec: str | None, seed: int) -> str:
    """Equal identities mean the same text (files compare by content)."""
    if spec is None:
        return f"samples:{seed}"
    if spec.startswith("hf:"):
        return spec
    check_sources(spec)
    return "file:" + sha256_file(spec)


def source_ids(spec: str | None, loaded, n_tokens: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    """(token ids, description) of a data spec."""
    if spec is None:
        ids = sample_ids(loaded.model, loaded.tokenizer, n_tokens, seqlen, seed, loaded.fingerprint)
        return ids, f"model-samples(seed={seed})"
    if spec.startswith("hf:"):
        return hf_ids(spec, loaded.tokenizer), spec
    source_identity(spec, seed)
    return file_ids(spec, loaded.tokenizer), spec


def calib_eval_sets(
    loaded,
    calib: str | None = None,
    evaluation: str | None = None,
    calib_windows: int = 0,
    calib_seqlen: int = 256,
    eval_tokens: int | None = 4096,
    seqlen: int = 512,
    split: float | None = None,
    eval_seed: int = 1,
) -> tuple[TokenSet | None, TokenSet]:
    """Calibration and evaluation windows; refuses the same text for both unless ``split`` is given.

    ``eval_tokens=None`` takes every whole window of the evaluation text. With ``split`` and the same
    text on both sides, the first ``split`` of its tokens calibrates and the rest evaluates. Model
    samples use seed 0 for calibration and ``eval_seed`` for evaluation.
    """
    if eval_tokens is not None and eval_tokens < seqlen:
        raise AqError(f"eval-tokens ({eval_tokens}) must be at least one window of seqlen {seqlen}")
    if eval_tokens is None and evaluation is None:
        raise AqError("evaluating on all tokens needs evaluation data (a file or a dataset)")
    if split is not None and not 0 < split < 1:
        raise AqError(f"split must be between 0 and 1, got {split}")
    same = source_identity(calib, 0) == source_identity(evaluation, eval_seed)
    if same and split is None:
        raise AqError("calibration and evaluation data are the same text; pass a split to divide it")
    e_ids, e_desc = source_ids(evaluation, loaded, (eval_tokens or 0) // seqlen * seqlen, seqlen, seed=eval_seed)
    if same:
        cut = int(e_ids.numel() * split)
        c_ids, e_ids = e_ids[:cut], e_ids[cut:]
        c_desc, e_desc = f"{e_desc}[:{split:g}]", f"{e_desc}[{split:g}:]"
    elif calib_windows > 0:
        c_ids, c_desc = source_ids(calib, loaded, calib_windows * calib_seqlen, calib_seqlen, seed=0)
    n_eval = (eval_tokens if eval_tokens is not None else e_ids.numel()) // seqlen
    ev = TokenSet.from_ids(e_ids, seqlen, n_eval, e_desc)
    if calib_windows <= 0:
        return None, ev
    return TokenSet.from_ids(c_ids, calib_seqlen, calib_windows, c_desc, spread=True), ev
