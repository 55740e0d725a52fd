"""The README's front table (``benchmarks/report.py`` renders it): ``benchmarks/results/front.jsonl``."""

from __future__ import annotations

from pathlib import Path

from aqsearch.bench import read_results

RESULTS = Path(__file__).resolve().parent / "results"


def _f(x, fmt=".4f") -> str:
    return "-" if x is None else format(x, fmt)


def front_table() -> str:
    """benchmarks/front.py: the polished front at each budget against the uniform staircase and hull line,
    then racing against polishing every promoted plan, then the score's rank correlations."""
    lines = []
    for r in read_results(RESULTS / "front.jsonl")[-2:]:
        s = r["settings"]
        lines += [f"**{r['env']['machine']}**, {'small CPU' if r['small'] else 'full'} settings: calibration "
                  f"{s['calib'][0]}x{s['calib'][1]}, polish {s['polish_steps']} steps a block, {s['eval_tokens']:,} "
                  f"held-out tokens, {s['granularity']} units, menu {r['menu']}; {r['seconds']['total'] / 60:.0f} min "
                  f"(bank {r['seconds']['bank']:.0f} s, hull {r['seconds']['hull']:.0f} s, front {r['seconds']['front']:.0f} s).", "",
                  "| budget (bpw) | between uniform sizes | front KL | mixed plans' best | staircase | hull line | "
                  "front / staircase | front / hull | mixed / staircase | mixed / hull |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in r["budgets"]:
            lines.append(f"| {b['bpw']:g} | {'yes' if b['between'] else 'no'} | {_f(b['front_kl'])} | {_f(b['mixed_kl'])} | "
                         f"{_f(b['staircase'])} | {_f(b['hull_line'])} | {_f(b['front_vs_staircase'], '.3f')} | "
                         f"{_f(b['front_vs_hull'], '.3f')} | {_f(b['mixed_vs_staircase'], '.3f')} | {_f(b['mixed_vs_hull'], '.3f')} |")
        rc = r["racing"]
        if r.get("unraced_for_the_deadline"):
            lines += ["", f"**Cut short by its deadline** (one 10-minute device call): {len(r['unraced_for_the_deadline'])} "
                      f"promoted plans never raced ({', '.join(r['unraced_for_the_deadline'])}); where no raced plan fits "
                      "a budget, the front there is the uniform hull's own point, not a search result."]
        fits = r["score_fits"][-1] if r["score_fits"] else {}
        loo, ahead = fits.get("leave_one_out", {}), fits.get("raced_score_vs_kl", {})
        lines += ["", f"Median front / hull line at the in-between budgets: {_f(r['median_between_front_vs_hull'], '.3f')}. "
                  f"Racing: {rc['promoted']} plans promoted, {rc['full_polishes']} polished fully, {rc['stopped']} stopped; "
                  f"{rc['full_polishes_without_racing'] / max(rc['full_polishes'], 1):.2f}x fewer full polishes; "
                  f"steps {rc['steps']:,} of {rc['steps_if_all_full']:,} ({rc['steps_saved']:,} saved); hypervolume "
                  f"{rc['hypervolume_racing']:.4f} with racing, {rc['hypervolume_all']:.4f} with every promoted plan polished "
                  f"({100 * (rc['hypervolume_diff'] or 0):.2f} % lost). Score against polished KL: leave-one-out over "
                  f"{loo.get('n')} polished plans Spearman {_f(loo.get('spearman'), '.2f')}, Kendall "
                  f"{_f(loo.get('kendall'), '.2f')}; the promoted plans' score at promotion against their polished KL "
                  f"({ahead.get('n')} plans) Spearman {_f(ahead.get('spearman'), '.2f')}, Kendall {_f(ahead.get('kendall'), '.2f')}.", ""]
    return "\n".join(lines).rstrip()
