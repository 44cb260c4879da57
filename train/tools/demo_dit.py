"""``make demo FAMILY=sd3|flux`` (``python -m train.tools.demo_dit --family sd3``): the DiT demo, offline on CPU.

Builds a tiny random SD3 or Flux base (``brushnet.testing.tiny_dit_heads``: random weights, so it cannot draw
photos; it shows the mechanism), the demo's BrushData set, trains a branch with ``brushnet-train fit
--config configs/tiny_cpu_<family>.yaml``, then measures what was learned on held-out photo crops: the
flow-matching loss of the base with the untrained (zero) branch and with the trained one, over the same
noise draws. It writes one inpainting through the family's pipeline and prints the commands to inpaint
again and to train more steps. A rerun resumes the run (``--ckpt_path auto``); nothing is deleted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from brushnet.atomic import atomic_write_text, save_image_atomic
from brushnet.conditioning import load_caption_tokenizers
from brushnet.testing.heldout import held_out_cases
from train.module import BrushNetTrainingModule
from train.tools.demo_data import build_data

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sd3", "flux")
SIZE = 32  # the tiny DiT bases' positional tables cover 256 px; 32 px keeps a CPU step well under a second
log = logging.getLogger("train.tools.demo_dit")


def held_out_loss(module: BrushNetTrainingModule, n: int = 8, seeds: int = 4) -> float:
    """Mean loss over ``seeds`` noise / timestep draws of ``n`` held-out photo crops with box holes."""
    cases = held_out_cases(n=n, size=SIZE)
    batch = {
        "pixel_values": torch.from_numpy(np.stack([c.image for c in cases])).permute(0, 3, 1, 2).contiguous(),
        "masks": torch.from_numpy(np.stack([~c.hole for c in cases]))[:, None].to(torch.uint8),
        **load_caption_tokenizers(module.hparams.pretrained_model_name_or_path)([c.caption for c in cases]),
    }
    with torch.no_grad():
        draws = [module.compute_loss(batch, torch.Generator().manual_seed(s)).item() for s in range(seeds)]
    return sum(draws) / seeds


def train_command(family: str, base: Path, run: Path, data_args: list[str], steps: int) -> list[str]:
    script = Path(sys.executable).with_name("brushnet-train")
    return [
        str(script),
        "fit",
        "--config",
        str(ROOT / "configs" / f"tiny_cpu_{family}.yaml"),
        f"--model.pretrained_model_name_or_path={base}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.max_steps={steps}",
        f"--data.resolution={SIZE}",
        *data_args,
        "--ckpt_path=auto",
    ]


def run_demo(family: str, out: Path, steps: int) -> dict:
    """Build, train, measure; returns the numbers it also writes to ``<out>/results.json``."""
    from brushnet.testing.tiny_dit_heads import build_trainable_dit_base

    base = out / "base"
    if not (base / "model_index.json").is_file():
        log.info("building a tiny random %s base at %s", family, base)
        build_trainable_dit_base(family, base)
    data_args = build_data(out)
    run = out / "run"
    cmd = train_command(family, base, run, data_args, steps)
    log.info("training: %s", shlex.join(cmd))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"brushnet-train failed (exit {done.returncode}); the run folder is {run}")
    exports = sorted(run.glob("export/step-*/brushnet"))
    if not exports:
        raise RuntimeError(f"the run wrote no export under {run / 'export'}")
    untrained = BrushNetTrainingModule(str(base), optimizer="adamw").eval()
    trained = BrushNetTrainingModule(
        str(base), optimizer="adamw", brushnet_model_name_or_path=str(exports[-1])
    )
    results = {
        "family": family,
        "steps": steps,
        "held_out_loss_untrained_branch": held_out_loss(untrained),
        "held_out_loss_trained_branch": held_out_loss(trained.eval()),
        "export": str(exports[-1]),
    }
    case = held_out_cases(n=1, size=SIZE, seed=7)[0]
    save_image_atomic(PIL.Image.fromarray(case.image), out / "input.png")
    save_image_atomic(
        PIL.Image.fromarray(case.hole.astype(np.uint8) * 255), out / "mask.png"
    )  # white = inpaint
    pipe = trained.inference_pipeline()
    image = pipe(case.caption, case.image, case.hole, num_inference_steps=8, output_type="np").images[0]
    png = out / "inpainted.png"
    save_image_atomic(PIL.Image.fromarray(np.concatenate([case.image, image], axis=1)), png)
    results["inpainted"] = str(png)
    results["caption"] = case.caption
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.tools.demo_dit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: demo/dit-<family>")
    parser.add_argument("--steps", type=int, default=150, help="training steps (a rerun with more continues)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = (args.out or Path("demo") / f"dit-{args.family}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        r = run_demo(args.family, out, args.steps)
    except RuntimeError as e:
        print(f"demo_dit: error: {e}", file=sys.stderr)
        return 2
    gain = r["held_out_loss_untrained_branch"] - r["held_out_loss_trained_branch"]
    print(
        f"\n{args.family}: held-out flow-matching loss {r['held_out_loss_untrained_branch']:.4f} with the untrained "
        f"branch -> {r['held_out_loss_trained_branch']:.4f} trained ({gain:+.4f}); inpainting: {r['inpainted']}"
    )
    inpaint = [
        str(Path(sys.executable).with_name("brushnet")),
        "inpaint",
        *("--base", str(out / "base"), "--brushnet", r["export"]),
        *("--image", str(out / "input.png"), "--mask", str(out / "mask.png"), "--prompt", r["caption"]),
        *("--out", str(out / "out.png"), "--steps", "8", "--threads", "1", "--device", "cpu"),
    ]
    print(f"inpaint again:  {shlex.join(inpaint)}")
    print(
        f"train more:     python -m train.tools.demo_dit --family {args.family} --out {out} --steps {2 * args.steps}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
