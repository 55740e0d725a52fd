"""materialize / save / load / generate and the two CLI commands, on a tiny random Llama (CPU) and on
the real SmolLM2 (CPU, the reference backend)."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aqsearch.apply import quantized
from aqsearch.cli import main
from aqsearch.config import Plan, QuantScheme
from aqsearch.errors import AqError
from aqsearch.materialize import generate, load, materialize, quantized_bytes_on_disk, save
from aqsearch.memory import plan_bytes
from aqsearch.quantlinear import QuantLinear

pytestmark = pytest.mark.filterwarnings("ignore:aqsearch.kernels")  # the CPU reference says it is slow

# hidden 96 and intermediate 200: short last groups at g64/g128 (96) and g32 (200)
PLAN = Plan.from_layers({
    "_default": "w4g64",
    "re:.*mlp\\.down_proj": "w3g32",
    "re:.*self_attn\\.k_proj": "w8g128",
    "re:.*self_attn\\.v_proj": "w3g64f",
    "model.layers.0.self_attn.q_proj": None,
    "model.layers.1.mlp.up_proj": "w2g32s",
})


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    m.requires_grad_(False)
    return m.half().float()  # fp16-representable weights: the fp16 checkpoint then stores them exactly


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t2")


def ids(n=12, seed=1):
    return torch.randint(3, 300, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_materialized_model_computes_the_fake_quantized_logits():
    m = tiny()
    x = ids()
    with quantized(m, PLAN):
        ref = m(x).logits
    resolved = materialize(m, PLAN, dtype=torch.float32)
    assert resolved["model.layers.0.self_attn.q_proj"] is None
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    assert m.model.layers[1].mlp.up_proj.scheme == QuantScheme.parse("w2g32s")
    assert m.model.layers[1].mlp.up_proj.zeros is None  # symmetric: no zeros stored
    assert sum(isinstance(mod, QuantLinear) for mod in m.modules()) == 13
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_trained_tensors_are_materialized_as_given():
    """Codes from block training (learned rounding offsets and clips) reach the packed model unchanged."""
    from aqsearch.models import decoder_layers
    from aqsearch.quantizers import quantize
    from aqsearch.weights import trained_weight_fn

    m = tiny()
    x = ids()
    gen = torch.Generator().manual_seed(3)
    trained = {}
    for l in decoder_layers(m):
        s = PLAN.scheme_for(l.name)
        if s is not None:
            w = m.get_submodule(l.name).weight
            v = (torch.rand(w.shape, generator=gen) - 0.5) * 0.8  # offsets that move many codes
            trained[l.name] = quantize(w, s, v=v)
    with quantized(m, PLAN, weight_fn=trained_weight_fn(trained)):
        ref = m(x).logits
    with quantized(m, PLAN):
        rtn = m(x).logits
    materialize(m, PLAN, dtype=torch.float32, qtensors=trained)
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert (m(x).logits - rtn).abs().max() > 1e-3  # the trained codes differ from round-to-nearest


@torch.no_grad()
def test_save_load_round_trip_and_bytes_on_disk(tmp_path):
    m = tiny()
    expected = plan_bytes(m, PLAN)
    materialize(m, PLAN, dtype=torch.float32)
    x = ids()
    logits = m(x).logits
    meta = save(m, PLAN, tmp_path / "q", tokenizer=tokenizer(), source="tiny")
    folder = tmp_path / "q"
    assert {"model.safetensors", "plan.json", "aqsearch.json", "config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()}
    assert quantized_bytes_on_disk(folder) == expected.bytes == meta["bytes"]
    assert meta["bytes_total"] == expected.bytes_total
    assert Plan.load(str(folder / "plan.json")).resolve(meta["layers"]) == PLAN.resolve(meta["layers"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # unquantized tensors in fp16
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.qweight"] == "I32"
    assert dtypes["model.layers.0.mlp.up_proj.zeros"] == "I32"  # integer zeros, packed
    assert dtypes["model.layers.0.self_attn.v_proj.zeros"] == "F16"  # w3g64f: fp16 zeros
    assert "model.layers.1.mlp.up_proj.zeros" not in dtypes  # symmetric: none
    assert {d for k, d in dtypes.items() if not k.endswith(("qweight", "zeros"))} == {"F16"}
    assert "lm_head.weight" not in dtypes  # tied to the embeddings: stored once
    m2, tok = load(folder)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert tok is not None and next(m2.parameters()).dtype == torch.float32
    q1, q2 = m.model.layers[1].mlp.down_proj, m2.model.layers[1].mlp.down_proj
    assert torch.equal(q1.qweight, q2.qweight) and torch.equal(q1.scales, q2.scales)
    torch.testing.assert_close(m2(x).logits, logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_version_1_checkpoint_with_fp16_zeros_still_loads(tmp_path):
    """Checkpoints written before the packed layout stored integer-valued zeros as fp16 (G, N)."""
    import json

    from safetensors.torch import load_file, save_file

    from aqsearch.kernels import unpack_zeros

    m = tiny()
    materialize(m, PLAN, dtype=torch.float32)
    save(m, PLAN, tmp_path / "q", tokenizer=tokenizer())
    x = ids()
    logits = m(x).logits
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    meta = json.loads((tmp_path / "q" / "aqsearch.json").read_text())
    for name, info in meta["layers"].items():  # rewrite as version 1: fp16 zeros (G, N)
        s = info["scheme"] and QuantScheme.parse(info["scheme"])
        if s and s.zero_format == "int":
            state[f"{name}.zeros"] = unpack_zeros(state[f"{name}.zeros"], s.bits, info["out_features"]).half().contiguous()
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    meta["version"] = 1
    meta.pop("sha256")  # version-1 folders were written before the checksum
    (tmp_path / "q" / "aqsearch.json").write_text(json.dumps(meta))
    m2, _ = load(tmp_path / "q")
    assert m2.model.layers[0].mlp.up_proj.zeros.dtype == torch.int32
    torch.testing.assert_close(m2(x).logits, logits, rtol=1e-5, atol=1e-5)


def test_save_refuses_a_model_that_does_not_match_the_plan(tmp_path):
    m = tiny()
    materialize(m, PLAN, dtype=torch.float32)
    with pytest.raises(AqError, match="does not match the plan"):
        save(m, Plan.uniform("w4g128"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_load_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(AqError, match="not a materialized model folder"):
        load(tmp_path)


@torch.no_grad()
def test_generate_is_greedy(tmp_path):
    m = tiny()
    materialize(m, PLAN, dtype=torch.float32)
    tok = tokenizer()
    res = generate(m, tok, "t5 t6 t7 t8", max_new_tokens=6)
    assert set(res) >= {"text", "tokens", "seconds", "prompt_tokens", "tokens_per_second"}
    assert 1 <= len(res["tokens"]) <= 6 and res["prompt_tokens"] == 4
    seq = torch.tensor([[5, 6, 7, 8] + res["tokens"]])
    argmax = m(seq).logits[0, 3:-1].argmax(-1).tolist()  # teacher forcing: each token is the argmax
    assert argmax == res["tokens"][: len(argmax)]


def test_cli_materialize_and_generate(tmp_path, capsys):
    src = tmp_path / "hf"
    m = tiny()
    m.save_pretrained(src)
    tokenizer().save_pretrained(src)
    PLAN.save(str(tmp_path / "plan.json"))
    out = tmp_path / "out"
    rc = main(["materialize", "--model", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(out),
               "--device", "cpu", "--json"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert obj["bytes"] == plan_bytes(m, PLAN).bytes == quantized_bytes_on_disk(out)
    assert obj["layers_quantized"] == 13
    rc = main(["generate", str(out), "--prompt", "t5 t6 t7", "--max-new-tokens", "3", "--device", "cpu", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert isinstance(res["text"], str) and 1 <= len(res["tokens"]) <= 3 and res["seconds"] > 0


@pytest.mark.parametrize("argv,msg", [
    (["generate", "/nonexistent/folder", "--prompt", "x"], "model folder not found"),
    (["materialize", "--scheme", "w5g64", "--out", "/tmp/x"], "invalid scheme"),
    (["materialize", "--scheme", "w4g64", "--plan", "p.json", "--out", "/tmp/x"], "not allowed with"),
    (["materialize", "--scheme", "w4g64"], "--out"),
    (["generate", "/tmp", "--prompt", "x", "--max-new-tokens", "0"], "must be positive"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


@pytest.mark.real
@torch.no_grad()
def test_real_smollm2_matches_fake_quant_and_round_trips(tmp_path):
    from tinymodels import load_smollm2

    loaded = load_smollm2()  # no skip: a model that does not load is a failure
    model, tok = loaded.model, loaded.tokenizer
    model.half().float()  # fp16-representable: the fp16 checkpoint is then lossless for the comparison
    plan = Plan.from_layers({"_default": "w4g64", "re:.*mlp\\.down_proj": "w8g128",
                             "re:.*self_attn\\.v_proj": "w3g32", "model.layers.0.self_attn.q_proj": None})
    expected = plan_bytes(model, plan)
    prompt = "The capital of France is"
    x = tok(prompt, return_tensors="pt").input_ids
    with quantized(model, plan):  # the reference: fake-quantized weights in the ordinary model
        ref_logits = model(x).logits
        ref_seq = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
    ref_tokens = ref_seq[0, x.shape[1]:].tolist()
    assert len(ref_tokens) == 32

    materialize(model, plan, dtype=torch.float32)
    got = model(x).logits
    rel = float((got - ref_logits).norm() / ref_logits.norm())
    assert rel <= 1e-3, rel  # fp16 tolerance (here it is fp32 rounding)
    teacher = model(ref_seq).logits[0, x.shape[1] - 1:-1].argmax(-1).tolist()
    assert teacher == ref_tokens  # every greedy step of the reference is the argmax here too

    meta = save(model, plan, tmp_path / "smol", tokenizer=tok, source="smollm2-135m")
    assert quantized_bytes_on_disk(tmp_path / "smol") == expected.bytes == meta["bytes"]
    m2, tok2 = load(tmp_path / "smol")
    res = generate(m2, tok2, prompt, max_new_tokens=32)
    assert res["tokens"] == ref_tokens
