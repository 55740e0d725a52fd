"""Independent readers of exported folders, shared by tests/test_export.py and benchmarks/export_check.py.

- :func:`gptq_reference_load`: GPTQ's classic torch dequantization (AutoGPTQ's ``QuantLinear``, vLLM's old torch
  path: per-word shift tables, the 3-bit three-word scheme, ``zeros + 1`` for v1) with vLLM's ``dynamic``
  matching (``re.match``, ``-:`` skips, first match wins). Written from those projects' code, not from
  ``aqsearch.export``: GPTQ's own loader (gptqmodel 7.x) does not import on a CPU-only torch 2.13.
- :func:`ct_reference_load`: compressed-tensors' own ``PackedQuantizationCompressor.decompress``, per config group.
"""

import json
import re

import torch
from safetensors import safe_open

def gptq_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [words, C] -> values [words * 32 / bits, C], as AutoGPTQ's torch QuantLinear unpacks."""
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32)
        v = torch.bitwise_right_shift(packed.unsqueeze(1).expand(-1, 32 // bits, -1), wf.view(1, -1, 1))
        return torch.bitwise_and(v, (1 << bits) - 1).reshape(-1, packed.shape[1])
    wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                       [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32).reshape(1, 3, 12, 1)
    w = packed.reshape(packed.shape[0] // 3, 3, 1, packed.shape[1]).expand(-1, -1, 12, -1)
    w = (w >> wf) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 0x7
    return torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1).reshape(-1, packed.shape[1])


def dynamic_override(cfg: dict, name: str):
    """vLLM's ``get_dynamic_override``: ``False`` (kept unquantized), an override dict, or ``None``."""
    for pat, over in (cfg.get("dynamic") or {}).items():
        if pat.startswith("-:"):
            if re.match(pat[2:], name):
                return False
        elif re.match(pat.removeprefix("+:"), name):
            return over
    return None


def gptq_reference_load(folder):
    """The model of a GPTQ folder, its quantized Linears dequantized the way GPTQ's torch path does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    plain = {k: v.float() for k, v in state.items() if not k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")}
    missing, _ = model.load_state_dict(plain, strict=False)
    offset = 0 if cfg["checkpoint_format"] == "gptq_v2" else 1
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        over = dynamic_override(cfg, name)
        assert over is not False, f"{name} is stored quantized but dynamic skips it"
        bits = (over or {}).get("bits", cfg["bits"])
        zeros = gptq_unpack(state[f"{name}.qzeros"].t().contiguous(), bits).t() + offset  # [G, N]
        codes = gptq_unpack(state[f"{name}.qweight"], bits)  # [K, N]
        g_idx = state[f"{name}.g_idx"].long()
        w = state[f"{name}.scales"].float()[g_idx] * (codes.float() - zeros.float()[g_idx])
        model.get_submodule(name).weight.data = w.t().contiguous()
        missing.remove(f"{name}.weight")
    assert missing == ["lm_head.weight"] or missing == [], missing  # tied to the embeddings
    model.tie_weights()
    return model



def ct_reference_load(folder):
    """The model of a compressed-tensors folder, each quantized Linear decompressed by compressed-tensors' own
    ``PackedQuantizationCompressor.decompress`` with its own config group's scheme."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k: v.float() for k, v in state.items() if "weight_" not in k}, strict=False)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for group in cfg.config_groups.values():
        for name in group.targets:
            sd = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
            model.get_submodule(name).weight.data = compressor.decompress(sd, group)["weight"].float()
    model.tie_weights()
    return model
