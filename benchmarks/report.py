"""Regenerate the README's tables from benchmarks/results/*.jsonl.

    python benchmarks/report.py          # rewrites the blocks between <!-- table:NAME --> markers
    python benchmarks/report.py --check  # exit 1 if a table is out of date (tests/test_readme.py)

Each table keeps, for every key (scheme, machine, settings), the newest record.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from aqsearch.bench import latest as _latest, read_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_front import front_table  # noqa: E402  (the front table, a module of its own)
from report_gpu import ceiling_table, decode_attn_table, decode_table, kernels_table, launch_overhead_table  # noqa: E402

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
RESULTS = HERE / "results"


def uniform_table() -> str:
    recs = _latest(read_results(RESULTS / "uniform.jsonl"),
                   lambda r: (r["env"]["machine"], r["eval_windows"], r["seqlen"], r["scheme"]))
    lines = ["| machine | eval tokens | scheme | bpw | bytes | KL mean | KL p99 | top-1 | ppl ratio | ppl (fp) | s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(recs, key=lambda r: (r["env"]["machine"], r["tokens"], -r["bpw"], r["kl_mean"])):
        lines.append(f"| {r['env']['machine']} | {r['tokens']:,} | {r['scheme']} | {r['bpw']:.3f} | {r['bytes']:,} | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{r['ppl_ref']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def progressive_table() -> str:
    recs = read_results(RESULTS / "progressive.jsonl")
    lines = ["| machine | settings | job | budget / scheme | early stop | bytes | bpw | KL mean | KL p99 | top-1 | "
             "ppl ratio | train steps (of) | s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        what = r.get("budget") if r["job"] != "trained" else r.get("scheme")
        if r["job"] == "uniform":
            what = f"{r['budget']}: {r['scheme']}"
        es = {True: "on", False: "off"}.get(r.get("early_stop"), "")
        steps = ""
        if r.get("train_steps") is not None:
            steps = f"{r['train_steps']:,}" + (f" ({r['train_steps_without_early_stop']:,})"
                                                if r.get("train_steps_without_early_stop") else "")
        sett = f"{r['calib_windows']}x{r['calib_seqlen']}, {r['steps']} steps, eval {r['tokens']:,} tok"
        lines.append(f"| {r['env']['machine']} | {sett} | {r['job']} | {what} | {es} | {r['bytes']:,} | {r['bpw']:.3f} | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl_ratio']:.4f} | {steps} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def regressor_table() -> str:
    recs = read_results(RESULTS / "regressor.jsonl")
    if not recs:
        return ""
    r = recs[-1]
    by = ", ".join(f"{v['curves']} curves of {k} steps: {100 * v['median_rel_error']:.1f} %" for k, v in r["by_steps"].items())
    return (f"| curves | median rel. error | p90 | 80 % interval covers | power law (median) | last value seen (median) |\n"
            f"|---:|---:|---:|---:|---:|---:|\n"
            f"| {r['curves']} | {100 * r['median_rel_error']:.1f} % | {100 * r['p90_rel_error']:.1f} % | "
            f"{100 * r['interval_80_coverage']:.0f} % | {100 * r['powerlaw_median_rel_error']:.1f} % | "
            f"{100 * r['last_seen_median_rel_error']:.1f} % |\n\nBy run length: {by}.")


def search_table() -> str:
    recs = read_results(RESULTS / "search.jsonl")
    out = []
    studies = list(dict.fromkeys(r["study"] for r in recs if "study" in r))  # in order of first record
    for name in studies:
        last = {b: [r for r in recs if r.get("study") == name and r["bench"] == b][-1:]
                for b in ("search-study", "search-knapsack", "search-compare")}
        for r in last["search-study"]:
            st = r["settings"]
            seeds = f", knapsack allocations at {st['warm_knapsack']} budgets as first trials" if st.get("warm_knapsack") else ""
            out += ["" if out else None, f"**Study `{name}`** on {r['env']['machine']}: {r['trials']} trials, "
                    f"{st['granularity']} units, {st['sampler']} (seed {st['seed']}){seeds}, scored on "
                    f"{st['eval_tokens']:,} held-out validation tokens, "
                    f"{'trained units' if st['train'] else 'round-to-nearest'}; {len(r['front'])} front points, "
                    f"final hypervolume {r['hypervolume'][-1]:.3f}, "
                    + (f"{r['trial_seconds']:.0f} s in trials." if "trial_seconds" in r else f"{r['seconds']:.0f} s (last run).")]
        for r in last["search-knapsack"]:
            out += ["", f"Knapsack baseline (unit errors measured in {r['measure_seconds']:.0f} s), scored like the trials:",
                    "", "| budget | knapsack bytes | knapsack KL | front bytes | front KL (trial) | search lower |",
                    "|---|---:|---:|---:|---:|---|"]
            for x in r["rows"]:
                out.append(f"| {x['budget']} | {x['knapsack_bytes']:,} | {x['knapsack_kl']:.4f} | {x['front_bytes'] or 0:,} | "
                           f"{x['front_kl'] or float('nan'):.4f} ({x['front_trial']}) | {'yes' if x['search_wins'] else 'no'} |")
        for r in last["search-compare"]:
            out += ["", "Scored on the WikiText-2 test set:", "",
                    "| kind | name / trial | bytes | bpw | KL mean | top-1 | ppl ratio | dominated by the front |",
                    "|---|---|---:|---:|---:|---:|---:|---|"]
            for x in sorted(r["rows"], key=lambda x: (x["kind"], x["bytes"])):
                dom = "" if x["kind"] == "front" else ("yes" if x.get("dominated_by_front") else "no")
                out.append(f"| {x['kind']} | {x.get('name') or x.get('trial')} | {x['bytes']:,} | {x['bpw']:.3f} | "
                           f"{x['kl_mean']:.4f} | {x['top1']:.3f} | {x['ppl_ratio']:.4f} | {dom} |")
    out = [x for x in out if x is not None]
    for r in [r for r in recs if r["bench"] == "search-pruning"][-1:]:
        on, off = r["prune_on"], r["prune_off"]
        out += ["", f"Pruning on against off ({r['trials']} trials each, same seed, {r['env']['machine']}): training steps "
                f"{on['train_steps']['run']:,} against {off['train_steps']['run']:,} "
                f"({100 * r['compute_saved']:.0f} % saved, {on['train_steps']['pruned_trials']} trials pruned); "
                f"hypervolume {on['hypervolume']:.4f} against {off['hypervolume']:.4f} "
                f"({100 * r['hypervolume_lost']:.1f} % lost)."]
    return "\n".join(out)


def trainer_table() -> str:
    """benchmarks/trainer.py: one row per (machine, settings, scheme, amp), the newest."""
    recs = _latest(read_results(RESULTS / "trainer.jsonl"),
                   lambda r: (r["env"]["machine"], r["calib_windows"], r["calib_seqlen"], r["steps"], r["tokens"],
                              r["scheme"], r["amp"]))
    lines = ["| machine | settings | scheme | zero | bpw | bytes | train s | ms/step | GPUs side by side | KL mean | "
             "KL p99 | top-1 | ppl ratio |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(recs, key=lambda r: (r["env"]["machine"], r["tokens"], r["zero"], -r["bpw"])):
        sett = (f"{r['calib_windows']}x{r['calib_seqlen']}, {r['steps']} steps, {'bf16' if r['amp'] else 'fp32'}, "
                f"eval {r['tokens']:,} tok")
        lines.append(f"| {r['env']['machine']} | {sett} | {r['scheme']} | {r['zero']} | {r['bpw']:.4f} | {r['bytes']:,} | "
                     f"{r['train_seconds']:.1f} | {1e3 * r['seconds_per_step']:.1f} | {r.get('workers', 1)} | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['ppl_ratio']:.4f} |")
    return "\n".join(lines)


def compose_gap_table() -> str:
    """benchmarks/compose_gap.py: one row per (machine, scheme, settings); a run of some ``--rows`` only
    updates those columns of the earlier runs of the same settings."""
    key = lambda r: (r["env"]["machine"], r["scheme"], tuple(sorted((k, str(v)) for k, v in r["settings"].items())))  # noqa: E731
    merged: dict[tuple, dict] = {}
    for r in read_results(RESULTS / "compose_gap.jsonl"):
        old = merged.get(key(r))
        merged[key(r)] = {**r, "rows": {**(old["rows"] if old else {}), **r["rows"]}}
    cols = ("rtn", "bank", "rtn_prefix", "polish_from_bank", "polish_from_fp", "trainer")
    lines = ["| machine | scheme | calibration | steps (polish) | test tokens | RTN | bank composed | "
             "trained on RTN prefix, composed | polish from bank | polish from model | trainer |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(merged.values(), key=lambda r: (r["env"]["machine"], r["scheme"])):
        st = r["settings"]
        kl = " | ".join(f"{r['rows'][c]['kl_mean']:.4f}" if c in r["rows"] else "-" for c in cols)
        lines.append(f"| {r['env']['machine']} | {r['scheme']} | {st['windows']}x{st['seqlen']} | {st['steps']} "
                     f"({st['polish_steps']}) | {st['test_tokens']:,} | {kl} |")
    return "\n".join(lines)


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr  # scikit-learn's dependency (the search extra)

    return float(spearmanr(a, b).statistic)


def plan_rank_table() -> str:
    """benchmarks/plan_rank.py: every plan of every run in the order measured, then per run the rank
    correlation (Spearman) of each bank number with the polished KL."""
    recs = read_results(RESULTS / "plan_rank.jsonl")
    lines = ["| machine | run | calibration, steps (polish), test tokens | plan | blocks (large/middle/small) | bytes | "
             "bank summed error | KL composed | KL polished |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    runs: dict[tuple, list[dict]] = {}
    for r in recs:
        n = "/".join(str(v) for v in r["blocks"].values())
        st = r["settings"]
        how = f"{st['windows']}x{st['seqlen']}, {st['steps']} ({st['polish_steps']}), {st['test_tokens']:,}"
        lines.append(f"| {r['env']['machine']} | {r['run']} | {how} | {r['plan']} | {n} | {r['bytes']:,} | "
                     f"{r['bank_error_sum']:.4f} | {r['kl_composed']:.4f} | {r['kl_polished']:.4f} |")
        runs.setdefault((r["env"]["machine"], r["run"]), []).append(r)
    lines += ["", "| machine | run | plans | Spearman: bank summed error vs polished KL | KL composed vs polished KL |",
              "|---|---|---:|---:|---:|"]
    for (machine, run), rs in runs.items():
        pol = [r["kl_polished"] for r in rs]
        lines.append(f"| {machine} | {run} | {len(rs)} | {_spearman([r['bank_error_sum'] for r in rs], pol):.2f} | "
                     f"{_spearman([r['kl_composed'] for r in rs], pol):.2f} |")
    return "\n".join(lines)


def _gib(n) -> str:
    return f"{n / 2**30:.1f}" if n else "-"


def scale_rows(recs: list[dict]) -> str:
    """benchmarks/scale.py: the newest run of each (machine, mode): costs by shape, then the end-to-end estimate."""
    recs = [r for r in recs if r.get("bench") == "scale"]
    last: dict[tuple, str] = {}
    for r in recs:
        last[(r["env"]["machine"], r["mode"])] = r["run"]
    out = ["| machine | mode | shape | params | blocks | stream s/block | candidate s (menu mean, min-max) | "
           "prefix s | candidate s / G block params | bank GPU peak GiB | host peak RSS GiB | record B (weights B) | "
           "trial s (tokens) | polish s/block (blocks) | polish whole model s | polish GPU peak GiB | blocks resident |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    est, per_scheme = [], []
    for (machine, mode), run in last.items():
        by = {(r["shape"], r["stage"]): r for r in recs if r["run"] == run and r["env"]["machine"] == machine}
        shapes = sorted({k[0] for k in by}, key=lambda n: by[(n, "build")]["model"]["params"] if (n, "build") in by else 0)
        for n in shapes:
            b, st, bk, sy, po, e = (by.get((n, k), {}) for k in ("build", "stream", "bank", "study", "polish", "estimate"))
            info = (b or e).get("model", {})
            cs = [x["candidate_s"] for x in bk.get("schemes", {}).values()]
            pre = [x["prefix_s"] for x in bk.get("schemes", {}).values()]
            d = e.get("derived", {})
            f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"  # noqa: E731
            cand = f"{sum(cs) / len(cs):.2f} ({min(cs):.2f}-{max(cs):.2f})" if cs else "-"
            rec_b = (f"{bk['record_json_bytes_mean']:,.0f} ({bk['weights_bytes_unpacked_mean']:,.0f})" if bk else "-")
            trial = f"{sy['trial_s']:.2f} ({sy['eval_tokens']:,})" if sy else "-"
            pol = f"{po['per_block_full_steps_s']:.2f} ({po['blocks_polished']})" if po else "-"
            host_peak = max([x.get("memory", {}).get("host_peak_rss_bytes", 0) for x in (b, st, sy, po)] +
                            [x.get("host_peak_rss_bytes", 0) for x in bk.get("schemes", {}).values()])
            npar = info.get("params", 0)
            size = f"{npar / 1e9:.2f} G" if npar >= 1e9 else f"{npar / 1e6:.1f} M"
            out.append(f"| {machine} | {mode} | {n} | {size} | {info.get('config', {}).get('num_hidden_layers', '-')} | "
                       f"{f(sum(st['stream_block_s']) / len(st['stream_block_s']) if st else None, '.2f')} | "
                       f"{cand} | {f(sum(pre) / len(pre) if pre else None, '.2f')} | {f(d.get('candidate_s_per_gparam'), ',.0f')} | "
                       f"{_gib(bk.get('gpu_peak_bytes_max'))} | {_gib(host_peak)} | {rec_b} | {trial} | {pol} | "
                       f"{f(d.get('polish_model_s'), ',.0f')} | {_gib(po.get('memory', {}).get('gpu_peak_bytes'))} | "
                       f"{f(e.get('resident_blocks_max'), '.2f')} |")
            if bk:
                per_scheme.append((machine, mode, n, bk["schemes"]))
            if n == "8b" and e.get("estimate") and mode == "full":  # a small run's estimate means nothing
                est.append((machine, mode, e))
    menu = list(dict.fromkeys(sch for *_, rows in per_scheme for sch in rows))
    if per_scheme:
        out += ["", "Seconds a candidate, by scheme (at the run's steps; * measured to the end, the others extrapolated; in brackets "
                "the racing prefix):", "", "| machine | mode | shape | " + " | ".join(menu) + " | extrapolation check |",
                "|---|---|---|" + "---:|" * len(menu) + "---|"]
        for machine, mode, n, rows in per_scheme:
            cells = []
            for sch in menu:
                x = rows.get(sch)
                cells.append("-" if x is None else f"{x['candidate_s']:.2f}{'*' if x['candidate_s_measured'] else ''} "
                                                   f"({x['prefix_s']:.2f})")
            chk = [f"{sch}: extrapolated {x['candidate_s_extrapolated']:.2f} against {x['candidate_s_measured']:.2f}"
                   for sch, x in rows.items() if x["candidate_s_measured"]]
            out.append(f"| {machine} | {mode} | {n} | " + " | ".join(cells) + f" | {'; '.join(chk) or '-'} |")
    if not est:
        return "\n".join(out)
    out += ["", "End-to-end estimate for the 8B shape (seconds; one process a GPU; `today`: 200 trials each one held-out "
            "evaluation, polish at 200 steps; `lean`: trials scored from bank scores, polish at 50 steps; both race 10 "
            "plans at 20 % and polish the top 5 plans and the uniform hull of 8 schemes):", "",
            "| machine | mode | pipeline | hosts x GPUs | bank | study | plan racing | polish | total | hours |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for machine, mode, e in est:
        for name, v in e["estimate"].items():
            for r in v["rows"]:
                out.append(f"| {machine} | {mode} | {name} | {r['hosts']} x {r['gpus_per_host']} | {r['bank_s']:,.0f} | "
                           f"{r['study_s']:,.0f} | {r['race_s']:,.0f} | {r['polish_s']:,.0f} | {r['total_s']:,.0f} | "
                           f"{r['total_s'] / 3600:.2f} |")
            vd = v["verdict_4gpu"]
            if vd["within"]:
                notes.append(f"{machine} ({mode}), `{name}` on 4 GPUs: within {vd['target_s'] / 3600:.0f} h.")
            else:
                must = vd["dominant_must_lose"]
                how = (f"it must lose {100 * must:.0f} % ({vd['dominant_speedup_needed']:.1f}x faster)" if must < 1
                       else "even removing it would not be enough")
                notes.append(f"{machine} ({mode}), `{name}` on 4 GPUs: {vd['over_s'] / 3600:.2f} h over "
                             f"{vd['target_s'] / 3600:.0f} h; the {vd['dominant']} stage dominates and {how}.")
    return "\n".join(out + [""] + notes)


def scale_table() -> str:
    return scale_rows(read_results(RESULTS / "scale.jsonl"))


def export_table() -> str:
    """benchmarks/export_check.py: each format's export read back, its held-out KL against aqsearch eval's."""
    lines = ["| machine | plan | bpw | eval tokens | format | read by | KL (export) | KL (aqsearch eval) | rel. diff | "
             "bytes (quantized layers) | plan bytes | bookkeeping bytes |", "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in read_results(RESULTS / "export.jsonl"):
        bpw = "-" if r["plan_bpw"] is None else f"{r['plan_bpw']:.3f}"
        head = f"| {r['env']['machine']} | {r['plan']} | {bpw} | {r['eval_tokens']:,} | "
        for row in r["rows"]:
            if row["refused"]:
                lines.append(head + f"{row['format']} | refused: {row['refused']} | | | | | | |")
                continue
            lines.append(head + f"{row['format']} | {row['route']} | {row['kl_mean']:.4f} | {row['kl_eval_cli']:.4f} | "
                         f"{row['kl_rel_diff']:.1e} | {row['bytes']:,} | {row['plan_bytes']:,} | {row['bookkeeping_bytes']:,} |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"front": front_table, "export": export_table, "trainer": trainer_table, "search": search_table, "uniform": uniform_table, "progressive": progressive_table,
                                        "regressor": regressor_table, "kernels": kernels_table, "decode": decode_table,
                                        "decode_attn": decode_attn_table, "launch_overhead": launch_overhead_table, "ceiling": ceiling_table,
                                        "compose_gap": compose_gap_table, "plan_rank": plan_rank_table,
                                        "scale": scale_table}


def _pattern(name: str) -> re.Pattern:
    """The block of table ``name``: (opening marker, body, closing marker)."""
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)(<!-- /table:{name} -->)", re.S)


def render(text: str) -> str:
    for name, fn in TABLES.items():
        pat = _pattern(name)
        if pat.search(text):
            text = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Regenerate the README's tables from benchmarks/results/*.jsonl")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the tables that are stale")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = render(text)
    if args.check:
        stale = [n for n in TABLES if _block(text, n) != _block(new, n)]
        if stale:
            print(f"README tables out of date with benchmarks/results: {', '.join(stale)} "
                  "(run python benchmarks/report.py)", file=sys.stderr)
            return 1
        return 0
    if new != text:
        from aqsearch.io import atomic_path

        with atomic_path(README) as tmp:
            Path(tmp).write_text(new)
    return 0


def _block(text: str, name: str) -> str | None:
    m = _pattern(name).search(text)
    return m.group(2) if m else None


if __name__ == "__main__":
    sys.exit(main())
