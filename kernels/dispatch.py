"""Pick a kernel and config for a quantized matmul, by measurement, and remember the choice.

Measured on an H200 (``benchmarks/results/kernels.jsonl``), the winning path by M: the GEMV for
M <= 2, GEMV or the fused GEMM at M = 4, the fused GEMM (split-K) at M = 8..16, and
dequantize-then-cuBLAS from M = 64 on. The tuner measures this per problem; candidates that are
never fastest still stay in the list because the crossover moves with the shape.

Paths: ``gemv`` (M <= 4, CUDA cores, split-K), ``gemm`` (``tl.dot``, two K loops: ``slots`` loads
each word once, the gather loop reads words per row of the tile), ``dequant`` (dequantize to the
activation dtype, then cuBLAS). For a key ``(bits, group, sym, dtype, M bucket, N, K, GPU)`` the
tuner times a pruned candidate list with ``triton.testing.do_bench`` (L2 flushed before each run)
and caches the winner in memory and in ``$AQSEARCH_CACHE/kernels/tune-<gpu>-<triton>.json``;
``_tuned.py`` ships choices measured on an H200. ``AQSEARCH_AUTOTUNE=0`` turns measuring off (then
the shipped table or a heuristic decides).

>>> [c["path"] for c in candidates(1, 4096, 4096, bits=4, group=128, sms=132)][:1]
['gemv']
>>> sorted({c["path"] for c in candidates(1024, 4096, 4096, bits=4, group=128, sms=132)})
['dequant', 'gemm']
>>> key(3, 4096, 4096, 4, 128, False, torch.float16)  # M = 3 shares the M = 4 bucket
'4:128:a:float16:4:4096:4096'
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import torch

_LOCK = threading.Lock()
_MEM: dict[str, dict] = {}
_DISK_LOADED: set[str] = set()

# Tile K of the GEMV and of the GEMM's slot loop, per bits (a GEMV tile of R word rows x 8 columns a
# thread keeps ~64 words in registers; the slot loop needs >= 16 word rows for tl.dot).
_GEMV_BKS = {2: (128, 64), 3: (64, 32), 4: (64, 32), 8: (32, 32)}
_SLOT_BK = {2: 256, 3: 512, 4: 128, 8: 64}


def m_bucket(m: int) -> int:
    """1, 2, 4, 8, ... 4096: configs are shared inside a bucket."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(tiles: int, k: int, step: int, sms: int, per_sm: int = 2) -> int:
    """K-slices so that tiles * slices is about ``per_sm`` programs an SM, each with >= 2 steps."""
    want = max(1, round(per_sm * sms / max(1, tiles)))
    return max(1, min(want, k // (2 * step)))


def candidates(m: int, n: int, k: int, bits: int, group: int, sms: int) -> list[dict]:
    """The pruned config list for one problem, best guess first."""
    g = group
    out: list[dict] = []
    if m <= 4:
        big, small = (min(b, g) for b in _GEMV_BKS[bits])
        if m == 1:  # (BN, warps, BKS, prefetch); one warp a program, 8-16 columns a thread
            shapes = [(256, 1, big, False), (256, 1, small, True), (512, 1, small, True)]
        elif m == 2:
            shapes = [(256, 1, small, False), (512, 1, small, False)]
        else:
            shapes = [(256, 1, small, False)]
        for bn, nw, bks, pf in shapes:
            s = _split_for(-(-n // bn), k, bks, sms, per_sm=4)
            mults = (2, 1, 4) if m == 1 else (1, 2)  # the first is the untuned default
            for split in dict.fromkeys(min(f * s, max(1, k // bks)) for f in mults):
                out.append({"path": "gemv", "BN": bn, "BKS": bks, "num_warps": nw, "split": split, "prefetch": pf})
    if m >= 2:
        bm = 16 if m <= 16 else (64 if m <= 64 else 128)
        bn = 64 if m <= 16 else 128
        nw = 8 if bm == 128 else 4
        tiles = -(-m // bm) * -(-n // bn)
        sbk = _SLOT_BK[bits]
        if bits != 3:  # 3-bit slots need BK = 512: long compiles
            s = _split_for(tiles, k, sbk, sms) if tiles < sms else 1
            out.append({"path": "gemm", "slots": True, "BM": bm, "BN": bn, "BK": sbk, "num_warps": nw,
                        "num_stages": 3, "split": s})
        gbk = min(g, 64)
        s = _split_for(tiles, k, gbk, sms) if tiles < sms else 1
        out.append({"path": "gemm", "slots": False, "BM": bm, "BN": bn, "BK": gbk, "num_warps": nw,
                    "num_stages": 3, "split": s})
        if m >= 512 and bits != 3:  # 3-bit gathers two word tiles: too much shared memory at BN=256
            out.append({"path": "gemm", "slots": False, "BM": 128, "BN": 256, "BK": gbk, "num_warps": 8,
                        "num_stages": 3, "split": 1})
    if m >= 64:
        out.append({"path": "dequant", "BN": 256, "BKS": min(g, 64), "num_warps": 4})
    return out


def _cache_file() -> Path:
    import triton

    root = os.environ.get("AQSEARCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aqsearch")
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    return Path(root, "kernels", f"tune-{gpu}-triton{triton.__version__}.json")


def _load_disk() -> None:
    f = _cache_file()
    if str(f) in _DISK_LOADED:
        return
    _DISK_LOADED.add(str(f))
    try:
        _MEM.update(json.loads(f.read_text()))
    except (OSError, ValueError):
        pass


def _save_disk() -> None:
    f = _cache_file()
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_MEM, indent=1, sort_keys=True))
        os.replace(tmp, f)  # atomic: readers see the old or the new file
    except OSError:
        pass


def key(m, n, k, bits, group, sym, dtype) -> str:
    return f"{bits}:{group}:{'s' if sym else 'a'}:{str(dtype).replace('torch.', '')}:{m_bucket(m)}:{n}:{k}"


def _shipped(kk: str) -> dict | None:
    from ._tuned import TUNED

    gpu = torch.cuda.get_device_name()
    return TUNED.get(gpu, {}).get(kk)


def autotune_enabled() -> bool:
    return os.environ.get("AQSEARCH_AUTOTUNE", "1") not in ("0", "false", "off")


_TUNE_STREAM: list = []


def time_config(fn, copies: int = 1, target_ms: float = 3.0) -> float:
    """Milliseconds a call of ``fn(i)`` (i: which weight copy) takes inside a CUDA graph that cycles
    through ``copies`` weight copies: launch gaps and L2 reuse between calls (the weights of one call
    are not in cache for the next) as in a captured decode step."""
    if not _TUNE_STREAM:
        _TUNE_STREAM.append(torch.cuda.Stream())
    s = _TUNE_STREAM[0]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (compiles; the split-K workspace of this stream)
        for i in range(copies):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(copies):
            fn(i)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    reps = max(2, min(100, int(target_ms / max(e0.elapsed_time(e1), 1e-3))))
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (reps * copies)


def choose(x, qweight, scales, zeros, bits, group, k, tune: bool | None = None) -> dict:
    """Config for ``x[M, K] @ W``: cached, shipped, measured now, or the first candidate."""
    from .launch import run
    from .packing import effective_group

    m, n = x.shape[0], qweight.shape[1]
    g = effective_group(group, k)
    kk = key(m, n, k, bits, g, zeros is None, x.dtype)
    with _LOCK:
        _load_disk()
        hit = _MEM.get(kk)
    if hit is not None:
        return hit
    cands = candidates(m, n, k, bits, g, _sm_count(x.device))
    tune = autotune_enabled() if tune is None else tune
    if not tune or torch.cuda.is_current_stream_capturing():
        return _shipped(kk) or cands[0]
    best, best_t, times = None, float("inf"), {}
    wbytes = sum(t.numel() * t.element_size() for t in (qweight, scales, zeros) if t is not None)
    l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 50 << 20)
    n_copies = max(1, min(16, -(-3 * l2 // wbytes)))  # > 3x the L2 in flight: no call hits the last one's
    ws = [(qweight, scales, zeros)] + [tuple(None if t is None else t.clone() for t in (qweight, scales, zeros))
                                       for _ in range(n_copies - 1)]
    for cfg in cands:
        try:
            try:
                t = time_config(lambda i: run(x, *ws[i], bits, group, k, cfg), copies=n_copies)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:
                if "captur" not in str(e).lower():
                    raise
                import triton.testing  # graphs refused here: time single launches with the L2 flushed

                t = triton.testing.do_bench(lambda: run(x, qweight, scales, zeros, bits, group, k, cfg),
                                            warmup=2, rep=10, return_mode="median")
        except Exception as e:  # a config the compiler or the GPU refuses: skip it, say why
            warnings.warn(f"aqsearch.kernels: config {cfg} failed for {kk}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        times[json.dumps(cfg, sort_keys=True)] = t
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"aqsearch.kernels: no kernel config ran for {kk}")
    best = dict(best, ms=round(best_t, 5), times=times)  # times: every candidate's, for the record
    with _LOCK:
        _MEM[kk] = best
        _save_disk()
    return best


def matmul(x, qweight, scales, zeros, bits, group, k, cfg: dict | None = None):
    """``x[M, K] @ W -> [M, N]`` on the GPU with the chosen (or given) config."""
    from .launch import run

    if cfg is None:
        cfg = choose(x, qweight, scales, zeros, bits, group, k)
    return run(x, qweight, scales, zeros, bits, group, k, cfg)


_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
