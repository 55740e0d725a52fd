"""Launchers for the Triton kernels with an explicit config, and the split-K workspace.

Each launcher takes plain tensors and ints (``x [M, K]`` with unit stride along K, ``qweight``
int32 ``(words, N)``, ``scales`` fp16 ``(G, N)``; ``zeros``: packed integers int32
``(G, zero_words(N, bits))``, fp16 ``(G, N)``, or ``None`` for symmetric, told apart by dtype) and a
config dict; :mod:`.dispatch` picks the config. Under ``TRITON_INTERPRET=1`` they run on CPU tensors.

A config is a dict, JSON-friendly so the tuner can cache it:
``{"path": "gemv", "BN": 256, "BKS": 128, "num_warps": 2, "split": 8}`` (``"h2": True``: the packed
half2 kernel ``_gemv_h2`` at M = 1 with fp16 x; ``"pk": True``: the f16x2 inline-PTX one, with ``"kw"`` warps
along K (``"kg": True``: each of those warps takes whole tiles, K-slices of kw tiles), ``"num_stages"`` a pipelined
K loop, ``"pdl"`` / ``"late"`` / ``"pf"`` programmatic dependent launch;
otherwise, and for bf16 x, the fp32 one),
``{"path": "gemm", "packed": True, "BM": 16, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3, "split": 4}``
(``"kn": True`` instead of ``packed``: the large-M loop, words loaded once, fp16 tile for fp16 x;
``"f16w": True`` with ``packed``: that fp16 tile in the swapped loop),
``{"path": "dequant", "BN": 256, "BKS": 64, "num_warps": 4, "chunk": 2048}`` (then cuBLAS; ``chunk``:
columns dequantized at a time into one reused buffer that stays in L2, 0 for all at once).

>>> import torch
>>> from aqsearch.kernels import pack, reference
>>> qw = pack(torch.randint(0, 16, (64, 128), dtype=torch.uint8), 4).cuda()   # doctest: +SKIP
>>> s, z = torch.rand(1, 64).half().cuda() / 100, torch.full((1, 64), 8.0).half().cuda()  # doctest: +SKIP
>>> y = gemv(torch.randn(1, 128).half().cuda(), qw, s, z, 4, 128, 128, {"BN": 64, "BKS": 64})  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch

import functools

from . import _gemm, _gemv, _gemv_h2, _gemv_pk
from .packing import effective_group, kw_fits

ONES = 0xFFFF  # the kernels' run-time mask source (see _tl_common.win)
_WORKSPACE: dict = {}  # (device, stream, pool) -> [fp32 partials, int32 counters]: reused across launches


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _workspace(device: torch.device, n_partial: int, n_locks: int,
               pool: str = "splitk") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scratch of >= ``n_partial`` elements and >= ``n_locks`` zeroed counters for this stream and
    ``pool`` (one a kernel family: the GEMVs' split-K, the decode attention's partials).

    The kernel's last K-slice resets its counter, so counters stay zero between launches. Grown
    only outside CUDA-graph capture (warm up once before capturing).
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, pool)
    ws, locks = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_partial or locks.numel() < n_locks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"aqsearch.kernels: {pool} workspace must grow; run once before CUDA-graph capture")
        n_partial = max(n_partial, 0 if ws is None else ws.numel(), 1)
        n_locks = max(n_locks, 0 if locks is None else locks.numel(), 1)
        ws = torch.empty(n_partial, dtype=torch.float32, device=device)
        locks = torch.zeros(n_locks, dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, locks)
    return ws, locks


def _split(k: int, step: int, split: int) -> tuple[int, int]:
    """K per slice (a multiple of ``step``) and the number of slices that covers K."""
    per = -(-k // max(1, split))
    per = -(-per // step) * step
    return per, -(-k // per)


def zmode(zeros) -> tuple[int, int]:
    """(ZMODE, words a group row of packed zeros): 0 symmetric, 1 fp16 zeros, 2 packed int32 zeros."""
    if zeros is None:
        return 0, 0
    if zeros.dtype == torch.int32:
        return 2, zeros.shape[1]
    if zeros.dtype != torch.float16:
        raise ValueError(f"zeros must be int32 (packed) or float16, got {zeros.dtype}")
    return 1, 0


def _common(x, qweight, bits, k, out):
    m, kx = x.shape
    if kx != k or x.stride(1) != 1:
        raise ValueError(f"x must be [M, {k}] with unit stride along K, got {tuple(x.shape)} strides {x.stride()}")
    n = qweight.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    n_lo = -(-k // 16) if bits == 3 else 0
    return m, n, n_lo, out


def gemv(x, qweight, scales, zeros, bits, group, k, cfg, out=None):
    """``x[M, K] @ W -> [M, N]`` with the split-K CUDA-core kernel (M <= 8 sensible)."""
    m, n, n_lo, out = _common(x, qweight, bits, k, out)
    g = effective_group(group, k)
    bks = min(cfg["BKS"], g)
    # kg (the pk kernel, 2/4/8 bits): a step of the K loop is kw whole tiles (one a warp), K-slices whole steps
    kg = bool(cfg.get("pk") and cfg.get("kg")) and cfg.get("kw", 1) > 1 and bits != 3
    per, n_split = _split(k, bks * cfg["kw"] if kg else bks, cfg.get("split", 1))
    bn = cfg["BN"]
    grid = (triton_cdiv(n, bn), n_split)
    ws, locks = _workspace(x.device, n_split * m * n if n_split > 1 else 1, grid[0])
    if m > 4:
        raise ValueError(f"the GEMV kernel takes M <= 4 rows, got {m}")
    zm, zw = zmode(zeros)
    if cfg.get("pk") and m == 1 and x.dtype == torch.float16 and zm != 1 and bks % 32 == 0:
        return _gemv_pk_launch(x, qweight, scales, zeros, bits, g, k, bks, bn, per, n_split, grid, ws, locks,
                               zm, zw, n_lo, out, cfg, kg)
    if cfg.get("h2") and m == 1 and x.dtype == torch.float16:  # packed half2 arithmetic (fp16 x only)
        _gemv_h2.gemv_h2_kernel[grid](
            x, qweight, scales, scales if zeros is None else zeros, out, ws, locks,
            n, k, n_lo, zw, ONES, out.stride(0), per, n_split,
            BITS=bits, GROUP=g, ZMODE=zm, BN=bn, BKS=bks, USE_WS=n_split > 1,
            EVEN_K=k % bks == 0, EVEN_N=n % bn == 0,
            num_warps=cfg.get("num_warps", 1), num_stages=cfg.get("num_stages", 1),
        )
        return out
    _gemv.gemv_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, out, ws, locks,
        m, n, k, n_lo, zw, ONES, x.stride(0), out.stride(0), per, n_split,
        BITS=bits, GROUP=g, ZMODE=zm, BM=_next_pow2(m), BN=bn, BKS=bks, USE_WS=n_split > 1,
        EVEN_K=k % bks == 0, EVEN_N=n % bn == 0, PREFETCH=bool(cfg.get("prefetch", False)),
        num_warps=cfg.get("num_warps", 1), num_stages=cfg.get("num_stages", 1),
    )
    return out


def pk_asm_enabled() -> bool:
    """Inline PTX in the pk GEMV: on a GPU unless ``AQSEARCH_PK_ASM=0`` (then its pure-Triton twin)."""
    return not interpreting() and os.environ.get("AQSEARCH_PK_ASM", "1") not in ("0", "false", "off")


@functools.lru_cache(maxsize=None)
def _pk_asm(bits: int, s: int) -> tuple[str, str]:
    if bits == 3:
        return _gemv_pk.asm_w3(0, s), _gemv_pk.asm_w3(1, s)
    if bits == 8:
        return _gemv_pk.asm_w8(s), ""
    return _gemv_pk.asm_w24(bits, s)[0], ""


def _gemv_pk_launch(x, qweight, scales, zeros, bits, g, k, bks, bn, per, n_split, grid, ws, locks, zm, zw, n_lo,
                    out, cfg, kg):
    """The f16x2 inline-PTX GEMV (``_gemv_pk``): M = 1, fp16 x, integer (packed) or symmetric zeros."""
    if x.data_ptr() % 16:  # x is read as int32 words: a misaligned view is copied once
        x = x.clone()
    s = _gemv_pk.shift_for(bits, bks)
    use_asm = pk_asm_enabled()
    a0, a1 = _pk_asm(bits, s) if use_asm else ("", "")
    pdl = ({"PDL": True, "launch_pdl": True, "PF": cfg.get("pf", 1), "LATE": bool(cfg.get("late"))}
           if cfg.get("pdl") and pdl_enabled() and x.is_cuda else {})
    kw = cfg.get("kw", 1)
    if kw > 1 and not kg and not kw_fits(bits, bks, kw):
        raise ValueError(f"a pk GEMV tile of BKS={bks} at {bits} bits does not deal evenly to kw={kw} warps")
    _gemv_pk.gemv_pk_kernel[grid](
        x, qweight, scales, scales if zeros is None else zeros, out, ws, locks,
        qweight.shape[1], k, n_lo, zw, out.stride(0), per, n_split,
        BITS=bits, GROUP=g, ZMODE=zm, BN=bn, BKS=bks, USE_WS=n_split > 1,
        EVEN_K=k % (bks * kw if kg else bks) == 0, EVEN_N=qweight.shape[1] % bn == 0, S=s, ASM=use_asm, ASM0=a0,
        ASM1=a1, STAGES=cfg.get("num_stages", 1), KW=kw, KG=kg, num_warps=cfg.get("num_warps", 1),
        num_stages=cfg.get("num_stages", 1), **pdl,
    )
    return out


def pdl_enabled() -> bool:
    """Programmatic dependent launch for configs with ``"pdl": True`` (sm_90+), unless ``AQSEARCH_PDL=0``."""
    if interpreting() or os.environ.get("AQSEARCH_PDL", "1") in ("0", "false", "off"):
        return False
    return _capability()[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def gemm(x, qweight, scales, zeros, bits, group, k, cfg, out=None):
    """``x[M, K] @ W -> [M, N]`` with the fused dequantize + ``tl.dot`` kernel (fp32 accumulation)."""
    m, n, n_lo, out = _common(x, qweight, bits, k, out)
    g = effective_group(group, k)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    per, n_split = _split(k, bk, cfg.get("split", 1))
    n_tiles = triton_cdiv(m, bm) * triton_cdiv(n, bn)
    ws, locks = _workspace(x.device, n_split * m * n if n_split > 1 else 1, n_tiles)
    # the interpreter's bf16 tl.dot is wrong: see gemm_kernel's docstring for why fp32 copies are exact
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    zm, zw = zmode(zeros)
    packed = bool(cfg.get("packed", False))
    kn = bool(cfg.get("kn", False)) and not packed
    if (packed or kn) and (bk > g or g % bk or (bits == 3 and bk % 32)):
        raise ValueError(f"the packed and kn GEMM loops need BK | group (and 32 | BK at 3 bits): BK={bk}, group={g}")
    f16w = (kn or (packed and cfg.get("f16w", False))) and x.dtype == torch.float16 and zm != 1 and not dot_f32
    _gemm.gemm_kernel[(n_tiles, n_split)](
        x, qweight, scales, scales if zeros is None else zeros, out, ws, locks,
        m, n, k, n_lo, zw, x.stride(0), out.stride(0), per, n_split,
        BITS=bits, GROUP=g, ZMODE=zm, BM=bm, BN=bn, BK=bk, GROUP_M=cfg.get("GROUP_M", 8),
        USE_WS=n_split > 1, DOT_F32=dot_f32 or x.dtype == torch.float32, PACKED=packed, KN=kn, F16W=f16w,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out


def dequant(qweight, scales, zeros, bits, group, k, dtype, cfg, out=None, n0=0, n_cols=None):
    """Weight ``[K, n_cols]`` (columns ``n0 ..`` of W, N contiguous) in ``dtype``: the input of
    dequantize-then-cuBLAS. ``out`` may be a column slice of a wider buffer (unit column stride)."""
    n = qweight.shape[1]
    n_cols = n - n0 if n_cols is None else n_cols
    g = effective_group(group, k)
    bks = min(cfg.get("BKS", 64), g)
    bn = cfg.get("BN", 256)
    if out is None:
        out = torch.empty(k, n_cols, dtype=dtype, device=qweight.device)
    n_lo = -(-k // 16) if bits == 3 else 0
    zm, zw = zmode(zeros)
    _gemm.dequant_kernel[(triton_cdiv(n_cols, bn), triton_cdiv(k, bks))](
        qweight, scales, scales if zeros is None else zeros, out, n, k, n_lo, zw, ONES, n0, n_cols, out.stride(0),
        BITS=bits, GROUP=g, ZMODE=zm, BN=bn, BKS=bks, num_warps=cfg.get("num_warps", 4),
    )
    return out


def dequant_matmul(x, qweight, scales, zeros, bits, group, k, cfg, out=None):
    """Dequantize to ``x.dtype`` then cuBLAS: wins when M is large (compute-bound).

    ``cfg["chunk"]`` > 0: ``chunk`` columns at a time into one reused ``[K, chunk]`` buffer, each
    followed by its cuBLAS matmul into the matching output columns. A chunk of a few MiB is written
    and read back inside the L2 and overwritten there by the next one, so the fp16 weight mostly
    never travels to HBM; only the packed weight does.
    """
    n = qweight.shape[1]
    chunk = int(cfg.get("chunk", 0) or 0)
    if chunk <= 0 or chunk >= n:
        w = dequant(qweight, scales, zeros, bits, group, k, x.dtype, cfg)
        return x @ w if out is None else torch.matmul(x, w, out=out)
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    buf = torch.empty(k, chunk, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, chunk):
        c = min(chunk, n - n0)
        w = dequant(qweight, scales, zeros, bits, group, k, x.dtype, cfg, out=buf[:, :c], n0=n0, n_cols=c)
        torch.mm(x, w, out=out[:, n0:n0 + c])  # a column slice (row stride N): cuBLAS writes it in place
    return out


def run(x, qweight, scales, zeros, bits, group, k, cfg, out=None):
    """Launch whichever path ``cfg["path"]`` names."""
    fn = {"gemv": gemv, "gemm": gemm, "dequant": dequant_matmul}[cfg["path"]]
    return fn(x, qweight, scales, zeros, bits, group, k, cfg, out=out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
