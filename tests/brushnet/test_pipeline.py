"""BrushNetInpaintPipeline on tiny random SD 1.5 / SD 2 / SDXL bases saved as diffusers folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

from brushnet import BrushNetInpaintPipeline
from brushnet.loading import BranchMismatchError
from brushnet.pipeline import guidance_keep, make_scheduler
from tests.brushnet.branches import save_branch

H, W = 64, 48  # multiples of 8: latents 8 x 6


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[24:40, 16:32] = True  # white = inpaint
    return m


def _run(pipe, seed: int = 0, **kw):
    kw = {"num_inference_steps": 3, "generator": torch.Generator().manual_seed(seed), **kw}
    image, mask = kw.pop("image", _image()), kw.pop("mask", _mask())
    return pipe("a red ball", image, mask, **kw).images


@pytest.fixture(scope="module")
def branches(tiny_bases, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("branches")
    return {kind: save_branch(base, root / kind, seed=1) for kind, base in tiny_bases.items()}


@pytest.fixture(scope="module")
def pipes(tiny_bases, branches) -> dict:
    out = {}
    for kind in tiny_bases:
        pipe = BrushNetInpaintPipeline.from_base(tiny_bases[kind], branches[kind])
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe
    return out


class BranchSpy:
    """Records the keyword arguments of every call of the pipeline's branch."""

    def __init__(self, pipe):
        self.calls: list[dict] = []
        self.handle = pipe.brushnet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        names = ("sample", "timestep")
        self.calls.append({**dict(zip(names, args)), **kwargs})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_image_of_input_size_and_reload_from_saved_pipeline(pipes, kind, tmp_path):
    pipe = pipes[kind]
    assert pipe.is_sdxl == (kind == "sdxl")
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)  # default
    # 60 x 44 is not a multiple of 8: processed at 56 x 40, returned at the input's size.
    image, mask = _image(60, 44), _mask(60, 44)
    out = _run(pipe, image=image, mask=mask)[0]
    assert out.size == (44, 60) and out.mode == "RGB"
    pipe.save_pretrained(tmp_path / "pipe")
    again = BrushNetInpaintPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert type(again.brushnet).__name__ == "BrushNetModel"
    np.testing.assert_array_equal(np.asarray(_run(again, image=image, mask=mask)[0]), np.asarray(out))


def test_blending_keeps_far_pixels_and_no_blend_does_not(pipes):
    image, mask = _image(), _mask()
    blended = np.asarray(_run(pipes["sd15"])[0])
    raw = np.asarray(_run(pipes["sd15"], blend=False)[0])
    far = np.ones_like(mask)
    far[24 - 11 : 40 + 11, 16 - 11 : 32 + 11] = False  # the 21x21 blur reaches 10 px beyond the mask
    np.testing.assert_array_equal(blended[far], image[far])
    assert not np.array_equal(raw[far], image[far])
    # inside the mask the blend is the generated image itself (m = 1 there)
    np.testing.assert_array_equal(blended[mask], raw[mask])
    # a smaller blur feathers less: pixels 5 px from the mask are the input's
    near = np.ones_like(mask)
    near[24 - 5 : 40 + 5, 16 - 5 : 32 + 5] = False
    small = np.asarray(_run(pipes["sd15"], blur_size=9)[0])
    np.testing.assert_array_equal(small[near], image[near])
    assert not np.array_equal(blended[near & ~far], image[near & ~far])


def test_deterministic_with_generator(pipes):
    a = _run(pipes["sd2"], seed=3, output_type="np")
    b = _run(pipes["sd2"], seed=3, output_type="np")
    c = _run(pipes["sd2"], seed=4, output_type="np")
    assert a.dtype == np.uint8 and a.shape == (1, H, W, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_zero_scale_is_the_plain_unet_path(pipes, tiny_base_sd15, tmp_path):
    """Scale 0 skips the branch; a zero-output branch at scale 1 runs it and adds exact zeros."""
    pipe = pipes["sd15"]
    with BranchSpy(pipe) as spy:
        zero_scale = _run(pipe, output_type="latent", brushnet_conditioning_scale=0.0)
    assert spy.calls == []
    zero_branch = BrushNetInpaintPipeline.from_base(
        tiny_base_sd15, save_branch(tiny_base_sd15, tmp_path / "z", None)
    )
    zero_branch.set_progress_bar_config(disable=True)
    with BranchSpy(zero_branch) as spy:
        zero_residuals = _run(zero_branch, output_type="latent")
    assert len(spy.calls) == 3
    torch.testing.assert_close(zero_scale, zero_residuals, rtol=0, atol=0)
    full = _run(pipe, output_type="latent")
    assert (full - zero_scale).abs().max() > 1e-3  # the random branch does change the result
    half = _run(pipe, output_type="latent", brushnet_conditioning_scale=0.5)
    assert not torch.equal(half, full) and not torch.equal(half, zero_scale)


def test_control_guidance_window(pipes):
    pipe = pipes["sd15"]
    with BranchSpy(pipe) as spy:
        _run(pipe, num_inference_steps=10, control_guidance_start=0.2, control_guidance_end=0.6)
    timesteps = pipe.scheduler.timesteps
    # active where i/10 >= 0.2 and (i+1)/10 <= 0.6: steps 2..5
    assert [int(c["timestep"]) for c in spy.calls] == [int(t) for t in timesteps[2:6]]
    assert all(c["conditioning_scale"] == 1.0 for c in spy.calls)
    assert [guidance_keep(i, 4, 0.0, 0.5) for i in range(4)] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="control_guidance_start"):
        _run(pipe, control_guidance_start=0.7, control_guidance_end=0.3)


def test_branch_inputs_cfg_mask_and_masked_image(pipes):
    pipe = pipes["sd15"]
    encoded = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(args[0].clone()))
    try:
        with BranchSpy(pipe) as spy:
            _run(pipe, num_inference_steps=2, guidance_scale=7.5)
    finally:
        hook.remove()
    mask = _mask()
    # the VAE sees the masked image: the hole is black (-1), the rest is the input
    pixels = encoded[0][0]
    assert torch.all(pixels[:, torch.from_numpy(mask)] == -1.0)
    np.testing.assert_allclose(
        pixels[:, ~torch.from_numpy(mask)].numpy(), _image()[~mask].T / 127.5 - 1.0, atol=1e-6
    )
    call = spy.calls[0]
    cond = call["brushnet_cond"]
    assert call["sample"].shape == (2, 4, H // 8, W // 8)  # CFG: [uncond, text]
    assert cond.shape == (2, 5, H // 8, W // 8)
    torch.testing.assert_close(cond[0], cond[1])
    keep = torch.ones(H // 8, W // 8)
    keep[3:5, 2:4] = 0  # rows 24:40, cols 16:32 in pixels
    torch.testing.assert_close(cond[0, 4], keep)  # mask channel: 1 = keep
    # no guidance: no duplication; guess mode: branch on the text half only
    with BranchSpy(pipe) as spy:
        _run(pipe, num_inference_steps=1, guidance_scale=1.0)
        _run(pipe, num_inference_steps=1, guess_mode=True)
    assert [c["sample"].shape[0] for c in spy.calls] == [1, 1]
    assert spy.calls[1]["guess_mode"] is True


@pytest.mark.parametrize(("guess_mode", "halves"), [(False, 2), (True, 1)])
def test_official_masked_image_encoding_samples_the_vae_per_cfg_half(pipes, guess_mode, halves):
    """Official pipelines VAE-encode the CFG-doubled masked image (prepare_image(do_classifier_free_guidance)):
    one VAE sample per image and CFG half (guess mode: the text half only); "once" shares one sample."""
    pipe = pipes["sd15"]
    encoded = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(args[0].shape[0]))
    try:
        with BranchSpy(pipe) as spy:
            _run(pipe, num_inference_steps=1, guess_mode=guess_mode, num_images_per_prompt=2)
            _run(pipe, num_inference_steps=1, guess_mode=guess_mode, masked_image_encoding="official")
            _run(
                pipe,
                num_inference_steps=1,
                guess_mode=guess_mode,
                num_images_per_prompt=2,
                masked_image_encoding="official",
            )
    finally:
        hook.remove()
    assert encoded == [1, halves, 2 * halves]
    once, official, official_2 = (c["brushnet_cond"] for c in spy.calls)
    assert once.shape[0] == official_2.shape[0] == 2 * halves and official.shape[0] == halves
    for cond in (once, official, official_2):
        torch.testing.assert_close(cond[:, 4], once[:1, 4].expand(len(cond), -1, -1))  # one mask for all
    torch.testing.assert_close(once[:, :4], once[:1, :4].expand(len(once), -1, -1, -1))  # one VAE sample
    assert torch.pdist(official_2[:, :4].flatten(1)).min() > 0  # a VAE sample of its own per copy
    with pytest.raises(ValueError, match="masked_image_encoding must be 'once' or 'official', got 'twice'"):
        _run(pipe, num_inference_steps=1, masked_image_encoding="twice")


def test_per_layer_scale_list_is_passed_through(pipes):
    pipe = pipes["sd15"]
    n = sum(pipe.brushnet.num_residuals)
    scales = [0.5] * n
    with BranchSpy(pipe) as spy:
        _run(pipe, num_inference_steps=2, brushnet_conditioning_scale=scales, control_guidance_end=0.5)
    assert len(spy.calls) == 1 and spy.calls[0]["conditioning_scale"] == scales
    with pytest.raises(ValueError, match="per-layer"):
        _run(pipe, brushnet_conditioning_scale=[1.0, 1.0])


def test_sdxl_added_conditioning(pipes):
    pipe = pipes["sdxl"]
    with BranchSpy(pipe) as spy:
        _run(pipe, num_inference_steps=1)
        _run(pipe, num_inference_steps=1, negative_prompt="blurry")
    added = spy.calls[0]["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 32)
    assert added["time_ids"].tolist() == [[H, W, 0, 0, H, W]] * 2
    assert spy.calls[0]["encoder_hidden_states"].shape == (2, 77, 64)  # 32 + 32 penultimate states
    # no negative prompt: SDXL's zeroed unconditional embeddings (force_zeros_for_empty_prompt)
    assert torch.all(added["text_embeds"][0] == 0) and torch.any(added["text_embeds"][1] != 0)
    assert torch.any(spy.calls[1]["added_cond_kwargs"]["text_embeds"][0] != 0)


def test_mask_of_other_size(pipes):
    pipe = pipes["sd15"]
    big = np.kron(_mask(), np.ones((2, 2), bool))  # same aspect ratio: resized
    np.testing.assert_array_equal(
        _run(pipe, mask=big, output_type="np"), _run(pipe, mask=_mask(), output_type="np")
    )
    with pytest.raises(ValueError, match=r"mask size 64x64 \(WxH\) does not match the image size 48x64"):
        _run(pipe, mask=np.zeros((64, 64), bool))


def test_missing_files_are_named(pipes, tiny_base_sd15, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        _run(pipes["sd15"], image=str(tmp_path / "nope.png"))
    with pytest.raises(FileNotFoundError, match=r"no-mask\.png"):
        _run(pipes["sd15"], mask=tmp_path / "no-mask.png")
    with pytest.raises(FileNotFoundError, match="no-branch"):
        BrushNetInpaintPipeline.from_base(tiny_base_sd15, tmp_path / "no-branch")


def test_mismatched_branch_names_both_configs(tiny_base_sd15, branches):
    with pytest.raises(BranchMismatchError, match=r"sdxl.*sd15.*addition_embed_type"):
        BrushNetInpaintPipeline.from_base(tiny_base_sd15, branches["sdxl"])


def test_unipc_ends_at_the_smallest_sigma_as_diffusers_0_27(pipes, tiny_base_sd15):
    """The official BrushNet ran diffusers 0.27's UniPC, whose last sigma is sqrt((1 - a0) / a0) of the
    training schedule; stock diffusers now ends at 0 (final_sigmas_type="zero")."""
    base_config = DDPMScheduler.from_pretrained(tiny_base_sd15, subfolder="scheduler").config
    ours, stock = make_scheduler("unipc", base_config), make_scheduler("UniPCMultistepScheduler", base_config)
    assert isinstance(ours, UniPCMultistepScheduler) and ours.config.final_sigmas_type == "sigma_min"
    for scheduler in (ours, stock):
        scheduler.set_timesteps(50)
    a0 = float(ours.alphas_cumprod[0])
    assert float(ours.sigmas[-1]) == pytest.approx(((1 - a0) / a0) ** 0.5, rel=1e-5)
    assert float(ours.sigmas[-1]) > 0 and float(stock.sigmas[-1]) == 0.0
    torch.testing.assert_close(ours.sigmas[:-1], stock.sigmas[:-1])  # only the last step differs
    assert ours.timesteps.tolist() == stock.timesteps.tolist()
    assert pipes["sd15"].scheduler.config.final_sigmas_type == "sigma_min"  # from_base's default "unipc"


def test_scheduler_by_name_keeps_base_config(pipes):
    base_config = pipes["sd2"].scheduler.config
    ddim = make_scheduler("ddim", base_config)
    assert isinstance(ddim, DDIMScheduler) and ddim.config.prediction_type == "v_prediction"
    assert type(make_scheduler("EulerDiscreteScheduler", base_config)).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        make_scheduler("nope", base_config)
    pipe = BrushNetInpaintPipeline(**{**pipes["sd2"].components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)
    assert _run(pipe)[0].size == (W, H)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_prompt_batch_and_images_per_prompt(pipes, kind):
    pipe = pipes[kind]
    gen = torch.Generator().manual_seed(0)
    with BranchSpy(pipe) as spy:
        out = pipe(
            ["a", "b"], _image(), _mask(), num_inference_steps=1, num_images_per_prompt=2, generator=gen
        )
    assert len(out.images) == 4 and all(im.size == (W, H) for im in out.images)
    call = spy.calls[0]
    assert (
        call["sample"].shape[0]
        == call["brushnet_cond"].shape[0]
        == call["encoder_hidden_states"].shape[0]
        == 8
    )
    if kind == "sdxl":
        assert call["added_cond_kwargs"]["time_ids"].shape == (8, 6)
    with pytest.raises(ValueError, match="2 prompts but 3 negative prompts"):
        pipe(["a", "b"], _image(), _mask(), negative_prompt=["x", "y", "z"])


def test_half_precision_runs_the_vae_in_fp32_when_asked(tiny_base_sdxl, branches):
    pipe = BrushNetInpaintPipeline.from_base(tiny_base_sdxl, branches["sdxl"], torch_dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast and pipe.brushnet.dtype == torch.float16
    seen = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        out = _run(pipe, num_inference_steps=2, output_type="np")
    finally:
        hook.remove()
    assert seen == [torch.float32] and pipe.vae.dtype == torch.float16  # upcast for the call only
    assert out.shape == (1, H, W, 3)


def test_from_pretrained_with_a_brushnet_is_from_base(tiny_base_sdxl, branches):
    """diffusers' ControlNet convention, ``from_pretrained(base, brushnet=...)``, is the same constructor as
    ``from_base``: same components, scheduler and output."""
    kw = {"scheduler": "ddim", "torch_dtype": torch.float32}
    alias = BrushNetInpaintPipeline.from_pretrained(tiny_base_sdxl, brushnet=branches["sdxl"], **kw)
    direct = BrushNetInpaintPipeline.from_base(tiny_base_sdxl, branches["sdxl"], **kw)
    for pipe in (alias, direct):
        pipe.set_progress_bar_config(disable=True)
    assert isinstance(alias.scheduler, DDIMScheduler) and alias.is_sdxl
    assert alias.config.force_zeros_for_empty_prompt == direct.config.force_zeros_for_empty_prompt
    a, b = _run(alias, output_type="np"), _run(direct, output_type="np")
    assert np.array_equal(a, b) and a.std() > 0
    with pytest.raises(TypeError, match="keyword arguments only"):
        BrushNetInpaintPipeline.from_pretrained(tiny_base_sdxl, None, brushnet=branches["sdxl"])
