"""The DiT flow-matching objective: sigma sampling follows the scheduler's shift, and a few optimizer steps of the
branch alone on a fixed batch bring the loss well below its start (tiny SD3 and Flux folders)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from brushnet.dit.family import FAMILIES, load_dit_base
from brushnet.dit.training import FlowMatchingObjective, encode_batch


@pytest.mark.parametrize(
    "config, expected_median",
    [
        (dict(shift=1.0), 0.5),
        (dict(shift=3.0), 0.75),  # SD3: 3 * 0.5 / (1 + 2 * 0.5)
        (
            dict(shift=3.0, use_dynamic_shifting=True),
            math.exp(0.5) / (math.exp(0.5) + 1),
        ),  # Flux, 256 tokens: mu = 0.5
    ],
)
def test_logit_normal_sigmas_follow_the_scheduler_shift(config, expected_median):
    scheduler_config = FlowMatchEulerDiscreteScheduler(**config).config
    g = torch.Generator().manual_seed(0)
    sigmas = FlowMatchingObjective().sample_sigmas(scheduler_config, 20000, (32, 32), "cpu", g)
    assert sigmas.min() > 0 and sigmas.max() <= 1
    assert abs(sigmas.median().item() - expected_median) < 0.01


def test_mode_and_uniform_sampling_differ_and_weights_follow_the_scheme():
    cfg = FlowMatchEulerDiscreteScheduler(shift=1.0).config
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatchingObjective(weighting_scheme="uniform").sample_sigmas(cfg, 20000, (8, 8), "cpu", g)
    mode = FlowMatchingObjective(weighting_scheme="mode").sample_sigmas(cfg, 20000, (8, 8), "cpu", g)
    assert abs(uniform.mean().item() - 0.5) < 0.01
    assert abs(mode.mean().item() - uniform.mean().item()) > 0.02 or abs(mode.std() - uniform.std()) > 0.02
    s = torch.tensor([0.25, 0.5])
    assert torch.equal(FlowMatchingObjective().weights(s), torch.ones(2))
    torch.testing.assert_close(FlowMatchingObjective(weighting_scheme="sigma_sqrt").weights(s), s**-2.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(family, tiny_dit_bases):
    parts = load_dit_base(tiny_dit_bases[family])
    fam = FAMILIES[family]
    transformer, vae = parts["transformer"], parts["vae"]
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    branch = fam.build_branch(transformer, num_layers=2)
    branch.train()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    keep = torch.ones(2, 1, 64, 64)
    keep[:, :, 16:48, 16:48] = 0
    masked = pixels * keep - (1 - keep)  # hole -1, as the data pipeline's conditioning_pixel_values
    latents, masked_latents, keep_latent = encode_batch(vae, pixels, masked, keep, g)
    with torch.no_grad():
        text = fam.encode_text(parts, ["a red cat", "a blue dog"])
    objective = FlowMatchingObjective()
    optimizer = torch.optim.AdamW(branch.parameters(), lr=3e-3)

    def loss(seed: int, use_branch: bool = True):
        gen = torch.Generator().manual_seed(seed)  # the same noise and sigmas at every step
        return objective.loss(
            fam,
            transformer,
            branch,
            latents,
            masked_latents,
            keep_latent,
            text,
            parts["scheduler"].config,
            gen,
            use_branch=use_branch,
        )

    with torch.no_grad():
        base_only = loss(0, use_branch=False).item()
    losses = []
    for _ in range(40):
        optimizer.zero_grad(set_to_none=True)
        value = loss(0)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[0] == pytest.approx(base_only, rel=1e-6)  # zero branch: the base's loss
    # measured: SD3 4.25 -> 2.27 (0.53), Flux 1.60 -> 0.48 (0.30); the tiny bases' frozen output layers bound
    # how close the residuals can bring the prediction to the target
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is None for p in transformer.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_training_on_fresh_batches_lowers_the_held_out_loss(family, tiny_dit_bases):
    """100 steps on new random images / noise every step; the loss on unseen images and noise falls below
    the frozen base's (measured: SD3 4.27 -> 3.90, Flux 1.48 -> 0.81)."""
    parts = load_dit_base(tiny_dit_bases[family])
    fam = FAMILIES[family]
    transformer, vae, config = parts["transformer"], parts["vae"], parts["scheduler"].config
    transformer.requires_grad_(False)
    branch = fam.build_branch(transformer, num_layers=2)
    branch.train()

    def data(seed: int):
        g = torch.Generator().manual_seed(seed)
        pixels = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
        keep = torch.ones(4, 1, 64, 64)
        keep[:, :, 16:48, 16:48] = 0
        return encode_batch(vae, pixels, pixels * keep - (1 - keep), keep, g)

    with torch.no_grad():
        text = fam.encode_text(parts, ["a red cat"] * 4)
    objective = FlowMatchingObjective()
    held_out = data(999)

    def held_out_loss(use_branch: bool) -> float:
        with torch.no_grad():
            return (
                sum(
                    objective.loss(
                        fam,
                        transformer,
                        branch,
                        *held_out,
                        text,
                        config,
                        torch.Generator().manual_seed(10_000 + s),
                        use_branch=use_branch,
                    ).item()
                    for s in range(8)
                )
                / 8
            )

    base_only = held_out_loss(False)
    optimizer = torch.optim.AdamW(branch.parameters(), lr=3e-3)
    for step in range(100):
        optimizer.zero_grad(set_to_none=True)
        objective.loss(
            fam, transformer, branch, *data(step), text, config, torch.Generator().manual_seed(step)
        ).backward()
        optimizer.step()
    assert held_out_loss(True) < 0.95 * base_only


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_batch_loss_takes_the_trainer_batch_layout(family, tiny_dit_bases):
    """``batch_loss`` on a trainer-style batch equals the objective on the same batch encoded step by step."""
    from brushnet.dit.text import DiTTokenizers, encode_tokens
    from brushnet.dit.training import batch_loss

    parts = load_dit_base(tiny_dit_bases[family])
    fam = FAMILIES[family]
    branch = fam.build_branch(parts["transformer"], num_layers=2)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    keep = torch.ones(2, 1, 64, 64)
    keep[:, :, 8:40, 8:40] = 0
    batch = {"pixel_values": pixels, "conditioning_pixel_values": pixels * keep - (1 - keep), "masks": keep}
    batch.update(DiTTokenizers(family, parts)(["a red cat", "a blue dog"]))
    objective = FlowMatchingObjective(weighting_scheme="mode")
    with torch.no_grad():
        ours = batch_loss(fam, parts, branch, batch, objective, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        encoded = encode_batch(parts["vae"], pixels, batch["conditioning_pixel_values"], keep, gen)
        text = encode_tokens(family, parts, {k: v for k, v in batch.items() if k.startswith("input_ids")})
        theirs = objective.loss(
            fam, parts["transformer"], branch, *encoded, text, parts["scheduler"].config, gen
        )
    assert torch.isfinite(ours) and ours.item() == theirs.item()
