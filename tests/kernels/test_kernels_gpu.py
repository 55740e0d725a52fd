"""GPU-only kernel tests: every path and tuner candidate at real sizes, bf16, graphs, the tuner.

Skipped without CUDA. Compile-heavy: run with ``pytest -n 8`` on the GPU machine.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from aqsearch.kernels import dispatch, launch, packing, reference  # noqa: E402


def problem(n, k, bits, group, sym=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qw = torch.randint(-2**31, 2**31 - 1, (packing.code_words(k, bits), n), dtype=torch.int32, device="cuda", generator=g)
    if k % 32:  # codes past K are 0 in a real packing: keep the padding honest
        codes = packing.unpack(qw.cpu(), bits, k)
        qw = packing.pack(codes, bits).cuda()
    ng = -(-k // packing.effective_group(group, k))
    s = (torch.rand(ng, n, device="cuda", generator=g) * 0.01 + 1e-3).half()
    z = None if sym else packing.pack_zeros(torch.randint(0, 1 << bits, (ng, n), device="cuda", generator=g), bits)
    return qw, s, z


def ref(x, qw, s, z, bits, group, k):
    w = reference.dequantize_kn(qw, s, z, bits, group, k, torch.float64)
    return x.double() @ w


def rel(a, b):
    assert not torch.isnan(a).any()
    return float((a.double() - b).norm() / b.norm())


CASES = [(g, m) for g in (32, 128) for m in (1, 3, 16, 64, 300)] + [(64, 1), (256, 1), (256, 300)]


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group,m", CASES)
def test_every_candidate(bits, group, m):
    n, k = 1000, 1000 if bits != 3 else 1056  # N and K: no block size divides them
    qw, s, z = problem(n, k, bits, group)
    x = torch.randn(m, k, device="cuda").half()
    r = ref(x, qw, s, z, bits, group, k)
    for cfg in dispatch.candidates(m, n, k, bits, group, torch.cuda.get_device_properties(0).multi_processor_count):
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        launch.run(x, qw, s, z, bits, group, k, cfg, out=out)
        assert rel(out, r) <= 1e-3, cfg


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("m", (1, 64))
def test_symmetric_large_even_shape(bits, m):
    n, k = 4096, 4096
    qw, s, z = problem(n, k, bits, 128, sym=True)
    x = torch.randn(m, k, device="cuda").half()
    r = ref(x, qw, s, z, bits, 128, k)
    for cfg in dispatch.candidates(m, n, k, bits, 128, torch.cuda.get_device_properties(0).multi_processor_count):
        assert rel(launch.run(x, qw, s, z, bits, 128, k, cfg), r) <= 1e-3, cfg


@pytest.mark.parametrize("m", (1, 3, 16, 128))
def test_bf16(m):
    n, k, bits, group = 768, 1024, 4, 64
    qw, s, z = problem(n, k, bits, group)
    x = torch.randn(m, k, device="cuda").bfloat16()
    w16 = reference.dequantize_kn(qw, s, z, bits, group, k, torch.bfloat16).double()
    for cfg in dispatch.candidates(m, n, k, bits, group, torch.cuda.get_device_properties(0).multi_processor_count):
        out = launch.run(x, qw, s, z, bits, group, k, cfg)
        assert out.dtype == torch.bfloat16
        # the gemv uses the exact fp32 weight, the others the bf16-rounded one: both within bf16 rounding
        assert rel(out, x.double() @ w16) <= 1e-2, cfg


def test_tuner_caches_and_graph_capture():
    n, k, bits, group = 2048, 2048, 4, 128
    qw, s, z = problem(n, k, bits, group)
    x = torch.randn(1, k, device="cuda").half()
    cfg = dispatch.choose(x, qw, s, z, bits, group, k, tune=True)
    assert cfg["path"] == "gemv" and cfg["ms"] > 0 and cfg["times"]
    assert dispatch.choose(x, qw, s, z, bits, group, k, tune=True) is cfg  # cached
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the split-K workspace belongs to the capture stream: warm it
        y0 = dispatch.matmul(x, qw, s, z, bits, group, k)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        y = dispatch.matmul(x, qw, s, z, bits, group, k)
    x.normal_()
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(y, y0)
    assert rel(y, ref(x, qw, s, z, bits, group, k)) <= 1e-3


def test_quantlinear_cuda_matches_fake_quant():
    from aqsearch.config import QuantScheme
    from aqsearch.quantlinear import QuantLinear
    from aqsearch.quantizers import fake_quantize

    lin = torch.nn.Linear(1024, 768, bias=True)
    for scheme in ("w4g128", "w3g64", "w2g32s", "w8g256"):
        sch = QuantScheme.parse(scheme)
        q = QuantLinear.from_linear(lin, sch).cuda()
        w = fake_quantize(lin.weight.detach().float(), sch).half().cuda()
        for m in (1, 7, 200):
            x = torch.randn(3, m, 1024, device="cuda").half()
            yr = torch.nn.functional.linear(x.float(), w.float(), lin.bias.detach().cuda().half().float())
            assert rel(q(x), yr.double()) <= 1e-3, (scheme, m)
