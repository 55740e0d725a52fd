"""The decode step's fused kernels (``kernels/_fused.py``, interpreter on the CPU) against the torch code they
replace, and the launch count of a captured-shape decode step of a tiny Llama (``aqsearch.fastpath``).

What the CPU count shows: the aten ops a step dispatches outside the matmuls (``QuantLinear`` and the LM
head's ``nn.Linear``) that compute something (views, aliases, allocations and metadata reads left out),
plus one per fused Triton launch. On a GPU each such op is at least one kernel launch inside the step's
CUDA graph; the CPU's SDPA and the GPU's flash/efficient attention may differ by a kernel or two.
"""

import os
import sys

import pytest
import torch

from aqsearch import fastpath
from aqsearch.kernels import _fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")
# the environment decides, never the code under test: conftest turns the interpreter on without a GPU
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                  reason="needs a GPU or the Triton interpreter (TRITON_INTERPRET=1) on the CPU")


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_rmsnorm_is_hf_rmsnorm(dtype):
    """One-launch RMSNorm against HF's ``LlamaRMSNorm`` code (fp32 statistics, the row rounded to the input
    dtype before the weight). Catches a variance over the wrong axis, eps outside the root, or a missing
    rounding step (fp16: a 1-ulp drift on many elements)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 200, generator=g) * 3).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(dtype).to(DEVICE)
    got = _fused.rmsnorm(x, w, 1e-5)
    want = _fused.rmsnorm_torch(x, w, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 2 ** -10 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_rotary_is_hf_rotary():
    """q and k rotated in place in one launch, for HF's ``[B, H, S, D]`` views of ``[B, S, H, D]`` buffers and
    GQA (fewer k heads), against HF's ``apply_rotary_pos_emb``. Catches swapped halves, a wrong sign of
    the rotated half, a cos/sin row of the wrong position, or the k heads left unrotated."""
    g = torch.Generator().manual_seed(1)
    b, s, hq, hk, d = 2, 3, 4, 2, 16
    q = torch.randn(b, s, hq, d, generator=g).half().to(DEVICE).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=g).half().to(DEVICE).transpose(1, 2)
    ang = torch.rand(b, s, d // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).half().to(DEVICE)
    sin = torch.cat([ang.sin(), ang.sin()], -1).half().to(DEVICE)
    wq, wk = _fused.rotary_torch(q.clone(), k.clone(), cos, sin)
    gq, gk = _fused.rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(gq, wq, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gk, wk, rtol=2e-3, atol=2e-3)


def test_silu_mul_is_silu_times_up():
    """``silu(g) * u`` in one launch against torch (fp16). Catches sigmoid(g) * u (a missing g) or the
    product with g instead of u."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 1, 300, generator=g).half().to(DEVICE)
    u = torch.randn(2, 1, 300, generator=g).half().to(DEVICE)
    torch.testing.assert_close(_fused.silu_mul(a, u), torch.nn.functional.silu(a) * u, rtol=2e-3, atol=2e-3)


@needs_triton
@pytest.mark.parametrize("seq", (1, 3))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_kv_write_is_index_copy(dtype, seq):
    """k and v (``[B, H, L, D]`` views of ``[B, L, H, D]`` buffers, as attention hands them over) written into
    the caches in one launch, twice in a row, against ``index_copy_`` at the positions they belong to. Catches
    a position not advanced (the second write over the first) or advanced before it is read, k written to
    the values cache, or rows of another head (the transposed strides)."""
    g = torch.Generator().manual_seed(4)
    b, h, max_len, d, start = 2, 3, 9, 16, 2
    keys, values = (torch.randn(b, h, max_len, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    ref_k, ref_v = keys.clone(), values.clone()
    length = torch.tensor(start, device=DEVICE)  # int64, as StaticLayer's cumulative_length
    before = _fused.LAUNCHES["kv_write"]
    for i in range(2):
        k, v = (torch.randn(b, seq, h, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for _ in range(2))
        _fused.kv_write(keys, values, k, v, length)
        pos = torch.arange(start + i * seq, start + (i + 1) * seq, device=DEVICE)
        ref_k.index_copy_(2, pos, k)
        ref_v.index_copy_(2, pos, v)
    assert _fused.LAUNCHES["kv_write"] == before + 2  # the kernel ran, not the torch twin
    assert length.item() == start + 2 * seq
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)


@needs_triton
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
@pytest.mark.parametrize("mask", ("none", "bool", "additive"))
def test_decode_attention_is_sdpa_with_repeated_kv(dtype, mask):
    """One query token against a ``[B, Hk, L, D]`` cache with 4 query heads a KV head, rows valid up to a
    different length per batch row (transformers' bool mask, its additive form, or none), against SDPA on
    KV heads repeated to the query heads (transformers' route), in fp32. Catches query head h read against
    KV head h % Hk instead of h // groups, a mask ignored or read from the other batch row, a softmax
    without its running maximum rescale across blocks (L spans 3 blocks), or a wrong scale."""
    from aqsearch.kernels import _attn

    g = torch.Generator().manual_seed(5)
    b, hq, hk, length, d = 2, 8, 2, 70, 64
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)  # HF's [B, H, 1, D] view
    k, v = ((3 * torch.randn(b, hk, length, d, generator=g)).to(dtype).to(DEVICE) for _ in range(2))
    valid = (torch.arange(length)[None, :] < torch.tensor([[50], [33]])).to(DEVICE)
    m = {"none": None, "bool": valid[:, None, None, :],
         "additive": torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]}[mask]
    before = _fused.LAUNCHES["decode_attention"]
    got = _attn.decode_attention(q, k, v, m, 0.17)
    assert _fused.LAUNCHES["decode_attention"] == before + 1 and got.shape == (b, 1, hq, d)
    want = _attn.attention_torch(q.float(), k.float(), v.float(), None if m is None else
                                 (m if m.dtype == torch.bool else m.float()), 0.17)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def _tiny(layers, scheme="w4g128", device=DEVICE):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
    import decode
    from aqsearch.config import Plan
    from aqsearch.materialize import materialize

    model = decode.random_llama(dict(decode.TINY, num_hidden_layers=layers), "cpu", torch.float32)
    g = torch.Generator().manual_seed(3)
    for mod in model.modules():  # norm weights other than ones: a fused norm that drops them shows
        if type(mod).__name__.endswith("RMSNorm"):
            mod.weight.data = 1 + 0.3 * torch.randn(mod.weight.shape, generator=g)
    if scheme:
        materialize(model, Plan.uniform(scheme), dtype=torch.float32)
    return decode, model.to(device)  # on a GPU the fused kernels run there (CPU tensors: the torch twins)


def _step_counts(layers, fused):
    """Launches of one decode step (after a 3-token prefill) and the step's logits."""
    from aqsearch.quantlinear import QuantLinear

    decode, model = _tiny(layers)
    if fused:
        fastpath.fuse_llama(model)
    try:
        dec = decode.Decoder(model, 1, 16, graphs=False)
        out = {}

        def step():
            o = model(input_ids=dec.tok, past_key_values=dec.cache, cache_position=dec.pos, use_cache=True)
            out["logits"] = o.logits
            dec.tok.copy_(o.logits[:, -1].argmax(-1, keepdim=True))
            dec.pos.add_(1)

        with torch.no_grad():
            dec.prefill(torch.tensor([[1, 2, 3]], device=DEVICE))
            n = fastpath.count_launches(step, model, (QuantLinear, torch.nn.Linear))
        print(f"{layers} layers, fused={fused}: {sum(n.values())} launches {dict(n)}")
    finally:
        fastpath.unfuse_llama(model)
    return n, out["logits"]


# What the fused step launches besides the matmuls (measured, tiny Llama, transformers 5.25, CPU): each
# layer 8 = 2 RMSNorm + 1 rotary (q and k) + 1 silu*up + 2 residual adds + 1 attention (decode_attention;
# transformers' SDPA route was 4: the mask handling's where and 2 scalar_tensor, then SDPA, and on the GPU
# with a mask 2 more copies of the cache to the query heads) + 1 cache write (kv_write; StaticCache's own was
# 5: arange, add, add_, 2 index_copy_); each step: embedding, rotary cos/sin, the mask, argmax, token and
# position updates. Stock HF modules and cache: 35 a layer.
PER_LAYER_MAX = 8
PER_STEP_MAX = 30


@needs_triton
def test_decode_step_launch_count():
    """A decode step of a w4g128 tiny Llama with ``fuse_llama`` (and ``benchmarks/decode.py``'s cache patched
    for it): at most PER_LAYER_MAX launches a layer and PER_STEP_MAX a step outside the matmuls, against 35 a
    layer for HF's stock modules and cache; and the same logits as the stock step (fp32). Catches a fusion
    that is not applied (an RMSNorm, MLP, the rotary or the cache write left on the stock path), an extra
    copy or cast per layer, or a fused step that computes something else."""
    stock2, l_stock = _step_counts(2, False)
    fused2, l_fused = _step_counts(2, True)
    fused3, _ = _step_counts(3, True)
    stock3, _ = _step_counts(3, False)
    per_layer = sum(fused3.values()) - sum(fused2.values())
    per_step = sum(fused2.values()) - 2 * per_layer
    stock_layer = sum(stock3.values()) - sum(stock2.values())
    assert per_layer <= PER_LAYER_MAX, (per_layer, fused3 - fused2)
    assert per_step <= PER_STEP_MAX, (per_step, fused2)
    assert stock_layer >= per_layer + 20, (stock_layer, per_layer)
    assert fused2["triton:rmsnorm"] == 2 * 2 + 1 and fused2["triton:rotary"] == 2 and fused2["triton:silu_mul"] == 2
    assert fused2["triton:kv_write"] == 2 and stock2["triton:kv_write"] == 0 and stock2["index_copy_"] == 4
    assert fused2["triton:decode_attention"] == 2 and stock2["triton:decode_attention"] == 0
    torch.testing.assert_close(l_fused, l_stock, rtol=1e-4, atol=1e-4)


@needs_triton
def test_greedy_decode_with_fused_cache_is_stock():
    """A greedy decode of a tiny fp32 Llama, batch 2 (one token, a chunk of 3, then 5 steps), with its
    ``StaticCache`` patched by ``fuse_static_cache`` against the stock cache: the same tokens and logits at
    every step, every write after the first (the lazy allocation) by the kernel. Catches a cache write at
    the wrong position or into the wrong cache, or a length that drifts from transformers' own."""
    from transformers import StaticCache

    _, model = _tiny(2, None)
    model.to(DEVICE)
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], device=DEVICE)

    def greedy(fused):
        cache = StaticCache(config=model.config, max_cache_len=12)
        if fused:
            assert fastpath.fuse_static_cache(cache) == 2
        run = lambda ids, pos: model(input_ids=ids, past_key_values=cache, use_cache=True,  # noqa: E731
                                     cache_position=torch.arange(pos, pos + ids.shape[1], device=DEVICE)).logits
        with torch.no_grad():
            run(prompt[:, :1], 0)
            logits = [run(prompt[:, 1:], 1)[:, -1]]
            toks = []
            for i in range(5):
                toks.append(logits[-1].argmax(-1, keepdim=True))
                logits.append(run(toks[-1], 4 + i)[:, -1])
        return torch.cat(toks, 1), torch.stack(logits), cache.layers[0].cumulative_length.item()

    before = _fused.LAUNCHES["kv_write"]
    toks, logits, length = greedy(True)
    assert _fused.LAUNCHES["kv_write"] == before + 2 * 6
    want_toks, want_logits, want_length = greedy(False)
    assert toks.tolist() == want_toks.tolist() and length == want_length == 9
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ("w3g128", "w4g64", "w8g128s", None), ids=("w3g128", "w4g64", "w8g128s", "fp32"))
def test_fused_matmuls_are_exact_and_four_a_layer(scheme):
    """``fuse_llama(matmuls=True)``: q/k/v and gate/up as one matmul each (QuantLinear packed along N, 3-bit
    zero planes and symmetric schemes included; plain ``nn.Linear`` for the fp32 model). Same logits as the
    unfused model, 4 matmul calls a layer instead of 7, the same bytes. Catches zeros concatenated word-wise
    across the 3-bit planes, outputs split in the wrong order (k for v), or a slice served for another input."""
    from aqsearch.quantlinear import QuantLinear

    import copy

    _, model = _tiny(2, scheme, "cpu")  # exactness of the concatenation: one device, one kernel path
    tok = torch.tensor([[5, 7, 11, 13, 17]])
    k_ref = copy.deepcopy(model.model.layers[0].self_attn.k_proj)
    size = lambda: sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))  # noqa: E731
    before = size()
    with torch.no_grad():
        ref = model(input_ids=tok).logits
    n = fastpath.fuse_llama(model, matmuls=True)
    try:
        assert n["qkv"] == 2 and n["gate_up"] == 2
        calls = []
        hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
                 if isinstance(m, (QuantLinear, torch.nn.Linear))]
        with torch.no_grad():
            got = model(input_ids=tok).logits
        for h in hooks:
            h.remove()
        assert len(calls) == 2 * 4 + 1  # + the LM head
        assert size() == before
        attn = model.model.layers[0].self_attn
        a, b = torch.randn(1, 3, 128), torch.randn(1, 3, 128)
        with torch.no_grad():
            attn.q_proj(a)
            torch.testing.assert_close(attn.k_proj(b), k_ref(b), rtol=1e-5, atol=1e-5)  # not a's k
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    finally:
        fastpath.unfuse_llama(model)
