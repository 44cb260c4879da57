"""SD3 and Flux bases through the same ``BrushNetTrainingModule`` / ``brushnet-train``: the family is picked
from the base folder, the data side produces the family's token ids, a tiny run learns, and its export loads
as the DiT branch and inpaints with the family's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brushnet.conditioning import CaptionTokenizers, load_caption_tokenizers
from brushnet.dit.family import pipeline_class
from brushnet.dit.loading import load_dit_branch
from brushnet.dit.text import DiTTokenizers
from brushnet.testing.heldout import held_out_cases
from tests.train.cli_runs import tiny_data
from tests.train.dit_runs import CONFIGS, FAMILIES, brushnet_train, dit_base, losses, window_means
from train.module import BrushNetTrainingModule

STEPS = 150
BRANCH_CLASS = {"sd3": "BrushNetSD3Model", "flux": "BrushNetFluxModel"}


def held_out_loss(module: BrushNetTrainingModule, seeds: int = 4) -> float:
    """The mean loss over ``seeds`` noise / timestep draws of 8 held-out photo crops with box holes (32 px)."""
    cases = held_out_cases(n=8, size=32)
    batch = {
        "pixel_values": torch.from_numpy(np.stack([c.image for c in cases])).permute(0, 3, 1, 2).contiguous(),
        "masks": torch.from_numpy(np.stack([~c.hole for c in cases]))[:, None].to(torch.uint8),
        **load_caption_tokenizers(module.hparams.pretrained_model_name_or_path)([c.caption for c in cases]),
    }
    with torch.no_grad():
        return (
            sum(module.compute_loss(batch, torch.Generator().manual_seed(s)).item() for s in range(seeds))
            / seeds
        )


@pytest.fixture(scope="module", params=FAMILIES)
def family_base(request, tmp_path_factory):
    return request.param, dit_base(tmp_path_factory, request.param)


def test_module_picks_the_family_from_the_base_folder(family_base, tiny_base_sd15):
    family, base = family_base
    m = BrushNetTrainingModule(str(base), optimizer="adamw")
    assert m.parts.name == family and type(m.brushnet).__name__ == BRANCH_CLASS[family]
    assert m.denoiser is m.transformer and not m.is_sdxl
    assert all(not p.requires_grad for f in m.frozen_models() for p in f.parameters())
    tokens = load_caption_tokenizers(base)
    assert isinstance(tokens, DiTTokenizers) and tokens.family == family
    ids = tokens("a red cup")
    assert set(ids) == (
        {"input_ids", "input_ids_2", "input_ids_3"} if family == "sd3" else {"input_ids", "input_ids_2"}
    )
    assert isinstance(load_caption_tokenizers(tiny_base_sd15), CaptionTokenizers)
    # the loss of a loader-layout batch (uint8 pixels, keep mask) reaches the branch only
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g),
        "masks": (torch.rand(2, 1, 32, 32, generator=g) > 0.5).to(torch.uint8),
        **tokens(["a red cup", "a cat"]),
    }
    loss = m.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.brushnet.parameters())
    assert all(p.grad is None for p in m.transformer.parameters())
    same = m.compute_loss(batch, torch.Generator().manual_seed(0), use_branch=False)
    assert same.item() == pytest.approx(loss.item(), rel=1e-5)  # a zero-initialised branch changes nothing


def test_unet_options_on_a_dit_base_are_one_clear_error(tmp_path, family_base):
    family, base = family_base
    done = brushnet_train(
        "--config",
        str(CONFIGS / f"tiny_cpu_{family}.yaml"),
        f"--model.pretrained_model_name_or_path={base}",
        f"--data.train_shards={tiny_data(tmp_path / 'data')}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--model.min_snr_gamma=5",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "min_snr_gamma" in done.stderr and f"is a {family} base" in done.stderr
    assert "Traceback" not in done.stderr


def test_gradient_checkpointing_of_transformer_and_branch_gives_the_same_gradients(family_base):
    family, base = family_base
    tokens = load_caption_tokenizers(base)
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g),
        "masks": (torch.rand(2, 1, 32, 32, generator=g) > 0.5).to(torch.uint8),
        **tokens(["a red cup", "a cat"]),
    }
    grads = []
    for checkpointing in (False, True):
        m = BrushNetTrainingModule(str(base), optimizer="adamw", gradient_checkpointing=checkpointing)
        with torch.no_grad():  # a non-zero branch, the same in both runs
            for p in m.brushnet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        m.setup("fit")
        m.train()
        assert m.transformer.gradient_checkpointing == m.brushnet.gradient_checkpointing == checkpointing
        m.compute_loss(batch, torch.Generator().manual_seed(0)).backward()
        grads.append([p.grad for p in m.brushnet.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_dit_options_on_a_unet_base_are_refused(tiny_base_sd15):
    with pytest.raises(ValueError, match=r"is a unet base: model options \{'weighting_scheme': 'mode'\}"):
        BrushNetTrainingModule(str(tiny_base_sd15), weighting_scheme="mode")


def test_fit_learns_exports_and_inpaints(family_base, tmp_path):
    """The tiny config, as a user runs it: exit 0, the loss of the last 30 steps well below the first 30's,
    an export that loads as the family's branch (equal to the checkpoint) and inpaints with its pipeline."""
    family, base = family_base
    run = tmp_path / "run"
    done = brushnet_train(
        "--config",
        str(CONFIGS / f"tiny_cpu_{family}.yaml"),
        f"--model.pretrained_model_name_or_path={base}",
        f"--data.train_shards={tiny_data(tmp_path / 'data')}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1",
        "--data.resolution=32",
        "--data.batch_size=2",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    curve = window_means(losses(run), 30)
    assert len(losses(run)) == STEPS
    assert curve[-1] < 0.8 * curve[0], curve  # measured: sd3 1.33 -> 0.98, flux 1.16 -> 0.54 (30-step means)

    export = run / "export" / f"step-{STEPS:08d}"
    branch = load_dit_branch(export / "brushnet")
    assert type(branch).__name__ == BRANCH_CLASS[family]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    saved = load_file(export / "brushnet" / "diffusion_pytorch_model.safetensors")
    assert saved and all(torch.equal(state[f"brushnet.{k}"], v) for k, v in saved.items())
    assert (export / "brushnet_ema").is_dir()
    assert (run / "logs" / "version_0" / "validation" / f"step-{STEPS:08d}" / "00.png").is_file()

    # learned, not memorised: the flow-matching loss on held-out photos (same noise and timesteps) is lower
    zero_module = BrushNetTrainingModule(str(base), optimizer="adamw")
    trained_module = BrushNetTrainingModule(str(base), brushnet_model_name_or_path=str(export / "brushnet"))
    held_out = held_out_loss(trained_module), held_out_loss(zero_module)
    assert held_out[0] < 0.9 * held_out[1], held_out

    cls = pipeline_class(family)
    trained = cls.from_base(base, export / "brushnet")
    zero = cls.from_base(base, zero_module.brushnet)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[12:36, 16:48] = 255  # white = inpaint
    kw = dict(prompt="a photo", image=image, mask=mask, num_inference_steps=3, output_type="np")
    out = trained(**kw, generator=torch.Generator().manual_seed(0)).images[0]
    base_out = zero(**kw, generator=torch.Generator().manual_seed(0)).images[0]
    assert out.shape == image.shape
    far = np.ones((48, 64), bool)
    far[1:47, 5:59] = False  # pixels far from the hole (blurred blending, blur 21) keep the input
    assert np.array_equal(out[far], image[far])
    hole = mask > 0
    assert np.abs(out[hole].astype(int) - base_out[hole]).mean() > 1.0  # the trained branch changes the hole
