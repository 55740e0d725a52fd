"""``aqsearch materialize`` and ``aqsearch generate``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from aqsearch.cli.common import add_model, emit, positive_int, resolve_device
from aqsearch.errors import AqError


def register(sub) -> dict:
    p = sub.add_parser("materialize", help="pack a plan's weights into a low-bit model folder")
    add_model(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--plan", help="plan JSON file (an artifact: its polished weights are packed)")
    g.add_argument("--scheme", help="uniform scheme, e.g. w4g64 or w3g32s")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = sub.add_parser("generate", help="greedy text generation with a materialized model")
    p.add_argument("dir", help="folder written by aqsearch materialize")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (text, tokens, seconds)")
    return {"materialize": cmd_materialize, "generate": cmd_generate}


def cmd_materialize(args) -> int:
    from aqsearch.artifact import Artifact
    from aqsearch.config import Plan
    from aqsearch.io import check_output
    from aqsearch.models import check_plan_fits, load_model

    art = Artifact(Plan.uniform(args.scheme)) if args.scheme is not None else Artifact.load(args.plan)
    check_output(args.out, folder=True, force=args.force)
    device = resolve_device(args.device)
    t0 = time.time()
    loaded = load_model(args.model, device=device)
    check_plan_fits(art, loaded.model)
    print(f"aqsearch: quantizing the decoder Linears of {args.model}"
          + (f" ({len(art.tensors)} polished)" if art.tensors else ""), file=sys.stderr, flush=True)
    meta = art.materialize(loaded.model, args.out, tokenizer=loaded.tokenizer, source=args.model)
    n_q = sum(1 for v in meta["layers"].values() if v["scheme"])
    obj = {"out": str(args.out), "model": args.model, "scheme": args.scheme, "plan": args.plan,
           "bytes": meta["bytes"], "bytes_total": meta["bytes_total"], "bpw": meta["bpw"],
           "layers_quantized": n_q, "layers": len(meta["layers"]), "seconds": round(time.time() - t0, 2)}
    emit(args, obj, f"wrote {args.out}: {n_q}/{len(meta['layers'])} decoder Linears quantized, "
                    f"{meta['bytes']:,} bytes ({meta['bpw']:.3f} bpw), model {meta['bytes_total']:,} bytes")
    return 0


def cmd_generate(args) -> int:
    from aqsearch.materialize import generate, load

    folder = Path(args.dir)
    if not args.prompt.strip():
        raise AqError("--prompt is empty: give the text to continue")
    if not folder.is_dir():
        raise AqError(f"model folder not found: {args.dir}")
    device = resolve_device(args.device)
    model, tok = load(folder, device)
    if tok is None:
        raise AqError(f"{args.dir} has no tokenizer: materialize it with aqsearch materialize")
    res = generate(model, tok, args.prompt, args.max_new_tokens)
    emit(args, res, res["text"])
    return 0
