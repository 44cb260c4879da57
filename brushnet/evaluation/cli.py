"""``brushnet evaluate``: generate a BrushBench/EditBench run (resumable) and score it.

Register in ``brushnet/cli.py``::

    from brushnet.evaluation import cli as evaluate_cli
    evaluate_cli.add_parser(sub)            # next to the "inpaint" parser
    if args.command == "evaluate": return evaluate_cli.run(args)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from brushnet.evaluation.benchmark import DEFAULT_SEED, MASK_KEYS

    p = subparsers.add_parser(
        "evaluate",
        help="generate and score BrushBench / EditBench",
        description="Inpaint every benchmark entry (skipping images already generated) and write per-image\n"
        "and summary CSVs, a markdown report and best/worst grids to --out.\n\nMetrics:" + _metrics_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", required=True, type=Path, help="benchmark root (holds mapping_file.json)")
    p.add_argument(
        "--mapping", type=Path, default=None, help="mapping file (default: <benchmark>/mapping_file.json)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (generated images, CSVs, report)")
    p.add_argument(
        "--mask-kind",
        choices=sorted(MASK_KEYS),
        default="inside",
        help="inside = inpainting_mask, outside = outpainting_mask (default inside)",
    )
    p.add_argument("--base", help="base model: diffusers folder or hub id (needed unless --no-generate)")
    p.add_argument("--brushnet", help="BrushNet branch folder or hub id (needed unless --no-generate)")
    p.add_argument(
        "--blended",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="blurred paste-back into the source (official --blended; default off)",
    )
    p.add_argument("--conditioning-scale", type=float, default=1.0, help="brushnet_conditioning_scale")
    p.add_argument(
        "--scheduler",
        default=None,
        help="scheduler short name or class (default unipc: ends at the smallest sigma like the official run; "
        "SD3 / Flux bases: their flow-matching Euler scheduler only)",
    )
    p.add_argument(
        "--masked-image-encoding",
        choices=["official", "once"],
        default=None,
        help="official (default): one VAE sample of the masked image per CFG half (official pipeline); once: "
        "one shared (SD3 / Flux bases: once only)",
    )
    p.add_argument("--steps", type=int, default=None, help="inference steps (default 50; SD3 / Flux: 28)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default 7.5; SD3: 7.0; Flux dev: its guidance embedding, 3.5)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"per-image seed (default {DEFAULT_SEED})")
    p.add_argument("--limit", type=int, default=None, help="only the first N entries")
    p.add_argument(
        "--metrics-config",
        type=Path,
        default=None,
        help="YAML/JSON with local weight paths of the model-based metrics (template: "
        "configs/eval/metrics.yaml); a metric without weights is reported unavailable",
    )
    p.add_argument("--no-generate", action="store_true", help="only score images already in --out")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default fp16 on cuda, fp32 on cpu")
    return p


# Generation defaults per base family: the official BrushBench run (UNet) and the DiT pipelines' own.
_DEFAULTS = {
    "unet": {"scheduler": "unipc", "masked_image_encoding": "official", "steps": 50, "guidance": 7.5},
    "sd3": {"scheduler": "flow_match_euler", "masked_image_encoding": "once", "steps": 28, "guidance": 7.0},
    "flux": {"scheduler": "flow_match_euler", "masked_image_encoding": "once", "steps": 28, "guidance": 3.5},
}


def _family_defaults(args: argparse.Namespace) -> tuple[str, dict]:
    """The base's family and its generation defaults; a UNet-only choice on a DiT base is one clear error."""
    from brushnet.dit.loading import base_family

    family = base_family(args.base)
    defaults = _DEFAULTS[family]
    if family != "unet":
        wrong = [
            f"--{k.replace('_', '-')} {vars(args)[k]}"
            for k in ("scheduler", "masked_image_encoding")
            if vars(args)[k] not in (None, defaults[k])
        ]
        if wrong:
            raise ValueError(
                f"--base {args.base} is a {family} base: {', '.join(wrong)} apply to UNet bases only"
            )
    return family, defaults


def _metrics_help() -> str:
    from brushnet.evaluation.evaluate import METRICS
    from brushnet.evaluation.scorers import SCORER_BUILDERS

    model_based = {name: section for name, (_, section) in SCORER_BUILDERS.items()}
    model_based["lpips"] = "lpips"
    lines = []
    for name, info in METRICS.items():
        needs = f" (weights: --metrics-config section '{model_based[name]}')" if name in model_based else ""
        lines.append(f"\n  {name:<16} {info.label}{needs}")
    return "".join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, Path]:
    import torch

    from brushnet.evaluation.benchmark import GenerationSettings, generate, load_mapping
    from brushnet.evaluation.evaluate import Evaluator, score_folder
    from brushnet.evaluation.report import write_report
    from brushnet.evaluation.scorers import ModelPaths, load_model_paths

    items = load_mapping(args.mapping or args.benchmark / "mapping_file.json", args.mask_kind)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        items = items[: args.limit]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    settings = None
    if not args.no_generate:
        if not args.base or not args.brushnet:
            raise ValueError("--base and --brushnet are required to generate (or pass --no-generate)")
        family, defaults = _family_defaults(args)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        for key, value in defaults.items():  # options left unset: the family's defaults
            if getattr(args, key) is None:
                setattr(args, key, value)
        from brushnet.pipeline import BrushNetInpaintPipeline

        settings = GenerationSettings(
            base=str(args.base),
            brushnet=str(args.brushnet),
            mask_kind=args.mask_kind,
            blended=args.blended,
            conditioning_scale=args.conditioning_scale,
            scheduler=args.scheduler,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            masked_image_encoding=args.masked_image_encoding,
        )
        cuda_dtype = "fp16" if family == "unet" else "bf16"  # SD3 / Flux activations overflow fp16
        dtype = getattr(torch, _DTYPES[args.dtype or (cuda_dtype if device.startswith("cuda") else "fp32")])
        if family == "unet":
            pipe = BrushNetInpaintPipeline.from_base(
                args.base, args.brushnet, scheduler=args.scheduler, torch_dtype=dtype
            ).to(device)
        else:
            from brushnet.dit.family import pipeline_class

            pipe = pipeline_class(family).from_base(args.base, args.brushnet, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        stats = generate(pipe, items, args.benchmark, args.out, settings, progress=log)
        log(f"generated {stats.generated}, skipped {stats.skipped} already generated")
        del pipe
    paths = load_model_paths(args.metrics_config) if args.metrics_config else ModelPaths()
    evaluator = Evaluator.from_paths(paths, device=device)
    for name, reason in evaluator.unavailable.items():
        log(f"metric {name} unavailable: {reason}")
    rows = score_folder(items, args.benchmark, args.out, evaluator, progress=log)
    return write_report(
        args.out,
        rows,
        evaluator.columns,
        evaluator.unavailable,
        items,
        args.benchmark,
        asdict(settings) if settings else None,
    )


def run(args: argparse.Namespace) -> int:
    from brushnet.evaluation.benchmark import BenchmarkError
    from brushnet.loading import BaseModelError
    from brushnet.masks import MaskError

    try:
        paths = evaluate(args)
    except (BenchmarkError, MaskError, BaseModelError, FileNotFoundError, ValueError) as e:
        print(f"brushnet evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['summary']} and {paths['report']}")
    return 0
