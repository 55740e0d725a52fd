"""The README's GPU tables (``benchmarks/report.py`` renders them): kernels, decode, decode attention, launch overhead,
ceilings."""

from __future__ import annotations

from pathlib import Path

from aqsearch.bench import latest as _latest, read_results

RESULTS = Path(__file__).resolve().parent / "results"


def kernels_rows(recs: list[dict]) -> str:
    """M = 1, 8, 1024, 4096 points at group 128 (every bit width) on the newest run's GPU, each from the newest
    run that measured it, against cuBLAS fp16 in that same run."""
    recs = [r for r in recs if r.get("bench", "kernels") == "kernels"]
    if not recs:
        return ""
    machine = recs[-1].get("env", {}).get("machine", "")
    recs = [r for r in recs if r.get("env", {}).get("machine", "") == machine]
    cub = {(r.get("run", ""), r["K"], r["N"], r["M"]): r for r in recs if r["kind"] == "cublas"}
    copy = {r.get("run", ""): r["copy_gbps"] for r in recs if r["kind"] == "copy"}
    q = _latest([r for r in recs if r["kind"] == "quant" and r["M"] in (1, 8, 1024, 4096) and r["group"] == 128
                 and r.get("dtype", "float16") == "float16"],  # file order: a later run's point replaces an earlier one
                lambda r: (r["K"], r["N"], r["M"], r["scheme"]))
    runs = list(dict.fromkeys(r.get("run", "") for r in sorted(q, key=lambda r: r["time"])))
    lines = [f"{machine}; runs " + ", ".join(f"`{u}` (copy bandwidth {copy.get(u, float('nan')):,.0f} GB/s)"
                                             for u in runs)
             + f"; max relative error over the {len(q)} points "
             f"{max([r.get('max_rel_err', r['rel_err']) for r in q] or [float('nan')]):.1e}.", "",
             "| K x N | M | scheme | path | us | GB/s | % of copy | cuBLAS fp16 us | x cuBLAS | rel. err | run |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(q, key=lambda r: (r["M"], r["K"], r["N"], -r["bits"])):
        c = cub.get((r.get("run", ""), r["K"], r["N"], r["M"]))
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['scheme']} | {r.get('path', '')} | {r['us']:.1f} | "
                     f"{r['gbps']:,.0f} | {100 * r['frac_copy']:.0f} % | {c['us'] if c else float('nan'):.1f} | "
                     f"{r['speedup']:.2f} | {r['rel_err']:.1e} | {runs.index(r.get('run', '')) + 1} |")
    return "\n".join(lines)


def kernels_table() -> str:
    return kernels_rows(read_results(RESULTS / "kernels.jsonl"))


def decode_table() -> str:
    """benchmarks/decode.py: tokens/s against fp16 through the same fused path, and against transformers' stock
    modules where the record has them."""
    recs = _latest(read_results(RESULTS / "decode.jsonl"),
                   lambda r: (r["env"]["machine"], r.get("model", "smollm2-135m"), r["scheme"], r["batch"]))
    lines = ["| machine | model | scheme | batch | CUDA graphs | fp16 stock tok/s | fp16 tok/s | quantized tok/s | "
             "x fp16 | x fp16 stock | launches besides matmuls (fp16) | bytes total (fp16) | run |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(recs, key=lambda r: (r["env"]["machine"], r.get("model", "smollm2-135m"), r["batch"], r["bpw"])):
        stock, quant = r.get("base_stock_tokens_per_s"), r["quant_tokens_per_s"]
        stock_s = "" if stock is None else f"{stock:,.0f}"
        x_stock = "" if stock is None else f"{quant / stock:.2f}"
        n = r.get("quant_launches_per_step")
        launches = "" if n is None else f"{n} ({r.get('base_launches_per_step')})"
        lines.append(f"| {r['env']['machine']} | {r.get('model', 'smollm2-135m')} | {r['scheme']} | {r['batch']} | "
                     f"{r['graphs']} | {stock_s} | {r['base_tokens_per_s']:,.0f} | {quant:,.0f} | {r['speedup']:.2f} | "
                     f"{x_stock} | {launches} | {r['bytes_total']:,} ({r['base_bytes_total']:,}) | {r.get('run', '')} |")
    return "\n".join(lines)


def decode_attn_table() -> str:
    """benchmarks/decode_attn.py: one layer's decode attention at the 8B shape, each variant's newest record."""
    recs = _latest(read_results(RESULTS / "decode_attn.jsonl"),
                   lambda r: (r["env"]["machine"], r["settings"]["batch"], r["variant"]))
    lines = ["| machine | batch | cache rows (valid) | variant | us a layer | rel. err | run |",
             "|---|---:|---:|---|---:|---:|---|"]
    for r in recs:
        s = r["settings"]
        lines.append(f"| {r['env']['machine']} | {s['batch']} | {s['length']} ({s['valid']}) | {r['variant']} | "
                     f"{r['us']:.2f} | {r['rel_err']:.1e} | {r['run']} |")
    return "\n".join(lines)


def launch_overhead_table() -> str:
    """benchmarks/gemv_overhead.py: each series' fit of time against bytes (M = 1, six shapes), newest run each."""
    recs = read_results(RESULTS / "gemv_overhead.jsonl")
    empty = [r for r in recs if r["series"] == "empty"]
    fits = _latest([r for r in recs if "t0_us" in r], lambda r: (r["env"]["machine"], r["series"]))
    lines = []
    if empty:
        e = empty[-1]
        lines += [f"An empty kernel costs {e['us_per_kernel']:.2f} us a CUDA-graph node ({e['env']['machine']}, "
                  f"run `{e['run']}`).", ""]
    lines += ["| machine | series | config | t0 us | GB/s (slope) | us at 8192x8192 | us at 4096x28672 | run |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(fits, key=lambda r: (r["env"]["machine"], r.get("bits", 0), r["series"])):
        at = {(p.get("K"), p.get("N")): p["us"] for p in r["points"]}
        cfg = r.get("config")
        cfg_s = "" if not cfg else " ".join(f"{k}={v}" for k, v in cfg.items() if k != "pk")
        lines.append(f"| {r['env']['machine']} | {r['series']} | {cfg_s} | {r['t0_us']:.2f} | {r['bw_gbps']:,.0f} | "
                     f"{at.get((8192, 8192), float('nan')):.2f} | {at.get((4096, 28672), float('nan')):.2f} | "
                     f"{r['run']} |")
    return "\n".join(lines)


def _kg_cell(hit, pct) -> str:
    if hit is None:
        return ""
    q, b, bw, run = hit
    return f"{pct(b, q['us'], bw)} (BN {q['BN']}, kw {q['kw']}, split {q['split']}; `{run}`)"


def ceiling_table() -> str:
    """benchmarks/ceiling.py: at M = 1 the fastest Triton reader of the GEMV's words (alone, with our split-K
    epilogue, with no split-K) beside our GEMV; at M = 1024 / 4096 Triton fp16 GEMMs with no dequantization
    beside cuBLAS and our fused paths. Newest record a point."""
    recs = read_results(RESULTS / "ceiling.jsonl")
    point = lambda r: (r["env"]["machine"], r["K"], r["N"], r["bits"])  # noqa: E731
    m1 = _latest([r for r in recs if r["series"] == "m1_read"], point)
    gemm = _latest([r for r in recs if r["series"] == "gemm"], lambda r: (r["env"]["machine"], r["M"], r["K"], r["N"]))
    kg: dict = {}  # our GEMV with kg (warps take whole tiles), split-K 1-4: the newest probe's fastest config
    for r in _latest([r for r in recs if r["series"] == "m1_kg"], point):
        for q in r["ours_no_split"]:
            if q.get("us") and (point(r) not in kg or q["us"] < kg[point(r)][0]["us"]):
                kg[point(r)] = (q, r["ours"]["bytes"], r["copy_gbps"], r["run"])
    pct = lambda b, us, bw: f"{us:.2f} ({100 * b / us / 1e3 / bw:.0f} %)"  # noqa: E731
    lines = ["| machine | K x N | bits | words MB | Triton reader us (% of copy) | + split-K epilogue | reader, no split-K "
             "| our GEMV us (% of copy) | our GEMV, kg (config) | run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(m1, key=lambda r: (r["env"]["machine"], -r["K"], r["bits"])):
        b, bw, best, nos = r["weight_bytes"], r["copy_gbps"], r["best"], r.get("best_no_split")
        red = best.get("reduce_us")
        lines.append(f"| {r['env']['machine']} | {r['K']}x{r['N']} | {r['bits']} | {b / 1e6:.1f} | {pct(b, best['us'], bw)} "
                     f"| {'' if red is None else pct(b, red, bw)} | {'' if nos is None else pct(b, nos['us'], bw)} | "
                     f"{pct(r['ours']['bytes'], r['ours']['us'], bw)} | {_kg_cell(kg.get(point(r)), pct)} "
                     f"| {r['run']} |")
    kinds = ("triton_fp16", "triton_fp16_tma", "dequant_cublas", "kn", "packed_f16w")
    lines += ["", "| machine | M | K x N | cuBLAS fp16 us | " + " | ".join(f"{k} (x cuBLAS)" for k in kinds) + " | run |",
              "|---|---:|---|---:|" + "---:|" * len(kinds) + "---|"]
    for r in sorted(gemm, key=lambda r: (r["env"]["machine"], r["M"], -r["K"])):
        cells = [f"{r['best'][k]['us']:.1f} ({r['best'][k]['x_cublas']:.2f})" if k in r["best"] else "" for k in kinds]
        lines.append(f"| {r['env']['machine']} | {r['M']} | {r['K']}x{r['N']} | {r['cublas_us']:.1f} | "
                     + " | ".join(cells) + f" | {r['run']} |")
    return "\n".join(lines)
