"""Turn a plan into a real low-bit model: pack, swap in ``QuantLinear``, save, load, generate.

A saved model is a folder (written atomically) holding ``model.safetensors`` (packed ``qweight``,
fp16 ``scales`` and packed integer (or fp16, ``f`` schemes) ``zeros`` for each quantized decoder Linear; every other tensor in fp16, tied
tensors once), ``plan.json`` (the plan resolved to exact layer names), ``aqsearch.json`` (format,
per-layer shapes and schemes, byte counts), the model's ``config.json`` and its tokenizer. The bytes
of the decoder Linears' tensors in ``model.safetensors`` equal ``plan_bytes(model, plan).bytes``.

>>> import torch, tempfile, warnings
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> warnings.simplefilter("ignore")
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> expected = plan_bytes(m, Plan.uniform("w4g32")).bytes
>>> _ = materialize(m, Plan.uniform("w4g32"), dtype=torch.float32)
>>> d = tempfile.mkdtemp()
>>> save(m, Plan.uniform("w4g32"), d + "/tiny")["bytes"] == expected == quantized_bytes_on_disk(d + "/tiny")
True
>>> m2, _ = load(d + "/tiny")
>>> type(m2.model.layers[0].mlp.up_proj).__name__
'QuantLinear'
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import torch
from torch import nn

from aqsearch.config import Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.io import sha256_file, atomic_dir, write_json_atomic
from aqsearch.memory import plan_bytes
from aqsearch.models import BLOCK_LINEARS, FUSED, LayerInfo, decoder_blocks, decoder_layers, layer_name
from aqsearch.quantlinear import QuantLinear

FORMAT = "aqsearch-packed"
FORMAT_VERSION = 2
# Version 1 stored every asymmetric zero as fp16 (integer values): it loads, its zeros packed on the way in.
READABLE_VERSIONS = (1, 2)
_PACKED = ("qweight", "scales", "zeros")


def _log(msg: str) -> None:
    print(f"aqsearch: {msg}", file=sys.stderr, flush=True)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def materialize(model: nn.Module, plan: Plan, dtype: torch.dtype = torch.float16,
                qtensors: dict | None = None) -> dict[str, QuantScheme | None]:
    """Replace each governed ``nn.Linear`` (the decoder Linears) that ``plan`` quantizes by a
    ``QuantLinear``: from ``qtensors[name]`` (trained codes, scales and zeros) where given with the
    plan's scheme, else round-to-nearest with the reference quantizer from the current weights in
    fp32. Then cast the rest of the model to ``dtype``. In place; returns the resolved plan."""
    from aqsearch.apply import check_governed

    check_governed(plan, (l.name for l in decoder_layers(model)))
    resolved: dict[str, QuantScheme | None] = {}
    qtensors = qtensors or {}
    with torch.no_grad():
        for layer in decoder_layers(model):
            scheme = plan.scheme_for(layer.name)
            resolved[layer.name] = scheme
            if scheme is None:
                continue
            lin = model.get_submodule(layer.name)
            qt = qtensors.get(layer.name)
            if qt is not None and qt.scheme == scheme:
                q = QuantLinear.from_qtensor(qt, None if lin.bias is None else lin.bias.detach(), dtype)
            else:
                q = QuantLinear.from_linear(lin, scheme, dtype)
            _set_module(model, layer.name, q.to(lin.weight.device))
    model.to(dtype)
    return resolved


def layer_infos(model: nn.Module) -> list[LayerInfo]:
    """``decoder_layers`` that also accepts materialized blocks (``QuantLinear`` in place of ``nn.Linear``)."""
    out = []
    for i, block in enumerate(decoder_blocks(model)):
        for suffix in BLOCK_LINEARS:
            mod = block.get_submodule(suffix)
            if not isinstance(mod, (nn.Linear, QuantLinear)):
                raise AqError(f"block {i} has no Linear '{suffix}': not a Llama-family decoder")
            out.append(LayerInfo(layer_name(i, suffix), i, suffix, FUSED[suffix], mod.out_features,
                                 mod.in_features))
    return out


def _governed_keys(layers: dict) -> set[str]:
    keys = set()
    for name, info in layers.items():
        keys.update(f"{name}.{t}" for t in (_PACKED if info["scheme"] else ("weight",)))
    return keys


def _resolved_layers(model: nn.Module, plan: Plan) -> dict[str, dict]:
    out = {}
    for layer in layer_infos(model):
        mod = model.get_submodule(layer.name)
        scheme = plan.scheme_for(layer.name)
        if (scheme is None) != (not isinstance(mod, QuantLinear)) or (scheme and mod.scheme != scheme):
            raise AqError(f"model does not match the plan at {layer.name}: materialize it with this plan first")
        out[layer.name] = {"scheme": None if scheme is None else str(scheme), "in_features": layer.in_features,
                           "out_features": layer.out_features, "bias": mod.bias is not None}
    return out


def save(model: nn.Module, plan: Plan, out_dir: str | Path, tokenizer=None, source: str | None = None) -> dict:
    """Write a materialized model to ``out_dir`` (atomically: all or nothing). Returns aqsearch.json."""
    from safetensors.torch import save_file

    layers = _resolved_layers(model, plan)
    report = plan_bytes(model, plan, layers=layer_infos(model))
    state, tied, seen = {}, {}, {}
    for key, t in model.state_dict(keep_vars=False).items():
        ptr = (t.device, t.data_ptr(), t.shape, t.stride())
        if ptr in seen:  # tied (the LM head and the embeddings): stored once
            tied[key] = seen[ptr]
            continue
        seen[ptr] = key
        if t.is_floating_point():
            t = t.to(torch.float16)
        state[key] = t.detach().to("cpu").contiguous()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "source": source, "dtype": "float16", "layers": layers,
            "tied": tied, **report.to_json()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        meta["sha256"] = sha256_file(tmp / "model.safetensors")  # checked by load(): a damaged folder is refused
        Plan.from_layers({n: info["scheme"] for n, info in layers.items()}).save(str(tmp / "plan.json"))
        write_json_atomic(tmp / "aqsearch.json", meta)
        config = getattr(model, "config", None)
        if config is not None:
            config.dtype = torch.float16
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    got = quantized_bytes_on_disk(out_dir)
    if got != report.bytes:  # the promise of this format: the disk agrees with the byte accounting
        raise AqError(f"saved {got} bytes of decoder Linear tensors, but plan_bytes says {report.bytes}")
    return meta


def quantized_bytes_on_disk(folder: str | Path) -> int:
    """Bytes of the governed layers' tensors in ``model.safetensors`` (read from its header)."""
    folder = Path(folder)
    layers = json.loads((folder / "aqsearch.json").read_text())["layers"]
    with open(folder / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    keys = _governed_keys(layers)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k in keys)


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "aqsearch.json").read_text())
    except FileNotFoundError:
        raise AqError(f"not a materialized model folder (no aqsearch.json): {folder}") from None
    except json.JSONDecodeError as e:
        raise AqError(f"{folder / 'aqsearch.json'} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise AqError(f"{folder}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def load(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a saved model and its tokenizer (``None`` if none was saved): ``(model, tokenizer)``.

    ``dtype`` is the compute dtype; default fp16 on CUDA and fp32 on the CPU (CPU half-precision
    matmuls are very slow). The stored tensors are fp16 either way.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = _read_meta(folder)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    config = AutoConfig.from_pretrained(folder)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, info in meta["layers"].items():
        if info["scheme"] is not None:
            q = QuantLinear(info["in_features"], info["out_features"], QuantScheme.parse(info["scheme"]),
                            bias=info["bias"], dtype=dtype)
            _set_module(model, name, q)
    if meta.get("sha256") is not None and sha256_file(folder / "model.safetensors") != meta["sha256"]:
        raise AqError(f"{folder}: model.safetensors does not match the sha256 in aqsearch.json (damaged or replaced)")
    state = _load_state(folder / "model.safetensors")
    if meta["version"] == 1:  # fp16 zeros of integer value -> the packed integer layout
        from aqsearch.kernels import pack_zeros

        for name, info in meta["layers"].items():
            scheme = info["scheme"] and QuantScheme.parse(info["scheme"])
            if scheme and scheme.zero_format == "int" and f"{name}.zeros" in state:
                state[f"{name}.zeros"] = pack_zeros(state[f"{name}.zeros"].float(), scheme.bits)
    for k, t in state.items():
        if t.is_floating_point() and k.rsplit(".", 1)[-1] not in ("scales", "zeros"):
            state[k] = t.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in meta["tied"]]
    if missing or unexpected:
        raise AqError(f"{folder}: checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for dst, src in meta["tied"].items():
        mod_name, _, attr = dst.rpartition(".")
        src_mod, _, src_attr = src.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_mod), src_attr))
    model.to(device).eval()
    model.requires_grad_(False)
    tok = None
    if (folder / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AqError(f"{path} not found: materialize the model again")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise AqError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from None


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> dict:
    """Greedy decoding: ``{"text", "tokens" (new ids), "seconds", "prompt_tokens", "tokens_per_second"}``."""
    dev = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    if ids.shape[1] == 0:
        raise AqError(f"the prompt {prompt!r} has no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    cfg = getattr(model, "generation_config", None)
    if cfg is not None:  # greedy: clear sampling knobs a model's generation_config may carry
        cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k = False, None, None, None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new, "seconds": round(seconds, 4),
            "prompt_tokens": int(ids.shape[1]), "tokens_per_second": round(len(new) / max(seconds, 1e-9), 2)}
