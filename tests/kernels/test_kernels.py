"""Triton kernels against the torch reference: compiled on a GPU, under TRITON_INTERPRET=1 on the CPU.

Small shapes with K and N that are not multiples of the block sizes (masks) and ones that are (the
mask-free paths); outputs are poisoned with NaN first so every element must be written. Zeros are
packed integers (``packing.pack_zeros``, the default layout) unless a test says fp16 or symmetric.
"""

import pytest
import torch

from aqsearch.config import QuantScheme
from aqsearch.kernels import packing, reference
from aqsearch.quantizers import quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytest.importorskip("triton", reason="triton is not installed")
from aqsearch.kernels import launch  # noqa: E402 (a broken module fails here; it never skips)


def make(n, k, bits, group, sym=False, seed=0, zeros="int"):
    """Packed weight of a random W[N, K]; zeros: "int" (packed int32), "f16" ((G, N) fp16), or sym."""
    g = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(n, k, generator=g) * 0.05, QuantScheme(bits, group, sym))
    qw = packing.pack(qt.codes, bits).to(DEVICE)
    s = qt.scale.t().contiguous().to(DEVICE)
    z = None if sym else qt.zero.t().contiguous()
    if z is not None and zeros == "int":
        z = packing.pack_zeros(z, bits)
        assert z.dtype == torch.int32 and z.shape == (s.shape[0], packing.zero_words(n, bits))
    return qw, s, None if z is None else z.to(DEVICE)


def xin(m, k, dtype=torch.float16, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)


def oracle(x, qw, s, z, bits, group, k):
    return reference.matmul_f64(x.float().cpu(), qw.cpu(), s.cpu(), None if z is None else z.cpu(), bits, group, k)


def check(out, ref, tol):
    assert not torch.isnan(out).any(), "an output element was not written"
    err = reference.rel_err(out.float().cpu(), ref)
    assert err <= tol, err


# (N, K): not multiples of the blocks (masks, short last group) / multiples (mask-free paths)
ODD, EVEN = (80, 200), (128, 256)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 128))
@pytest.mark.parametrize("shape", (ODD, EVEN), ids=("odd", "even"))
def test_gemv_m1(bits, group, shape):
    n, k = shape if bits != 3 else (shape[0] // 2, shape[1] // 2)  # 3-bit: slower to interpret
    if bits == 3 and shape == ODD:
        k += 8  # K % 32 != 0: a short high-plane word
    # even: BKS | K and BN | N, the mask-free (EVEN_K, EVEN_N) loads the GPU runs on real shapes
    qw, s, z = make(n, k, bits, group, zeros="f16" if group == 32 else "int")
    x = xin(1, k)
    out = poisoned(1, n, x.dtype)
    launch.gemv(x, qw, s, z, bits, group, k, {"BN": 64, "BKS": 64, "split": 2}, out=out)
    check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("zeros", ("int", "f16", "sym"))
def test_gemv_h2(bits, zeros):
    """The packed half2 GEMV (``_gemv_h2``): even shape (mask-free loads), split-K, every zero format.

    Bound 2e-3, not 1e-3: products are summed in fp16 in chains of at most R + per_word / 2 (<= 16)
    before the fp32 flush, each rounding <= 2**-11 of the partial sum; on top of the fp16 output
    rounding (~2e-4) that measured 4e-4 .. 8e-4 here (2/3/4/8 bits, three zero formats)."""
    n, k = (64, 128) if bits != 3 else (32, 128)
    qw, s, z = make(n, k, bits, 64, sym=zeros == "sym", zeros=zeros)
    x = xin(1, k)
    out = poisoned(1, n, x.dtype)
    launch.gemv(x, qw, s, z, bits, 64, k, {"h2": True, "BN": 32, "BKS": 64 if bits != 8 else 32, "split": 2}, out=out)
    check(out, oracle(x, qw, s, z, bits, 64, k), 2e-3)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gemv_h2_masked(bits):
    """Half2 GEMV with K and N off the tiles (masked words and x, a short last group, K % 32 != 0 at 3 bits)."""
    n, k = 40, 104
    qw, s, z = make(n, k, bits, 64)
    x = xin(1, k)
    out = poisoned(1, n, x.dtype)
    launch.gemv(x, qw, s, z, bits, 64, k, {"h2": True, "BN": 32, "BKS": 32, "split": 1}, out=out)
    check(out, oracle(x, qw, s, z, bits, 64, k), 2e-3)


@pytest.mark.parametrize("m", (2, 3))
def test_gemv_several_rows(m):
    n, k = ODD
    qw, s, z = make(n, k, 4, 64)
    x = xin(m, k)
    out = poisoned(m, n, x.dtype)
    launch.gemv(x, qw, s, z, 4, 64, k, {"BN": 32, "BKS": 32, "split": 3}, out=out)
    check(out, oracle(x, qw, s, z, 4, 64, k), 1e-3)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_packed_zeros_read_per_column(bits):
    """Every column has its own zero (a wrong word or shift in the packed-zero read shows up)."""
    n, k = 72, 64  # N % 32 != 0: the last zero word of a row is partial
    qw, s, _ = make(n, k, bits, 64)
    zi = torch.arange(n).remainder(1 << bits).view(1, n)  # zeros 0, 1, 2, ... along N
    z = packing.pack_zeros(zi, bits).to(DEVICE)
    x = xin(2, k)
    ref = oracle(x, qw, s, z, bits, 64, k)
    check(launch.gemv(x[:1], qw, s, z, bits, 64, k, {"BN": 32, "BKS": 32, "split": 1}), ref[:1], 1e-3)
    check(launch.gemm(x, qw, s, z, bits, 64, k, {"BM": 16, "BN": 32, "BK": 32 if bits != 3 else 64,
                                                 "packed": True}), ref, 1e-3)
    w = launch.dequant(qw, s, z, bits, 64, k, torch.float16, {"BN": 64, "BKS": 32})
    assert torch.equal(w.cpu(), reference.dequantize_kn(qw.cpu(), s.cpu(), z.cpu(), bits, 64, k, torch.float16))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gemv_symmetric_and_per_channel(bits):
    n, k = 48, 136
    for group, sym in ((64, True), (None, False)):
        qw, s, z = make(n, k, bits, group, sym)
        x = xin(1, k)
        out = launch.gemv(x, qw, s, z, bits, group, k, {"BN": 64, "BKS": 64, "split": 1})
        check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)


def test_gemv_bf16_and_split_k_is_deterministic():
    n, k = ODD
    qw, s, z = make(n, k, 4, 64)
    x = xin(1, k, torch.bfloat16)
    cfg = {"BN": 32, "BKS": 64, "split": 4}
    a = launch.gemv(x, qw, s, z, 4, 64, k, cfg)
    b = launch.gemv(x, qw, s, z, 4, 64, k, cfg)
    assert torch.equal(a, b)  # slices are summed in a fixed order
    check(a, oracle(x, qw, s, z, 4, 64, k), 1e-2)  # bf16 output rounding: 2**-9
    for ws, locks in launch._WORKSPACE.values():
        assert int(locks.abs().sum()) == 0  # every tile's counter is re-armed


@pytest.mark.parametrize("bits,dtype", [(2, torch.float16), (3, torch.float16), (4, torch.float16),
                                        (8, torch.float16), (4, torch.bfloat16)], ids=("2", "3", "4", "8", "4-bf16"))
@pytest.mark.parametrize("packed", (False, True), ids=("gather", "packed"))
def test_gemm(bits, packed, dtype):
    """Both K loops, split-K; bf16 runs the GPU's kernel except that the interpreter's dot takes fp32
    copies of the (bf16-rounded) operands: see ``gemm_kernel``'s docstring."""
    n, k, m = 80, 600, 20
    group = 64
    qw, s, z = make(n, k, bits, group)
    x = xin(m, k, dtype)
    out = poisoned(m, n, dtype)
    launch.gemm(x, qw, s, z, bits, group, k, {"BM": 16, "BN": 32, "BK": 64, "split": 2, "packed": packed}, out=out)
    if dtype == torch.float16:
        check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)
    else:  # the tile is rounded to bf16 like a bf16 model's weight: compare with that model
        w = reference.dequantize(qw.cpu(), s.cpu(), z.cpu(), bits, group, k, torch.bfloat16)
        assert not launch.interpreting() or torch.is_floating_point(w)  # fp32 dot copies: exact bf16 values
        check(out, (x.cpu().double() @ w.double().t()).float(), 1e-2)


@pytest.mark.parametrize("bits,dtype,zeros", [(2, torch.float16, "int"), (3, torch.float16, "int"),
                                              (4, torch.float16, "int"), (8, torch.float16, "int"),
                                              (4, torch.float16, "f16"), (4, torch.float16, "sym"),
                                              (8, torch.bfloat16, "int")],
                         ids=("2", "3", "4", "8", "4-f16zeros", "4-sym", "8-bf16"))
def test_gemm_kn_large_m_loop(bits, dtype, zeros):
    """The large-M loop (words loaded once, unpacked along a new axis; fp16 tile for fp16 x and integer
    zeros): masks in M, N and K, split-K, against the fp64 oracle."""
    n, k, m = 80, 600, 20
    group = 64
    qw, s, z = make(n, k, bits, group, sym=zeros == "sym", zeros="f16" if zeros == "f16" else "int")
    x = xin(m, k, dtype)
    out = poisoned(m, n, dtype)
    launch.gemm(x, qw, s, z, bits, group, k, {"BM": 16, "BN": 32, "BK": 64, "split": 2, "kn": True}, out=out)
    if dtype == torch.float16:
        check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)
    else:
        w = reference.dequantize(qw.cpu(), s.cpu(), z.cpu(), bits, group, k, torch.bfloat16)
        check(out, (x.cpu().double() @ w.double().t()).float(), 1e-2)


@pytest.mark.parametrize("loop", ("kn", "packed-f16w"))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gemm_kn_tile_is_the_reference_weight_to_the_bit(bits, loop):
    """With x = the identity rows, the fp16 tile the kn loop (and the swapped loop's ``f16w`` tile) builds
    is the reference's weight exactly."""
    n, k = 64, 128
    group = 64
    qw, s, z = make(n, k, bits, group)
    x = torch.eye(k, dtype=torch.float16, device=DEVICE)[:32]
    cfg = {"BM": 32, "BN": 32, "BK": 64, "split": 1}
    cfg.update({"kn": True} if loop == "kn" else {"packed": True, "f16w": True})
    out = launch.gemm(x, qw, s, z, bits, group, k, cfg)
    ref = reference.dequantize_kn(qw.cpu(), s.cpu(), z.cpu(), bits, group, k, torch.float16)[:32]
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gemm_symmetric_tile_spanning_groups(bits):
    n, k, m = 48, 300, 17
    qw, s, z = make(n, k, bits, 32, sym=True)
    x = xin(m, k)
    out = launch.gemm(x, qw, s, z, bits, 32, k, {"BM": 16, "BN": 32, "BK": 64, "split": 1})  # BK > group
    check(out, oracle(x, qw, s, z, bits, 32, k), 1e-3)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group,sym,dtype,zeros", [(32, False, torch.float16, "int"), (None, False, torch.float16, "f16"),
                                                   (256, True, torch.float16, ""), (64, False, torch.bfloat16, "int")],
                         ids=("g32", "per-channel-f16-zeros", "g256-sym", "g64-bf16"))
def test_dequant_kernel_is_the_reference_to_the_bit(bits, group, sym, dtype, zeros):
    n, k = 40, 136
    qw, s, z = make(n, k, bits, group, sym, zeros=zeros)
    w = launch.dequant(qw, s, z, bits, group, k, dtype, {"BN": 64, "BKS": 64})
    ref = reference.dequantize_kn(qw.cpu(), s.cpu(), None if z is None else z.cpu(), bits, group, k, dtype)
    if dtype == torch.bfloat16 and launch.interpreting():
        # the CPU interpreter rounds fp32 -> bf16 towards zero (the GPU rounds to nearest): 1 ulp
        torch.testing.assert_close(w.cpu(), ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(w.cpu(), ref)


@pytest.mark.parametrize("chunk", (0, 32), ids=("whole", "chunks"))
def test_dequant_then_matmul_path(chunk):
    n, k, m = 80, 200, 9  # chunks of 32 columns: a partial last chunk, zero words split across chunks
    qw, s, z = make(n, k, 3, 64)
    x = xin(m, k, torch.float32)
    out = launch.dequant_matmul(x, qw, s, z, 3, 64, k, {"BN": 64, "BKS": 64, "chunk": chunk})
    check(out, oracle(x, qw, s, z, 3, 64, k), 1e-5)


def _shipped_variants():
    """One problem per distinct kernel variant in the shipped table (split and timings aside)."""
    from aqsearch.kernels._tuned import TUNED

    seen = {}
    for table in TUNED.values():
        for key, cfg in table.items():
            bits, group, sym, _, mb, _, _ = key.split(":")
            cfg = {a: v for a, v in cfg.items() if a not in ("ms", "us", "times")}
            m = int(mb) if cfg["path"] == "gemv" else min(int(mb), 20)
            var = (int(bits), sym == "s", m, tuple(sorted((a, v) for a, v in cfg.items() if a != "split")))
            seen.setdefault(var, (int(group), cfg))  # the group changes no code path: the first one seen
    return [(v[0], g, v[1], v[2], c) for v, (g, c) in sorted(seen.items(), key=lambda x: str(x[0]))]


@pytest.mark.parametrize("bits,group,sym,m,cfg", _shipped_variants(), ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(f"{a}{b}" for a, b in sorted(v.items()) if a not in ("path", "num_stages")))
def test_shipped_table_configs_run(bits, group, sym, m, cfg):
    """Every config of ``kernels/_tuned.py`` runs on a small problem and matches the reference: no
    shipped entry is dead code (split-K at 2 slices, packed integer zeros, the table's tile sizes)."""
    bn = cfg.get("BN", 64)
    n = bn if cfg["path"] == "gemv" else max(32, min(bn, 64))
    k = group
    cfg = dict(cfg, split=2 if cfg.get("split", 1) > 1 else 1)
    if cfg["path"] == "dequant" and cfg.get("chunk"):
        cfg["chunk"] = 32
    qw, s, z = make(n, k, bits, group, sym)
    x = xin(m, k)
    out = poisoned(m, n, x.dtype)
    launch.run(x, qw, s, z, bits, group, k, cfg, out=out)
    check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)
