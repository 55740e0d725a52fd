"""The dispatcher's candidate lists, the shipped table, the CPU fallback, and lazy imports."""

import subprocess
import sys
import warnings

import pytest
import torch

from aqsearch.kernels import dispatch, linear, pack, packing, reference


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", (32, 64, 128, 256))
def test_candidates_are_valid_configs(bits, group):
    for m in (1, 2, 3, 4, 5, 8, 16, 17, 64, 65, 300, 1024, 4096):
        cands = dispatch.candidates(m, 4096, 4096, bits, group, 132)
        assert cands, m
        for c in cands:
            if c["path"] == "gemv":
                assert m <= 4 and group % min(c["BKS"], group) == 0 and c["split"] >= 1
            elif c["path"] == "gemm":
                bk = c["BK"]
                assert bk >= 16 and (bk <= group and group % bk == 0 or bk % group == 0)
                if c["packed"]:  # one scale a tile, whole 3-bit plane pairs, a wgmma-sized weight tile
                    assert bk <= group and group % bk == 0 and (bits != 3 or bk % 32 == 0)
                    assert c["BN"] >= 16 * c["num_warps"] and c["BM"] >= 16
            else:
                assert c["path"] == "dequant" and m >= 64
                assert c["chunk"] == 0 or c["chunk"] % 256 == 0  # whole packed-zero words a chunk


def test_m_buckets_and_keys():
    assert [dispatch.m_bucket(m) for m in (1, 2, 3, 4, 5, 9, 5000)] == [1, 2, 4, 4, 8, 16, 4096]
    assert dispatch.key(3, 10, 20, 4, 64, True, torch.bfloat16) == "4:64:s:bfloat16:4:10:20"


def test_paths_by_m():
    paths = lambda m: {c["path"] for c in dispatch.candidates(m, 8192, 8192, 4, 128, 132)}  # noqa: E731
    assert paths(1) == {"gemv", "gemm"} and paths(16) == {"gemm"} and paths(4096) == {"gemm", "dequant"}
    assert dispatch.dequant_chunk(4096) * 4096 * 2 <= (50 << 20) // 3


def test_shipped_table_holds_valid_configs():
    from aqsearch.kernels._tuned import TUNED

    for gpu, table in TUNED.items():
        for k, cfg in table.items():
            bits, group, sym, dtype, mb, n, kk = k.split(":")
            assert cfg["path"] in ("gemv", "gemm", "dequant")
            assert cfg["path"] != "gemv" or int(mb) <= 4


def test_split_covers_k():
    from aqsearch.kernels.launch import _split

    for k in (32, 100, 576, 4096, 14336):
        for step in (32, 64, 128):
            for split in (1, 3, 7, 64):
                per, n = _split(k, step, split)
                assert per % step == 0 and per * n >= k > per * (n - 1)


def test_cpu_fallback_matches_reference_and_warns_once():
    codes = torch.randint(0, 16, (40, 96), dtype=torch.uint8)
    qw = pack(codes, 4)
    s = torch.rand(2, 40).half() * 0.01
    z = packing.pack_zeros(torch.full((2, 40), 8), 4)  # packed integer zeros: 5 words a group row
    x = torch.randn(3, 5, 96)
    dispatch._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = linear(x, qw, s, z, 4, 64, 96)
        y2 = linear(x, qw, s, z, 4, 64, 96, bias=torch.ones(40))
    assert len([m for m in w if "pure-torch reference" in str(m.message)]) == 1
    assert y1.shape == (3, 5, 40)
    ref = x.reshape(-1, 96) @ reference.dequantize(qw, s, z, 4, 64, 96).t()
    torch.testing.assert_close(y1.reshape(-1, 40), ref)
    torch.testing.assert_close(y2, y1 + 1)
    assert packing.storage_bytes(qw, s, z) == qw.numel() * 4 + 2 * 40 * 2 + 2 * 5 * 4


def test_import_aqsearch_loads_no_triton():
    code = ("import sys, aqsearch, aqsearch.kernels, aqsearch.quantlinear, aqsearch.materialize, aqsearch.cli; "
            "aqsearch.cli.build_parser(); print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
