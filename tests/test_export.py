"""``aqsearch export``: GPTQ (with ``dynamic``) and compressed-tensors ``pack-quantized`` folders.

The references are independent of aqsearch's packing: compressed-tensors folders are loaded by
transformers' own ``from_pretrained`` with the compressed-tensors package, or decompressed by that
package's own compressor; GPTQ folders (whose loader, gptqmodel 7.x, does not import on this CPU-only
torch: README "Export") are read the way GPTQ's classic torch path reads them (``export_readers``). The
oracle is aqsearch's own dequantized model (``aqsearch.apply.quantized`` with the artifact's weights).
"""

import json
import os

import pytest
import torch
from safetensors import safe_open

from aqsearch.apply import quantized
from aqsearch.artifact import Artifact
from aqsearch.cli import main
from aqsearch.config import Plan
from aqsearch.errors import AqError
from aqsearch.export import export, pack_stream, unpack_stream
from aqsearch.materialize import generate, load as load_materialized
from aqsearch.memory import plan_bytes
from aqsearch.quantizers import quantize
from aqsearch.weights import trained_weight_fn
from export_readers import dynamic_override, gptq_unpack, ct_reference_load, gptq_reference_load
from tinymodels import tiny_model, tiny_tokenizer

# Three+ schemes, per layer; down_proj (K = 160) at g64 leaves a short last group of 32 (GPTQ only).
GPTQ_PLAN = {"_default": "w4g32", "re:.*down_proj": "w3g64", "re:.*up_proj": "w2g32", "re:.*v_proj": "w8g128",
             "re:.*k_proj": "w4g32s", "model.layers.1.self_attn.o_proj": None}
# compressed-tensors needs groups that divide K (64 and 160 here). transformers 5.25 loads a mixed plan only
# when it is symmetric (README "Export"); the asymmetric mixed plan is read by the format's own decompressor.
CT_PLAN = {"_default": "w4g32", "re:.*down_proj": "w3g32", "re:.*up_proj": "w2g32", "re:.*v_proj": "w8g64",
           "re:.*k_proj": "w4g32s", "model.layers.1.self_attn.o_proj": None}
CT_SYM_PLAN = {"_default": "w4g32s", "re:.*down_proj": "w3g32s", "re:.*up_proj": "w2g32s", "re:.*v_proj": "w8g64s",
               "model.layers.1.self_attn.o_proj": None}
PROMPTS = ("The quick brown fox", "Quantization stores weights", "Memory budgets decide")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama whose weights are fp16 values (the export stores unquantized tensors in fp16), saved."""
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_model()
    m.half().float()
    m.save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    return d / "model"


def _artifact(folder, plan_layers, path):
    """An artifact with trained-looking weights: codes shifted by random rounding offsets on some layers."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plan = Plan.from_json({"version": 2, "layers": plan_layers})
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"):
        w = m.get_submodule(name).weight
        tensors[name] = quantize(w, plan.scheme_for(name), v=torch.rand(w.shape, generator=g) - 0.5)
    Artifact(plan, tensors, {"bytes": plan_bytes(m, plan).bytes}).save(path)
    return m.eval(), plan, tensors


def _oracle_logits(m, plan, tensors, ids):
    with torch.no_grad(), quantized(m, plan, weight_fn=trained_weight_fn(tensors)):
        return m(ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _export_cli(art, folder, fmt, out, *extra):
    return main(["export", str(art), "--format", fmt, "--out", str(out), "--model", str(folder), "--device", "cpu",
                 *extra])


# ---- the packing primitive ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_stream_is_gptqs_bit_stream(bits):
    """GPTQ's own unpacking (shift tables, 3-bit three-word scheme) reads what pack_stream writes.
    Catches: 3-bit codes packed as aqsearch's two planes, or values at the wrong bit offset."""
    v = torch.randint(0, 1 << bits, (96, 5))
    p = pack_stream(v, bits)
    assert p.dtype == torch.int32 and p.shape == (96 * bits // 32, 5)
    assert torch.equal(gptq_unpack(p, bits).long(), v)
    assert torch.equal(unpack_stream(p, bits, 96), v)


# ---- GPTQ ---------------------------------------------------------------------------------------------


def test_gptq_mixed_plan_matches_aqsearch(tiny_folder, tmp_path):
    """Six schemes (2/3/4/8 bits, symmetric, a short last group, one layer kept in fp16) exported from an
    artifact with trained codes: GPTQ's reading gives aqsearch's logits (64 tokens, rel. error <= 1e-3).
    Catches: zeros stored as z instead of z - 1 in v1 (and the reverse), codes packed in aqsearch's 3-bit
    planes, a dynamic pattern that misses a layer, trained tensors ignored."""
    art = tmp_path / "plan.json"
    m, plan, tensors = _artifact(tiny_folder, GPTQ_PLAN, art)
    out = tmp_path / "gptq"
    assert _export_cli(art, tiny_folder, "gptq", out) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["desc_act"] is False
    assert json.loads((out / "quantize_config.json").read_text()) == cfg
    assert (out / "tokenizer.json").exists()
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    got = gptq_reference_load(out)(ids).logits
    assert _rel(got, _oracle_logits(m, plan, tensors, ids)) <= 1e-3
    # the trained tensors, not round-to-nearest, were exported
    assert _rel(got, _oracle_logits(m, plan, {}, ids)) > 1e-3


def test_gptq_v2_when_a_zero_is_0(tiny_folder, tmp_path):
    """A group whose zero is 0 cannot be stored as v1's zero - 1: the checkpoint is written as gptq_v2 (zeros
    as they are) and still reads exactly. Catches: a -1 wrapped into 2^b - 1 (v1 readers carry into the
    next zero), or v2 zeros still stored minus one."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    with torch.no_grad():  # non-negative weights: every zero is 0
        m.model.layers[0].mlp.gate_proj.weight.abs_()
    plan = Plan.uniform("w4g32")
    info = export(m, plan, {}, tmp_path / "g", "gptq")
    assert info["quantization_config"]["checkpoint_format"] == "gptq_v2"
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    assert _rel(gptq_reference_load(tmp_path / "g")(ids).logits, _oracle_logits(m, plan, {}, ids)) <= 1e-3


def test_gptq_dynamic_patterns_match_vllm_fused_names(tiny_folder, tmp_path):
    """Each override also names vLLM's fused module (qkv_proj, gate_up_proj), and a kept layer is a ``-:``
    skip. Catches: patterns that only match the unfused names (vLLM would use the base scheme)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    plan = Plan.from_json({"version": 2, "layers": {"_default": "w4g32", "re:model.layers.1.self_attn.[qkv]_proj": "w8g32",
                                                    "model.layers.0.mlp.down_proj": None}})
    cfg = export(m, plan, {}, tmp_path / "g", "gptq")["quantization_config"]
    assert dynamic_override(cfg, "model.layers.1.self_attn.qkv_proj") == {"bits": 8, "group_size": 32, "sym": False}
    assert dynamic_override(cfg, "model.layers.0.self_attn.qkv_proj") is None
    assert dynamic_override(cfg, "model.layers.0.mlp.down_proj") is False
    assert dynamic_override(cfg, "model.layers.10.mlp.down_proj") is None


# ---- compressed-tensors -------------------------------------------------------------------------------


def _ct_load(folder, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu", **kw).eval()


def test_compressed_tensors_mixed_plan(tiny_folder, tmp_path):
    """Five schemes (2/3/4/8 bits, one symmetric, one layer kept) from an artifact with trained codes, read by
    compressed-tensors' own decompressor per config group: aqsearch's logits on 64 tokens within 1e-3 (it
    dequantizes in fp16). Catches: zero points off by one (the format's 2^(b-1) offset applied twice or
    not at all), 3-bit codes in aqsearch's two planes, zeros packed along the wrong axis."""
    art = tmp_path / "plan.json"
    m, plan, tensors = _artifact(tiny_folder, CT_PLAN, art)
    out = tmp_path / "ct"
    assert _export_cli(art, tiny_folder, "compressed-tensors", out) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and len(cfg["config_groups"]) == 5
    assert (out / "tokenizer.json").exists()
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(ct_reference_load(out)(ids).logits, _oracle_logits(m, plan, tensors, ids)) <= 1e-3


def test_compressed_tensors_loads_in_transformers(tiny_folder, tmp_path):
    """transformers' from_pretrained with compressed-tensors on the CPU: a mixed symmetric plan (four schemes,
    2/3/4/8 bits, one layer kept) on its default route, and a uniform asymmetric plan with ``dequantize=True``;
    aqsearch's logits within 1e-3 on 64 tokens. Catches: the symmetric offset off by one, zeros off by one,
    a config group naming the wrong layers."""
    m, plan, tensors = _artifact(tiny_folder, CT_SYM_PLAN, tmp_path / "plan.json")
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    export(m, plan, tensors, tmp_path / "sym", "compressed-tensors")
    with torch.no_grad():
        assert _rel(_ct_load(tmp_path / "sym")(ids).logits, _oracle_logits(m, plan, tensors, ids)) <= 1e-3
    uni = Plan.uniform("w3g32")
    export(m, uni, {}, tmp_path / "asym", "compressed-tensors")
    with torch.no_grad():
        assert _rel(_ct_load(tmp_path / "asym", True)(ids).logits, _oracle_logits(m, uni, {}, ids)) <= 1e-3


# ---- greedy text against aqsearch generate ------------------------------------------------------------


def test_greedy_tokens_match_aqsearch_generate(tiny_folder, tmp_path):
    """From three prompts, the exported pick (compressed-tensors in transformers; GPTQ as GPTQ reads it) gives
    the greedy tokens that ``aqsearch generate`` gives on the same artifact materialized. Catches: any
    export that changes what the model predicts (wrong zeros, planes, dropped trained weights)."""
    art = tmp_path / "plan.json"
    _artifact(tiny_folder, CT_SYM_PLAN, art)
    assert main(["materialize", "--plan", str(art), "--model", str(tiny_folder), "--out", str(tmp_path / "mat"),
                 "--device", "cpu"]) == 0
    mat, tok = load_materialized(tmp_path / "mat")
    for fmt in ("compressed-tensors", "gptq"):
        assert _export_cli(art, tiny_folder, fmt, tmp_path / fmt) == 0
    models = {"compressed-tensors": _ct_load(tmp_path / "compressed-tensors"),
              "gptq": gptq_reference_load(tmp_path / "gptq")}
    for prompt in PROMPTS:
        want = generate(mat, tok, prompt, 12)["tokens"]
        for fmt, lm in models.items():
            assert generate(lm, tok, prompt, 12)["tokens"] == want, (fmt, prompt)


# ---- bytes --------------------------------------------------------------------------------------------


def test_exported_bytes_equal_the_plans(tiny_folder, tmp_path):
    """Codes, scales and zeros as written equal aqsearch's byte count for integer-zero asymmetric plans;
    the differences are exactly those the README states: GPTQ's g_idx (4 bytes an input) and stored zeros
    of symmetric schemes, compressed-tensors' weight_shape (16 bytes a layer), and b-bit zeros for ``f``
    schemes. Catches: a padded or duplicated tensor, a layer missing from the folder."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    plan = Plan.from_json({"version": 2, "layers": {"_default": "w4g32", "re:.*down_proj": "w3g32", "re:.*up_proj": "w2g32",
                                                    "model.layers.1.self_attn.o_proj": None}})
    n_q = 13
    for fmt, per_layer in (("gptq", None), ("compressed-tensors", 16)):
        info = export(m, plan, {}, tmp_path / fmt, fmt)
        assert info["bytes"] == info["plan_bytes"] == plan_bytes(m, plan).bytes
        with safe_open(str(tmp_path / fmt / "model.safetensors"), "pt") as f:
            on_disk = {k: f.get_tensor(k) for k in f.keys()}
        quant = [k for k in on_disk if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "weight_packed",
                                                                 "weight_scale", "weight_zero_point")]
        kept = on_disk["model.layers.1.self_attn.o_proj.weight"]  # the governed layer the plan keeps, fp16
        assert kept.dtype == torch.float16
        assert sum(on_disk[k].numel() * on_disk[k].element_size() for k in quant) + kept.numel() * 2 == info["bytes"]
        k_total = sum(l.in_features for l in __import__("aqsearch.models").models.decoder_layers(m)
                      if plan.scheme_for(l.name) is not None)
        assert info["bookkeeping_bytes"] == (4 * k_total if fmt == "gptq" else per_layer * n_q)
    sym = Plan.uniform("w4g32s")
    zeros = sum(l.out_features * 4 // 8 * (l.in_features // 32)
                for l in __import__("aqsearch.models").models.decoder_layers(m))
    assert export(m, sym, {}, tmp_path / "gs", "gptq")["bytes"] == plan_bytes(m, sym).bytes + zeros
    assert export(m, sym, {}, tmp_path / "cs", "compressed-tensors")["bytes"] == plan_bytes(m, sym).bytes
    fz = Plan.uniform("w4g32f")
    assert export(m, fz, {}, tmp_path / "cf", "compressed-tensors")["bytes"] == plan_bytes(m, Plan.uniform("w4g32")).bytes


# ---- bad input ----------------------------------------------------------------------------------------


def _one_line_exit_2(capsys, argv, says):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err


def _nothing_written(parent, before):
    assert sorted(os.listdir(parent)) == before  # no folder, no temporary left beside it


def test_scheme_a_format_cannot_hold_is_refused(tiny_folder, tmp_path, capsys):
    """A short last group (down_proj: 160 inputs at g64) for compressed-tensors is refused in one line naming
    the scheme and the layer, and nothing is written. Catches: a short group silently padded or regrouped."""
    art = tmp_path / "plan.json"
    _artifact(tiny_folder, {"_default": "w4g32", "model.layers.0.mlp.down_proj": "w4g64"}, art)
    before = sorted(os.listdir(tmp_path))
    _one_line_exit_2(capsys, ["export", str(art), "--format", "compressed-tensors", "--out", str(tmp_path / "out"),
                              "--model", str(tiny_folder)], "layer model.layers.0.mlp.down_proj (w4g64)")
    _nothing_written(tmp_path, before)


def test_gptq_refuses_a_layer_it_cannot_pack(tmp_path):
    """GPTQ packs in blocks of 32 along K and N: a 48-wide layer is refused by name. Catches: a ragged last
    word written that GPTQ's 3-bit reader would misalign."""
    m = tiny_model(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(AqError, match=r"layer model\.layers\.0\.self_attn\.q_proj \(w4g32\).*48 x 48"):
        export(m, Plan.uniform("w4g32"), {}, tmp_path / "g", "gptq")
    assert not (tmp_path / "g").exists()


def test_bad_input_one_line_exit_2_nothing_written(tiny_folder, tmp_path, capsys):
    """Unknown format; weights file missing; weights file not matching its hash; an existing non-empty --out
    without --force: one line, exit 2, nothing written. Catches: a skipped hash check, a half-written folder."""
    art = tmp_path / "a" / "plan.json"
    art.parent.mkdir()
    _artifact(tiny_folder, CT_PLAN, art)
    out = tmp_path / "o" / "x"
    out.parent.mkdir()
    base = ["export", str(art), "--out", str(out), "--model", str(tiny_folder), "--format"]
    _one_line_exit_2(capsys, base + ["onnx"], "--format 'onnx' is not a format aqsearch exports")
    wfile = art.with_suffix(".weights.safetensors")
    good = wfile.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 1
    wfile.write_bytes(bytes(bad))
    _one_line_exit_2(capsys, base + ["gptq"], "does not match the sha256")
    wfile.unlink()
    _one_line_exit_2(capsys, base + ["gptq"], "weights file not found")
    _nothing_written(out.parent, [])
    wfile.write_bytes(good)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_exit_2(capsys, base + ["gptq"], "exists and is not empty (use --force")
    assert sorted(os.listdir(out)) == ["keep.txt"] and sorted(os.listdir(out.parent)) == ["x"]
    assert _export_cli(art, tiny_folder, "gptq", out, "--force") == 0 and not (out / "keep.txt").exists()



def test_artifact_of_another_model_is_refused(tiny_folder, tmp_path, capsys):
    """An artifact exported with ``--model`` of the same layer names but other shapes: one line, exit 2,
    nothing written (it used to write a folder of the first model's codes in the second one's shell)."""
    art = tmp_path / "a" / "plan.json"
    art.parent.mkdir()
    _artifact(tiny_folder, GPTQ_PLAN, art)
    other = tmp_path / "other"
    tiny_model(hidden_size=96, intermediate_size=192).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    out = tmp_path / "o" / "x"
    _one_line_exit_2(capsys, ["export", str(art), "--format", "gptq", "--out", str(out), "--model", str(other)],
                     "made for another model")
    assert not out.exists()


def test_missing_extra_says_which(tiny_folder, tmp_path, capsys, monkeypatch):
    """Without compressed-tensors the command names the extra in one line, exit 2, before any work.
    (The package is hidden from the import system: ``sys.modules[name] = None`` makes importing it fail.)"""
    import sys

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    art = tmp_path / "plan.json"
    _artifact(tiny_folder, CT_PLAN, art)
    _one_line_exit_2(capsys, ["export", str(art), "--format", "compressed-tensors", "--out", str(tmp_path / "o"),
                              "--model", str(tiny_folder)], "pip install 'aqsearch[export]'")
    assert not (tmp_path / "o").exists()


# ---- the real model -----------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_export_loads_in_transformers_with_eval_kl(tmp_path):
    """SmolLM2 at uniform w4g64 exported as compressed-tensors, loaded by transformers' from_pretrained on the
    CPU: its held-out KL equals ``evaluate`` (what ``aqsearch eval --scheme`` reports) to 3 significant
    digits, and its bytes are the plan's. Catches: anything the tiny model's shapes hide (576-wide rows,
    tied 49,152-token embeddings)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from aqsearch.data import calib_eval_sets
    from aqsearch.quality import build_reference, evaluate, summarize, token_stats
    from tinymodels import WIKI_TEST, WIKI_VALID, load_smollm2

    smol = load_smollm2()
    wiki = WIKI_TEST.exists()
    _, ev = calib_eval_sets(smol, str(WIKI_VALID) if wiki else None, str(WIKI_TEST) if wiki else None,
                            eval_tokens=256, seqlen=256)
    ref = build_reference(smol.model, ev)
    plan = Plan.uniform("w4g64")
    info = export(smol.model, plan, {}, tmp_path / "ct", "compressed-tensors", smol.tokenizer)
    assert info["bytes"] == info["plan_bytes"] == 57_231_360
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    got = summarize(token_stats(lm, ref), ref, 0, 0, 0.0, 0.0).kl_mean
    want = evaluate(smol.model, ref, plan).kl_mean
    assert abs(got - want) <= 5e-4 * want, (got, want)
