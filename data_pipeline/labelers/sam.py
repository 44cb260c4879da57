"""segment-anything labeller: `SamAutomaticMaskGenerator` on a registry model or a tiny random one (tests)."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import SamConfig
from data_pipeline.labelers.base import MaskProposal

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_sam():
    """A randomly initialised Sam from segment-anything's own classes: ViT depth 2, 64 dims, 256 px input."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch, prompt_dim = 256, 16, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],  # segment_anything/build_sam.py
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_sam(model_type: str, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Build `model_type` (vit_h | vit_l | vit_b from `sam_model_registry`, or `tiny`) and load `checkpoint`.

    Registry models and `tiny` load weights through the same code (a `torch.save(state_dict)` file, strict).
    """
    from segment_anything import sam_model_registry

    if model_type == "tiny":
        sam = build_tiny_sam()
    elif model_type in sam_model_registry and model_type != "default":
        if checkpoint is None:
            raise ValueError(
                f"SAM model_type {model_type!r} needs label.sam.checkpoint (no weights can be guessed)"
            )
        sam = sam_model_registry[model_type](checkpoint=None)
    else:
        raise ValueError(f"unknown SAM model_type {model_type!r}; expected vit_h, vit_l, vit_b or tiny")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {path}")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        try:
            sam.load_state_dict(state_dict)
        except RuntimeError as e:
            raise ValueError(f"SAM checkpoint {path} does not match model_type {model_type!r}: {e}") from e
    return sam.eval()


class SamLabeler:
    """Automatic mask generation; score = predicted IoU x stability score (both in [0, 1])."""

    def __init__(self, cfg: SamConfig, sam: torch.nn.Module | None = None) -> None:
        import segment_anything
        from segment_anything import SamAutomaticMaskGenerator

        self.cfg = cfg
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"label.sam.dtype: expected one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
        self.device = torch.device(device)
        self.dtype = _DTYPES[cfg.dtype]
        model = (sam if sam is not None else build_sam(cfg.model_type, cfg.checkpoint)).to(self.device)
        self.generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            min_mask_region_area=cfg.min_mask_region_area,
            output_mode="binary_mask",
        )
        ckpt = Path(cfg.checkpoint).name if cfg.checkpoint else "random-init"
        self.name = f"sam-{cfg.model_type}"
        self.version = f"segment-anything {getattr(segment_anything, '__version__', '1.0')}, {ckpt}"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32 or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    @staticmethod
    def _proposals(records: list[dict]) -> list[MaskProposal]:
        return [
            MaskProposal(
                mask=np.asarray(r["segmentation"], dtype=bool),
                score=float(np.clip(r["predicted_iou"], 0, 1) * np.clip(r["stability_score"], 0, 1)),
            )
            for r in records
        ]

    @torch.inference_mode()
    def propose(self, image: np.ndarray) -> list[MaskProposal]:
        with self._autocast():
            return self._proposals(self.generator.generate(np.ascontiguousarray(image)))

    @torch.inference_mode()
    def propose_batch(self, images: list[np.ndarray]) -> list[list[MaskProposal]]:
        """Encode all images in one image-encoder forward, then run the point-grid decoding per image.

        The generator (no crop layers) calls `predictor.set_image` once per image; here that call installs
        the precomputed embedding instead of encoding again (segment-anything 1.0 SamPredictor fields).
        """
        if len(images) == 1:
            return [self.propose(images[0])]
        predictor = self.generator.predictor
        inputs, sizes = [], []
        for image in images:
            resized = predictor.transform.apply_image(np.ascontiguousarray(image))
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            sizes.append((tuple(image.shape[:2]), tuple(x.shape[-2:])))
            inputs.append(predictor.model.preprocess(x))  # normalise + pad to the encoder's square input
        with self._autocast():
            features = predictor.model.image_encoder(torch.cat(inputs))
        results = []
        for i, image in enumerate(images):

            def use_precomputed(_image: np.ndarray, i: int = i) -> None:
                predictor.reset_image()
                predictor.original_size, predictor.input_size = sizes[i]
                predictor.features = features[i : i + 1]
                predictor.is_image_set = True

            predictor.set_image = use_precomputed
            try:
                with self._autocast():
                    results.append(self._proposals(self.generator.generate(np.ascontiguousarray(image))))
            finally:
                del predictor.set_image
        return results
