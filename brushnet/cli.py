"""The ``brushnet`` console script.

``brushnet inpaint --base PATH_OR_ID --brushnet PATH --image IMG --mask MASK --prompt TEXT --out OUT.png``
runs :class:`brushnet.pipeline.BrushNetInpaintPipeline` (SD3 / Flux bases: the family's pipeline from
:func:`brushnet.dit.family.pipeline_class`) once and writes the result atomically;
``brushnet evaluate ...`` runs a BrushBench/EditBench evaluation (:mod:`brushnet.evaluation.cli`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from brushnet.console import EXIT_STATUS_HELP, keep_bitsandbytes_lazy, run_console

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _build_parser() -> argparse.ArgumentParser:
    from brushnet.evaluation import cli as evaluate_cli
    from brushnet.pipeline import SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="brushnet", description=f"BrushNet inpainting tools. {EXIT_STATUS_HELP}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inpaint",
        help="inpaint the white region of a mask",
        description="Inpaint the white region of --mask in --image following --prompt.",
    )
    p.add_argument(
        "--base",
        required=True,
        help="base model: diffusers folder or hub id (SD 1.5, SD 2.x, SDXL, SD3, Flux)",
    )
    p.add_argument("--brushnet", required=True, help="BrushNet branch: diffusers folder or hub id")
    p.add_argument("--image", required=True, type=Path, help="input image")
    p.add_argument("--mask", required=True, type=Path, help="mask image, white = inpaint")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--out", required=True, type=Path, help="output image file (format from the suffix)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="number of inference steps (default 50; DiT: 28)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default 7.5; SD3: 7.0; Flux dev: its guidance embedding, 3.5)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="brushnet_conditioning_scale (default 1.0)")
    p.add_argument("--guidance-start", type=float, default=0.0, help="control_guidance_start (default 0)")
    p.add_argument("--guidance-end", type=float, default=1.0, help="control_guidance_end (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--no-blend", action="store_true", help="skip the blurred paste-back into the input")
    p.add_argument(
        "--blur-size",
        type=int,
        default=21,
        help="Gaussian kernel of the blend mask (odd, 0 = hard paste; default 21)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help=f"{', '.join(SCHEDULERS)} or a diffusers scheduler class name (default unipc; SD3 / Flux bases "
        "sample with their flow-matching Euler scheduler only)",
    )
    p.add_argument(
        "--height", type=int, default=None, help="processing height (multiple of 8; default: image)"
    )
    p.add_argument("--width", type=int, default=None, help="processing width (multiple of 8; default: image)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core; 1 is fastest on a busy machine)",
    )
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu"
    )
    p.add_argument("--variant", default=None, help="weights variant of the base, e.g. fp16")
    p.add_argument("--vae", default=None, help="replacement VAE folder or id (e.g. an fp16-fix SDXL VAE)")
    evaluate_cli.add_parser(sub)
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {str(path)!r} does not exist")
    if args.blur_size < 0 or (args.blur_size and args.blur_size % 2 == 0):
        raise ValueError(f"--blur-size must be odd, or 0 for a hard paste; got {args.blur_size}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    from PIL import Image

    if args.out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {str(args.out)!r}: unknown image format {args.out.suffix!r} (use e.g. .png)")


def inpaint(args: argparse.Namespace) -> Path:
    import torch

    from brushnet.atomic import save_image_atomic
    from brushnet.dit.loading import base_family
    from brushnet.pipeline import BrushNetInpaintPipeline

    _check_inputs(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    family = base_family(args.base)
    cuda_dtype = "fp16" if family == "unet" else "bf16"  # SD3 / Flux activations overflow fp16
    dtype_name = args.dtype or (cuda_dtype if device.type == "cuda" else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])
    if family == "unet":
        pipe = BrushNetInpaintPipeline.from_base(
            args.base,
            args.brushnet,
            scheduler=args.scheduler or "unipc",
            torch_dtype=dtype,
            variant=args.variant,
            vae=args.vae,
        ).to(device)
    else:
        pipe = _dit_pipeline(args, family, dtype).to(device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator("cpu").manual_seed(args.seed)
    optional = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}  # None: the pipeline's
    result = pipe(
        args.prompt,
        args.image,
        args.mask,
        negative_prompt=args.negative_prompt,
        **{k: v for k, v in optional.items() if v is not None},
        brushnet_conditioning_scale=args.scale,
        control_guidance_start=args.guidance_start,
        control_guidance_end=args.guidance_end,
        generator=generator,
        height=args.height,
        width=args.width,
        blend=not args.no_blend,
        blur_size=args.blur_size,
    )
    save_image_atomic(result.images[0], args.out)
    return args.out


def _dit_pipeline(args: argparse.Namespace, family: str, dtype):
    """The SD3 / Flux pipeline; options that only exist for UNet bases are refused by name."""
    from brushnet.dit.family import pipeline_class

    given = {"--scheduler": args.scheduler, "--variant": args.variant, "--vae": args.vae}
    wrong = [flag for flag, value in given.items() if value is not None]
    if wrong:
        raise ValueError(
            f"--base {args.base!r} is a {family} base: {', '.join(wrong)} apply to UNet bases only"
        )
    return pipeline_class(family).from_base(args.base, args.brushnet, torch_dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``brushnet``; returns the exit status (:func:`brushnet.console.run_console`)."""
    keep_bitsandbytes_lazy()
    return run_console("brushnet", _run, argv)


def _run(argv: list[str]) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "evaluate":
        from brushnet.evaluation import cli as evaluate_cli

        return evaluate_cli.run(args)
    print(f"wrote {inpaint(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
