"""The exported pick on the real model: its held-out KL read back through each format's reader, against
``aqsearch eval --plan`` on the same text, and its bytes against the plan's.

    python benchmarks/export_check.py --plan aqsearch-run/plan.json          # the pick of `make run`

For each format it exports the artifact (``aqsearch export``), reads the folder back into a transformers model
the most direct way this machine allows, and measures KL against the same full-precision reference that
``aqsearch eval --plan`` (run as a command, on the same windows) uses:

- compressed-tensors: ``AutoModelForCausalLM.from_pretrained`` (route ``transformers``, default or
  ``dequantize=True``) where transformers 5.25 can load the plan (symmetric schemes, or one asymmetric
  scheme); otherwise compressed-tensors' own decompressor per config group (route ``ct-decompress``);
- gptq: GPTQ's classic torch dequantization (``tests/export_readers.py``; gptqmodel does not import on a
  CPU-only torch).

A scheme the format cannot hold (compressed-tensors and a short last group) is recorded as refused.
One JSON line goes to benchmarks/results/export.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
sys.path.insert(0, str(HERE.parent / "tests"))  # the reference readers the tests use

from aqsearch.bench import append_result  # noqa: E402
from aqsearch.data import calib_eval_sets  # noqa: E402
from aqsearch.artifact import read_artifact  # noqa: E402
from aqsearch.errors import AqError  # noqa: E402
from aqsearch.export import BOOKKEEPING, export  # noqa: E402
from aqsearch.models import load_model  # noqa: E402
from aqsearch.quality import build_reference, summarize, token_stats  # noqa: E402


def ct_read(folder: Path):
    """(model, route): transformers' loader where it can load the config, else compressed-tensors' decompressor."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from export_readers import ct_reference_load

    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = [g["weights"] for g in groups.values()]
    if all(w["symmetric"] for w in schemes):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():  # compressed-tensors decompresses on the whole model's first call; token_stats
            model(torch.zeros(1, 1, dtype=torch.long))  # calls model.model, which would find no weights
        return model, "transformers"
    if len(schemes) == 1:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval(), \
            "transformers (dequantize=True)"
    return ct_reference_load(folder), "ct-decompress"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="artifact (plan JSON + weights) written by run or pick")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-data", default=str(DATA / "wikitext-2-valid.tokens.txt"))
    ap.add_argument("--eval-data", default=str(DATA / "wikitext-2-raw-test.txt"))
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--formats", default="compressed-tensors,gptq")
    ap.add_argument("--label", default=None, help="what the plan is, for the table (default: its path)")
    ap.add_argument("--out", default=str(HERE / "results" / "export.jsonl"))
    args = ap.parse_args()
    t0 = time.time()
    cmd = [sys.executable, "-m", "aqsearch", "eval", "--model", args.model, "--plan", args.plan, "--eval-tokens",
           str(args.eval_tokens), "--seqlen", str(args.seqlen), "--device", "cpu", "--json",
           "--calib-data", args.calib_data, "--eval-data", args.eval_data]
    ev_cli = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    loaded = load_model(args.model)
    _, ev = calib_eval_sets(loaded, args.calib_data, args.eval_data, eval_tokens=args.eval_tokens,
                            seqlen=args.seqlen)  # as aqsearch eval does
    ref = build_reference(loaded.model, ev, cache_key=loaded.fingerprint)
    assert ref.tokens.hash == ev_cli["data_hash"], "not the text aqsearch eval measured"
    plan_obj, tensors = read_artifact(args.plan)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="export-check-"))
    for fmt in args.formats.split(","):
        out = work / fmt
        try:
            info = export(loaded.model, plan_obj, tensors, out, fmt, loaded.tokenizer)
        except AqError as e:  # a scheme the format cannot hold
            rows.append({"format": fmt, "refused": str(e)})
            continue
        if fmt == "gptq":
            from export_readers import gptq_reference_load

            model, route = gptq_reference_load(out), "gptq-reference (AutoGPTQ/vLLM torch path)"
        else:
            model, route = ct_read(out)
        m = summarize(token_stats(model, ref), ref, 0, 0, 0.0, 0.0)
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        rows.append({"format": fmt, "refused": None, "route": route, "bytes": info["bytes"],
                     "bookkeeping_bytes": info["bookkeeping_bytes"], "plan_bytes": info["plan_bytes"], "kl_mean": m.kl_mean, "top1": m.top1,
                     "ppl_ratio": m.ppl_ratio, "kl_eval_cli": ev_cli["kl_mean"],
                     "kl_rel_diff": abs(m.kl_mean - ev_cli["kl_mean"]) / ev_cli["kl_mean"],
                     "checkpoint_format": cfg.get("checkpoint_format"),
                     "config_groups": len(cfg.get("config_groups") or {}) or None,
                     "dynamic_entries": len(cfg.get("dynamic") or {}) if fmt == "gptq" else None,
                     "bookkeeping_tensors": sum(1 for k in sizes if k.rsplit(".", 1)[-1] in BOOKKEEPING)})
        del model
    plan = json.loads(Path(args.plan).read_text())
    rec = {"bench": "export", "model": args.model, "plan": args.label or args.plan, "plan_bytes": plan.get("bytes"),
           "plan_bpw": plan.get("bpw"), "eval_tokens": ev_cli["tokens"], "seqlen": args.seqlen,
           "data_hash": ev_cli["data_hash"], "eval_data": ev.describe(), "rows": rows,
           "versions": _versions(), "seconds": round(time.time() - t0, 1)}
    append_result(args.out, rec)
    print(json.dumps(rec, indent=1))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("transformers", "compressed-tensors", "safetensors", "torch", "gptqmodel", "optimum"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


if __name__ == "__main__":
    try:
        main()
    except AqError as e:
        print(f"export_check: error: {e}", file=sys.stderr)
        sys.exit(2)
