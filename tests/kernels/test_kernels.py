"""Triton kernels against the torch reference: compiled on a GPU, under TRITON_INTERPRET=1 on the CPU.

Small shapes with K and N that are not multiples of the block sizes (masks) and ones that are (the
mask-free paths); outputs are poisoned with NaN first so every element must be written.
"""

import pytest
import torch

from aqsearch.config import QuantScheme
from aqsearch.kernels import packing, reference
from aqsearch.quantizers import quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

launch = pytest.importorskip("aqsearch.kernels.launch", reason="triton is not installed")


def make(n, k, bits, group, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qt = quantize(torch.randn(n, k, generator=g) * 0.05, QuantScheme(bits, group, sym))
    qw = packing.pack(qt.codes, bits).to(DEVICE)
    s = qt.scale.t().contiguous().to(DEVICE)
    z = None if sym else qt.zero.t().contiguous().to(DEVICE)
    return qw, s, z


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
    n, k = shape if bits != 3 else (shape[0] // 2, shape[1] // 2 + 8)  # 3-bit: slower to interpret
    qw, s, z = make(n, k, bits, group)
    x = xin(1, k)
    out = poisoned(1, n, x.dtype)
    launch.gemv(x, qw, s, z, bits, group, k, {"BN": 64, "BKS": 64, "split": 2}, out=out)
    check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)


@pytest.mark.parametrize("m", (2, 3))
def test_gemv_several_rows(m):
    n, k = ODD
    qw, s, z = make(n, k, 4, 64)
    x = xin(m, k)
    out = poisoned(m, n, x.dtype)
    launch.gemv(x, qw, s, z, 4, 64, k, {"BN": 32, "BKS": 32, "split": 3}, out=out)
    check(out, oracle(x, qw, s, z, 4, 64, k), 1e-3)


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
@pytest.mark.parametrize("slots", (False, True), ids=("gather", "slots"))
def test_gemm(bits, slots, dtype):
    n, k, m = 80, 600, 20
    group = 64
    qw, s, z = make(n, k, bits, group)
    x = xin(m, k, dtype)
    bk = {2: 256, 3: 512, 4: 128, 8: 64}[bits] if slots else 64
    out = poisoned(m, n, dtype)
    launch.gemm(x, qw, s, z, bits, group, k, {"BM": 16, "BN": 32, "BK": bk, "split": 2, "slots": slots}, out=out)
    if dtype == torch.float16:
        check(out, oracle(x, qw, s, z, bits, group, k), 1e-3)
    else:  # the tile is rounded to bf16 like a bf16 model's weight: compare with that model
        w = reference.dequantize(qw.cpu(), s.cpu(), z.cpu(), bits, group, k, torch.bfloat16)
        check(out, (x.cpu().double() @ w.double().t()).float(), 1e-2)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_gemm_symmetric_tile_spanning_groups(bits):
    n, k, m = 48, 300, 17
    qw, s, z = make(n, k, bits, 32, sym=True)
    x = xin(m, k)
    out = launch.gemm(x, qw, s, z, bits, 32, k, {"BM": 16, "BN": 32, "BK": 64, "split": 1})  # BK > group
    check(out, oracle(x, qw, s, z, bits, 32, k), 1e-3)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group,sym,dtype", [(32, False, torch.float16), (None, False, torch.float16),
                                             (256, True, torch.float16), (64, False, torch.bfloat16)],
                         ids=("g32", "per-channel", "g256-sym", "g64-bf16"))
def test_dequant_kernel_is_the_reference_to_the_bit(bits, group, sym, dtype):
    n, k = 40, 136
    qw, s, z = make(n, k, bits, group, sym)
    w = launch.dequant(qw, s, z, bits, group, k, dtype, {"BN": 64, "BKS": 64})
    ref = reference.dequantize_kn(qw.cpu(), s.cpu(), None if z is None else z.cpu(), bits, group, k, dtype)
    if dtype == torch.bfloat16 and launch.interpreting():
        # the CPU interpreter rounds fp32 -> bf16 towards zero (the GPU rounds to nearest): 1 ulp
        torch.testing.assert_close(w.cpu(), ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(w.cpu(), ref)


def test_dequant_then_matmul_path():
    n, k, m = 80, 200, 9
    qw, s, z = make(n, k, 8, 128)
    x = xin(m, k)
    out = launch.dequant_matmul(x, qw, s, z, 8, 128, k, {"BN": 64, "BKS": 64})
    check(out, oracle(x, qw, s, z, 8, 128, k), 1e-3)
