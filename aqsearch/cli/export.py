"""``aqsearch export``: an artifact as a folder that transformers and vLLM load (GPTQ, compressed-tensors)."""

from __future__ import annotations

from aqsearch.cli.common import add_model, emit, resolve_device


def register(sub) -> dict:
    p = sub.add_parser("export", help="write an artifact as a folder that transformers / vLLM load (GPTQ, compressed-tensors)")
    p.add_argument("artifact", help="plan JSON written by run or pick (its weights file beside it)")
    p.add_argument("--format", required=True, help="gptq or compressed-tensors")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_model(p)
    return {"export": cmd_export}


def cmd_export(args) -> int:
    """``aqsearch export ARTIFACT --format F --out DIR``: the library's :func:`aqsearch.export.export`."""
    from aqsearch.artifact import Artifact
    from aqsearch.export import check_format, check_loaders, export
    from aqsearch.io import check_output
    from aqsearch.models import check_plan_fits, load_model

    check_format(args.format)
    art = Artifact.load(args.artifact)
    check_output(args.out, folder=True, force=args.force)
    check_loaders(args.format)
    loaded = load_model(args.model, device=resolve_device(args.device))
    check_plan_fits(art, loaded.model)  # an artifact of another model (same layer names, other shapes): refused
    info = export(loaded.model, art.plan, dict(art.tensors), args.out, args.format, loaded.tokenizer)
    obj = {"artifact": args.artifact, "model": args.model, **info}
    emit(args, obj, f"wrote {args.out} ({args.format}): {info['layers_quantized']}/{info['layers']} decoder Linears "
                    f"quantized, {info['bytes']:,} bytes of quantized tensors (the plan counts {info['plan_bytes']:,})")
    return 0
