"""`BrushNetModel`: the trainable, attention-free branch of BrushNet.

The branch is a copy of the base UNet's convolutional skeleton (no attention anywhere: ``DownBlock2D``,
a two-resnet ``MidBlock2D``, ``UpBlock2D``) whose input is the noisy latent concatenated with the
masked-image latent and the mask (4 + 4 + 1 channels). Every layer's output passes through a
zero-initialised 1x1 conv and is returned as a residual for the matching layer of the frozen UNet
(see :mod:`brushnet.injection`).

Config fields, defaults, module names and therefore state-dict keys follow the official
``BrushNetModel`` (TencentARC/BrushNet ``src/diffusers/models/brushnet.py``), so released checkpoints
load here unchanged and ours load in the official pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from brushnet.branch_blocks import MidBlock2D, build_blocks, walk_down, walk_mid, walk_up

Residuals = tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]

# The paper's ablation switches (README "Ablations"): not in the official config. At these defaults they are
# left out of config.json, so a default branch folder stays exactly the official format.
ABLATION_DEFAULTS = {"injection": "full", "condition_encoder": "vae"}
INJECTIONS = ("full", "half", "controlnet")
CONDITION_ENCODERS = ("vae", "conv")
__all__ = ["ABLATION_DEFAULTS", "BrushNetModel", "BrushNetOutput", "MidBlock2D", "Residuals"]


@dataclass
class BrushNetOutput(BaseOutput):
    """The branch's scaled residuals for the frozen UNet: one per down-block output, the mid block, one per
    up-block output. Field names as the official ``BrushNetOutput``; declared in the order of the
    ``return_dict=False`` tuple, so ``to_tuple()`` gives ``(down, mid, up)`` (official: ``up`` first)."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor
    up_block_res_samples: list[torch.Tensor]


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class BrushNetModel(ModelMixin, ConfigMixin):
    """The BrushNet branch. Build it with :meth:`from_unet` or load it with ``from_pretrained``.

    Unused-by-the-branch fields (``cross_attention_dim``, ``attention_head_dim``,
    ``transformer_layers_per_block`` ...) are kept so the config equals the official one and records
    which base UNet the branch was cloned from.

    Ablation switches (defaults = BrushNet; see the README's "Ablations"):

    * ``injection``: ``full`` adds a residual to every layer of the UNet (encoder, mid, decoder); ``half``
      copies only the encoder and mid block and adds their residuals layer by layer to the UNet's
      encoder and mid block (the decoder gets none); ``controlnet`` copies the same half but adds its
      residuals where ControlNet does: to the skip connections the decoder reads and to the mid block's
      output (the UNet's own ``down_block_additional_residuals``). ``half``/``controlnet`` branches have no
      ``up_blocks`` (absent, not zero).
    * ``condition_encoder``: ``vae`` reads ``[masked-image latents, mask]`` concatenated with the noisy
      latent; ``conv`` reads the pixel-space ``[masked image, mask]`` (4 channels) through ControlNet's
      randomly initialised conv embedding (zero-initialised output) added after ``conv_in``.
    * attention: ``down/mid/up_block_types`` with cross-attention blocks (``from_unet(...,
      branch_cross_attention=True)``) keep the UNet's attention layers; the branch then reads the text.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4,
        mid_block_type: str | None = "MidBlock2D",
        up_block_types: tuple[str, ...] = ("UpBlock2D",) * 4,
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        injection: str = "full",
        condition_encoder: str = "vae",
    ):
        super().__init__()
        self._check_supported(down_block_types, up_block_types, mid_block_type, block_out_channels)
        if injection not in INJECTIONS or condition_encoder not in CONDITION_ENCODERS:
            raise ValueError(
                f"injection must be one of {INJECTIONS} and condition_encoder one of {CONDITION_ENCODERS}, "
                f"got {injection!r} / {condition_encoder!r}"
            )
        c0 = block_out_channels[0]
        time_embed_dim = c0 * 4

        # Module creation order follows the official class so state-dict key order matches too.
        if condition_encoder == "vae":
            self.conv_in_condition = nn.Conv2d(
                in_channels + conditioning_channels, c0, kernel_size=3, padding=1
            )
        else:
            self.conv_in_condition = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
            self.conditioning_embedding = ControlNetConditioningEmbedding(
                c0, conditioning_channels, tuple(conditioning_embedding_out_channels)
            )
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim, act_fn=act_fn)
        if addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        self.down_blocks, mid_block, up_blocks = build_blocks(
            self.config, time_embed_dim, injection == "full"
        )
        self.brushnet_down_blocks = nn.ModuleList([_zero_conv(c0)])
        for i, ch in enumerate(block_out_channels):
            n_outputs = layers_per_block + (0 if i == len(block_out_channels) - 1 else 1)
            self.brushnet_down_blocks.extend(_zero_conv(ch) for _ in range(n_outputs))
        self.brushnet_mid_block = _zero_conv(block_out_channels[-1])
        self.mid_block = mid_block
        self.up_blocks = up_blocks
        self.brushnet_up_blocks = nn.ModuleList()
        for i, ch in enumerate(reversed(block_out_channels) if injection == "full" else []):
            n_outputs = layers_per_block + 1 + (0 if i == len(block_out_channels) - 1 else 1)
            self.brushnet_up_blocks.extend(_zero_conv(ch) for _ in range(n_outputs))

        self.gradient_checkpointing = False

    @staticmethod
    def _check_supported(down_types, up_types, mid_type, block_out_channels) -> None:
        down_ok = {"DownBlock2D", "CrossAttnDownBlock2D"}
        up_ok = {"UpBlock2D", "CrossAttnUpBlock2D"}
        if not set(down_types) <= down_ok or not set(up_types) <= up_ok:
            raise ValueError(
                f"BrushNetModel supports down_block_types {sorted(down_ok)} and up_block_types "
                f"{sorted(up_ok)}, got {list(down_types)} / {list(up_types)}"
            )
        if mid_type not in ("MidBlock2D", "UNetMidBlock2DCrossAttn"):
            raise ValueError(
                f"mid_block_type must be 'MidBlock2D' (official config) or 'UNetMidBlock2DCrossAttn', "
                f"got {mid_type!r}"
            )
        if not (len(down_types) == len(up_types) == len(block_out_channels)):
            raise ValueError(
                f"down_block_types ({len(down_types)}), up_block_types ({len(up_types)}) and "
                f"block_out_channels ({len(block_out_channels)}) must have the same length"
            )

    @classmethod
    def from_unet(
        cls,
        unet,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int | None = None,
        injection: str = "full",
        condition_encoder: str = "vae",
        branch_cross_attention: bool = False,
        vae_scale_factor: int = 8,
    ) -> BrushNetModel:
        """Clone a branch from a diffusers ``UNet2DConditionModel`` (SD 1.5, SD 2.x, SDXL).

        The input conv copies the UNet's ``conv_in`` into both latent halves (noisy and masked-image
        latents) with a zero mask channel; its bias is an independent copy (the official code aliases
        the frozen UNet's bias, which therefore never trains). Resnets, samplers and time embeddings are
        copied; for SDXL the ``add_embedding`` is copied too (the official code leaves it random).

        Ablations (see the class docstring): ``injection``, ``condition_encoder`` (``conv``: the conv
        embedding downsamples by ``vae_scale_factor``, taking that many of
        ``conditioning_embedding_out_channels``; ``conditioning_channels`` defaults to 5 for ``vae`` and 4
        for ``conv``), ``branch_cross_attention`` (keep the UNet's attention blocks).
        """
        cfg = unet.config
        unsupported = {
            k: cfg.get(k)
            for k in ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type")
            if cfg.get(k) is not None
        }
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            unsupported["addition_embed_type"] = cfg.get("addition_embed_type")
        if unsupported:
            raise ValueError(f"BrushNetModel.from_unet does not support UNet config fields {unsupported}")
        n = len(cfg.down_block_types)
        if conditioning_channels is None:
            conditioning_channels = 5 if condition_encoder == "vae" else 4
        if condition_encoder == "conv":
            n_embed = vae_scale_factor.bit_length()  # 8 -> 4 stages: three stride-2 convs (ControlNet)
            conditioning_embedding_out_channels = tuple(conditioning_embedding_out_channels)[:n_embed]
        attention = branch_cross_attention
        branch = cls(
            injection=injection,
            condition_encoder=condition_encoder,
            in_channels=cfg.in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            down_block_types=list(cfg.down_block_types) if attention else ["DownBlock2D"] * n,
            mid_block_type=cfg.mid_block_type if attention else "MidBlock2D",
            up_block_types=list(cfg.up_block_types) if attention else ["UpBlock2D"] * n,
            only_cross_attention=cfg.only_cross_attention,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            downsample_padding=cfg.downsample_padding,
            mid_block_scale_factor=cfg.mid_block_scale_factor,
            act_fn=cfg.act_fn,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            cross_attention_dim=cfg.cross_attention_dim,
            transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
            encoder_hid_dim=None,
            encoder_hid_dim_type=None,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            use_linear_projection=cfg.use_linear_projection,
            class_embed_type=None,
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
            num_class_embeds=None,
            upcast_attention=cfg.upcast_attention,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
            brushnet_conditioning_channel_order=brushnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        if load_weights_from_unet:
            branch._copy_weights_from(unet)
        return branch if unet.dtype == branch.dtype else branch.to(dtype=unet.dtype)

    @torch.no_grad()
    def _copy_weights_from(self, unet) -> None:
        latent = unet.config.in_channels
        w = torch.zeros_like(self.conv_in_condition.weight)
        w[:, :latent] = unet.conv_in.weight
        if self.config.condition_encoder == "vae":
            w[:, latent : 2 * latent] = unet.conv_in.weight
        self.conv_in_condition.weight.copy_(w)
        self.conv_in_condition.bias.copy_(unet.conv_in.bias)
        self.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        if self.config.addition_embed_type == "text_time":
            self.add_embedding.load_state_dict(unet.add_embedding.state_dict())
        # The branch's blocks are the UNet's blocks minus attention: every branch key must exist in
        # the UNet with the same shape (no silent strict=False).
        for name in ("down_blocks", "mid_block") + (("up_blocks",) if len(self.up_blocks) else ()):
            ours, theirs = getattr(self, name), getattr(unet, name).state_dict()
            for key, tensor in ours.state_dict().items():
                if key not in theirs or theirs[key].shape != tensor.shape:
                    found = tuple(theirs[key].shape) if key in theirs else "missing"
                    raise ValueError(
                        f"cannot clone {name}.{key} {tuple(tensor.shape)} from the UNet (found {found})"
                    )
                tensor.copy_(theirs[key])

    @property
    def has_cross_attention(self) -> bool:
        return any(getattr(b, "has_cross_attention", False) for b in (*self.down_blocks, self.mid_block))

    def to_json_string(self) -> str:
        """The config as diffusers writes it, without the ablation switches that are at their defaults."""
        config = json.loads(super().to_json_string())
        for key, default in ABLATION_DEFAULTS.items():
            if config.get(key) == default:
                config.pop(key)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @property
    def num_residuals(self) -> tuple[int, int, int]:
        """(down, mid, up) residual counts: the length of each list the UNet receives."""
        return len(self.brushnet_down_blocks), 1, len(self.brushnet_up_blocks)

    def _scales(self, conditioning_scale: float | Sequence[float], guess_mode: bool, device) -> list:
        n = sum(self.num_residuals)
        if guess_mode and not self.config.global_pool_conditions:
            # official: torch.logspace(-1, 0, n) * conditioning_scale, from 0.1 (first down) to 1.0 (last up)
            return list(torch.logspace(-1, 0, n, device=device) * conditioning_scale)
        if isinstance(conditioning_scale, (int, float)):
            return [conditioning_scale] * n
        scales = list(conditioning_scale)
        if len(scales) != n:
            raise ValueError(
                f"a per-layer conditioning_scale needs {n} values (down, mid, up), got {len(scales)}"
            )
        return scales

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> BrushNetOutput | Residuals:
        """Per-layer residuals for the frozen UNet, each times its scale: a :class:`BrushNetOutput`, or the
        tuple ``(down list, mid, up list)`` with ``return_dict=False``.

        ``brushnet_cond`` is ``cat([masked_image_latents, mask], 1)`` with mask 1 = keep (``condition_encoder=
        "conv"``: ``cat([masked image in [-1, 1], mask], 1)`` at pixel size, see
        :func:`brushnet.injection.branch_condition`). ``encoder_hidden_states`` is read only by a branch
        with cross-attention (the default branch has none).
        """
        if self.config.brushnet_conditioning_channel_order == "bgr":
            brushnet_cond = torch.flip(brushnet_cond, dims=[1])
        emb = self._time_embedding(sample, timestep, added_cond_kwargs)
        text = encoder_hidden_states if self.has_cross_attention else None

        if self.config.condition_encoder == "vae":
            h = self.conv_in_condition(torch.cat([sample, brushnet_cond], dim=1))
        else:
            h = self.conv_in_condition(sample) + self.conditioning_embedding(brushnet_cond.to(sample.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, outs = walk_down(block, h, emb, text, self._run)
            skips += outs
        down = [conv(s) for conv, s in zip(self.brushnet_down_blocks, skips)]

        h = walk_mid(self.mid_block, h, emb, text, self._run)
        mid = self.brushnet_mid_block(h)

        up_feats = []
        for block in self.up_blocks:
            h, outs = walk_up(block, h, skips, emb, text, self._run)
            up_feats += outs
        up = [conv(f) for conv, f in zip(self.brushnet_up_blocks, up_feats)]

        scales = self._scales(conditioning_scale, guess_mode, sample.device)
        nd = len(down)
        down = [r * s for r, s in zip(down, scales[:nd])]
        mid = mid * scales[nd]
        up = [r * s for r, s in zip(up, scales[nd + 1 :])]
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
            up = [r.mean(dim=(2, 3), keepdim=True) for r in up]
        if not return_dict:
            return down, mid, up
        return BrushNetOutput(down_block_res_samples=down, mid_block_res_sample=mid, up_block_res_samples=up)

    def _time_embedding(self, sample, timestep, added_cond_kwargs) -> torch.Tensor:
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64)
        t = t.to(sample.device).reshape(-1).expand(sample.shape[0])  # a scalar or B timesteps
        emb = self.time_embedding(self.time_proj(t).to(dtype=sample.dtype))
        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= added_cond_kwargs.keys():
                raise ValueError(
                    "this BrushNet (addition_embed_type='text_time', SDXL) needs added_cond_kwargs with "
                    "'text_embeds' and 'time_ids'"
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            add = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add)
        return emb
