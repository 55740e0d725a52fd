"""Export a plan's weights as a Hugging Face model folder that other loaders read: GPTQ or compressed-tensors.

``export(model, plan, qtensors, out, fmt, tokenizer)`` writes, atomically, a folder holding ``config.json``
with its ``quantization_config``, ``model.safetensors`` (each quantized decoder Linear packed in the
format's own layout; every other tensor in fp16, as ``aqsearch materialize`` stores it, tied tensors
once), and the tokenizer. The codes, scales and zeros are aqsearch's own (trained where the artifact
has them, round-to-nearest elsewhere): only their packing changes.

Formats (each limit checked in the format's own reader; see the README's "Export" section):

- ``gptq`` (:mod:`aqsearch.export_gptq`): GPTQModel's layout, ``qweight`` int32 ``[K * b / 32, N]`` (a
  dense little-endian bit stream along K, 3 bits across word boundaries), ``qzeros`` int32
  ``[G, N * b / 32]`` (the same stream along N), ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]``;
  per-layer bits and group sizes in ``dynamic``. Bits 2/3/4/8, every group size, short last groups.
- ``compressed-tensors`` (:mod:`aqsearch.export_ct`): ``pack-quantized``, ``weight_packed`` int32
  ``[N, K * b / 32]``, ``weight_scale`` fp16 ``[N, G]``, ``weight_zero_point`` int32 ``[N * b / 32, G]``,
  ``weight_shape``; one config group a scheme. Groups must divide K.

A scheme a format cannot hold is refused (:class:`aqsearch.errors.AqError`, naming the scheme and the
layer), never rounded to another.

>>> import torch, tempfile, warnings
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> warnings.simplefilter("ignore")
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
>>> info = export(m, Plan.uniform("w4g32"), {}, tempfile.mkdtemp() + "/gptq", "gptq")
>>> info["quantization_config"]["bits"], info["layers_quantized"]
(4, 7)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.models import decoder_layers
from aqsearch.export_pack import integer_zeros, pack_stream, unpack_stream  # noqa: F401 (re-exported)
from aqsearch.quantizers import QTensor, quantize

FORMATS = ("gptq", "compressed-tensors")
# Import names of the packages each format's export needs (the extra aqsearch[export] installs them):
# compressed-tensors validates its config with the format's own schema and loads on the CPU. GPTQ is
# written without any; its loaders (optimum + gptqmodel: aqsearch[export-gptq]) do not import on a CPU-only
# torch 2.13 (see the README's "Export" section).
LOADERS = {"gptq": (), "compressed-tensors": ("compressed_tensors",)}
# Packed tensors that are not codes, scales or zeros: the format's bookkeeping, beyond aqsearch's bytes.
BOOKKEEPING = ("g_idx", "weight_shape")


def check_format(fmt: str) -> str:
    """The format's name, or an error naming the ones there are."""
    if fmt not in FORMATS:
        raise AqError(f"--format {fmt!r} is not a format aqsearch exports: use {' or '.join(FORMATS)}")
    return fmt


def check_loaders(fmt: str) -> None:
    """Refuse, in one line, to export a folder that this environment could not load (the extra is missing)."""
    import importlib

    missing = []
    for mod in LOADERS[check_format(fmt)]:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise AqError(f"export --format {fmt} needs {', '.join(missing)}: pip install 'aqsearch[export]'")


def layer_tensors(model: nn.Module, plan: Plan, qtensors: dict[str, QTensor]) -> dict[str, QTensor | None]:
    """Every decoder Linear: its trained tensors where the artifact has them at the plan's scheme, else
    round-to-nearest with the reference quantizer (as ``materialize`` does); ``None`` where the plan keeps
    the layer in full precision."""
    from aqsearch.apply import check_governed

    layers = decoder_layers(model)
    plan.check_names(l.name for l in layers)
    check_governed(plan, (l.name for l in layers))
    out: dict[str, QTensor | None] = {}
    for layer in layers:
        scheme = plan.scheme_for(layer.name)
        qt = qtensors.get(layer.name)
        if scheme is None:
            out[layer.name] = None
        elif qt is not None and qt.scheme == scheme:
            out[layer.name] = qt
        else:
            out[layer.name] = quantize(model.get_submodule(layer.name).weight.detach().float(), scheme)
    return out


def other_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Everything but the quantized Linears' weights, fp16 (floating point), tied tensors once."""
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.removesuffix(".weight") in quantized and key.endswith(".weight"):
            continue
        ptr = (t.data_ptr(), tuple(t.shape))
        if ptr in seen:  # tied (the LM head and the embeddings): the config's tie_word_embeddings restores it
            continue
        seen.add(ptr)
        state[key] = (t.to(torch.float16) if t.is_floating_point() else t).detach().cpu().contiguous()
    return state


def export(model: nn.Module, plan: Plan, qtensors: dict[str, QTensor], out: str | Path, fmt: str,
           tokenizer=None) -> dict:
    """Write ``model`` under ``plan`` as a ``fmt`` folder at ``out`` (atomically). Returns a summary:
    ``quantization_config``, ``bytes`` (the governed layers as written: codes, scales and zeros, and the
    fp16 weights of layers the plan keeps),
    ``bookkeeping_bytes`` (``g_idx``, ``weight_shape``), ``plan_bytes`` (aqsearch's count for the plan),
    ``layers_quantized``."""
    from safetensors.torch import save_file

    from aqsearch.io import atomic_dir
    from aqsearch.memory import plan_bytes

    check_format(fmt)
    tensors = layer_tensors(model, plan, qtensors)
    if fmt == "gptq":
        from aqsearch.export_gptq import pack_model
    else:
        from aqsearch.export_ct import pack_model
    packed, qconfig = pack_model(tensors)
    quantized = {n for n, q in tensors.items() if q is not None}
    state = {**other_tensors(model, quantized), **packed}
    config = model.config.to_dict()
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    config["quantization_config"] = qconfig
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if fmt == "gptq":  # vLLM and older GPTQ loaders read the quantization settings from this file too
            (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    nbytes = {k: t.numel() * t.element_size() for k, t in packed.items()}
    extra = sum(n for k, n in nbytes.items() if k.rsplit(".", 1)[-1] in BOOKKEEPING)
    kept = sum(state[f"{n}.weight"].numel() * 2 for n, q in tensors.items() if q is None)  # governed, fp16
    return {"out": str(out), "format": fmt, "quantization_config": qconfig, "bytes": sum(nbytes.values()) - extra + kept,
            "bookkeeping_bytes": extra, "plan_bytes": plan_bytes(model, plan).bytes,
            "layers_quantized": len(quantized), "layers": len(tensors)}
