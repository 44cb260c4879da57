"""Model-based metrics on tiny random networks, loaded from a config file through the production code path."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
import yaml

from brushnet.evaluation.evaluate import Evaluator
from brushnet.evaluation.scorers import (
    AestheticPaths,
    ClipPaths,
    HPSPaths,
    ImageRewardPaths,
    ImageRewardScore,
    LPIPSPaths,
    ModelPaths,
    build_scorers,
    load_model_paths,
)

from .evaluation_builders import tiny_metric_paths

IMAGES = [
    PIL.Image.fromarray(skimage.data.astronaut()),
    PIL.Image.fromarray(skimage.data.chelsea()).resize((512, 512)),
]
PROMPTS = ["an astronaut", "a cat on a sofa"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metric-weights")
    path = folder / "metrics.yaml"
    path.write_text(yaml.safe_dump(tiny_metric_paths(folder)))
    return path


@pytest.fixture(scope="module")
def scorers(config_file):
    scorers, unavailable = build_scorers(load_model_paths(config_file))
    return scorers, unavailable


def test_all_configured_scorers_load_and_image_reward_is_unavailable(scorers):
    loaded, unavailable = scorers
    assert sorted(loaded) == ["aesthetic_score", "clip_similarity", "hps_v2.1"]
    assert "image_reward.checkpoint" in unavailable["image_reward"]


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects ``get_*_features`` to return tensors; transformers 5 returns output objects
    (``pooler_output`` holds the projected embedding)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        out = self.model.get_image_features(*args, **kwargs)
        return out if torch.is_tensor(out) else out.pooler_output

    def get_text_features(self, *args, **kwargs):
        out = self.model.get_text_features(*args, **kwargs)
        return out if torch.is_tensor(out) else out.pooler_output


# 530 tokens with the test tokenizer: far past CLIP's 77 positions
LONG_CAPTION = " ".join(["a very long caption about an astronaut in a white suit"] * 12)


def test_clip_similarity_matches_torchmetrics_clipscore_including_long_captions(scorers, config_file):
    """The official evaluate_brushnet.py scores with torchmetrics' CLIPScore: same model folder, loaded
    apart, fed as the official script does (uint8 CxHxW tensor + caption, one image per call)."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = yaml.safe_load(config_file.read_text())["clip"]["path"]
    reference = CLIPScore(
        model_name_or_path=lambda: (
            _TensorFeatures(CLIPModel.from_pretrained(folder)),
            CLIPProcessor.from_pretrained(folder),
        )
    )
    clip = scorers[0]["clip_similarity"]
    assert len(clip.processor.tokenizer(LONG_CAPTION)["input_ids"]) > 77
    cases = [(IMAGES[0], PROMPTS[1]), (IMAGES[1], PROMPTS[1]), (IMAGES[0], LONG_CAPTION)]
    expected = []
    for image, caption in cases:
        with torch.no_grad():
            expected.append(float(reference(torch.from_numpy(np.array(image)).permute(2, 0, 1), caption)))
        reference.reset()
    got = [clip([image], [caption])[0] for image, caption in cases]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert all(v > 0 for v in expected)  # none hidden by the clamp at 0
    # batched calls (captions padded together) give the per-image values
    np.testing.assert_allclose(
        clip([c[0] for c in cases], [c[1] for c in cases]), expected, rtol=1e-5, atol=1e-4
    )


def test_aesthetic_score_is_the_head_on_normalised_features(scorers):
    aes = scorers[0]["aesthetic_score"]
    got = aes(IMAGES)
    batch = torch.stack([aes.preprocess(im) for im in IMAGES])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(aes.model.encode_image(batch), dim=-1)
        expected = feats @ aes.head.weight[0] + aes.head.bias[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert got[0] != got[1]


def test_hps_is_the_cosine_of_image_and_text(scorers, config_file):
    hps = scorers[0]["hps_v2.1"]
    got = hps(IMAGES, PROMPTS)
    assert all(-1 <= v <= 1 for v in got)
    # the weights came from the {"state_dict": ...} checkpoint, not a fresh random init
    ckpt = yaml.safe_load(config_file.read_text())["hps"]["checkpoint"]
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(hps.model.state_dict()["text_projection"], stored["text_projection"])
    with torch.no_grad():
        out = hps.model(torch.stack([hps.preprocess(im) for im in IMAGES]), hps.tokenizer(PROMPTS))
    image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    np.testing.assert_allclose(got, (image_f * text_f).sum(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_evaluator_scores_one_image_with_every_available_metric(config_file):
    evaluator = Evaluator.from_paths(load_model_paths(config_file))
    source = np.asarray(IMAGES[0])
    inpaint = np.zeros((512, 512), dtype=bool)
    inpaint[100:300, 100:300] = True
    generated = source.copy()
    generated[inpaint] = 0
    row = evaluator.score(source, generated, inpaint, PROMPTS[0])
    assert list(row) == [
        "psnr",
        "psnr_official",
        "mse",
        "mse_official",
        "lpips",
        "clip_similarity",
        "hps_v2.1",
        "aesthetic_score",
    ]
    assert row["mse"] == 0 and row["lpips"] == 0  # only the hole changed
    assert all(math.isfinite(row[m]) for m in ("clip_similarity", "hps_v2.1", "aesthetic_score"))
    assert evaluator.columns == [
        "hps_v2.1",
        "aesthetic_score",
        "psnr",
        "psnr_official",
        "lpips",
        "mse",
        "mse_official",
        "clip_similarity",
    ]
    assert set(evaluator.unavailable) == {"image_reward"}


def test_absent_weights_are_unavailable_with_the_path(tmp_path):
    missing = str(tmp_path / "nothing-here")
    paths = ModelPaths(
        lpips=LPIPSPaths(backbone=missing),
        clip=ClipPaths(path=missing),
        aesthetic=AestheticPaths(weights=missing, head=missing),
        hps=HPSPaths(checkpoint=missing),
        image_reward=ImageRewardPaths(checkpoint=missing, med_config=missing),
    )
    evaluator = Evaluator.from_paths(paths)
    assert sorted(evaluator.unavailable) == [
        "aesthetic_score",
        "clip_similarity",
        "hps_v2.1",
        "image_reward",
        "lpips",
    ]
    assert all("nothing-here" in reason for reason in evaluator.unavailable.values())
    assert evaluator.columns == ["psnr", "psnr_official", "mse", "mse_official"]
    assert (
        "no weights configured (clip.path)"
        in Evaluator.from_paths(ModelPaths()).unavailable["clip_similarity"]
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"clip": {"pth": "x"}}, r"unknown keys \['pth'\] in section 'clip'"),
        ({"clipscore": {}}, r"unknown keys \['clipscore'\] in the top level"),
        ({"hps": {"checkpoint": 3}}, r"hps\.checkpoint = 3 \(int\): expected str or null"),
        ({"lpips": {"net": ["squeeze"]}}, r"lpips\.net = \['squeeze'\] \(list\): expected str"),
        ({"aesthetic": {"weights": True}}, r"aesthetic\.weights = True \(bool\): expected str or null"),
        ({"clip": "/models/clip"}, r"clip must be a mapping of keys, got '/models/clip'"),
        (["clip"], r"the top level must be a mapping of keys"),
    ],
)
def test_config_errors_name_the_key_and_value(tmp_path, raw, message):
    bad = tmp_path / "m.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=rf"metrics config '{bad}': {message}"):
        load_model_paths(bad)


def test_unreadable_or_missing_config_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_paths(tmp_path / "none.yaml")
    bad = tmp_path / "m.yaml"
    bad.write_text("clip: {path: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML") as info:
        load_model_paths(bad)
    assert "\n" not in str(info.value)


def test_shipped_metrics_config_loads_every_section():
    paths = load_model_paths(Path(__file__).parents[2] / "configs" / "eval" / "metrics.yaml")
    assert paths.lpips.net == "squeeze" and paths.lpips.backbone.endswith("squeezenet1_1-b8a52dc0.pth")
    assert "~" not in paths.lpips.backbone  # expanded
    assert paths.clip.path.endswith("clip-vit-large-patch14")
    assert paths.aesthetic.model == "ViT-L-14-quickgelu" and paths.aesthetic.head.endswith(".pth")
    assert paths.hps.model == "ViT-H-14" and paths.hps.checkpoint.endswith("HPS_v2.1_compressed.pt")
    assert paths.image_reward.checkpoint.endswith("ImageReward.pt")
    assert paths.image_reward.med_config.endswith("med_config.json")


def test_image_reward_goes_through_the_package_with_local_files(tmp_path, monkeypatch):
    ckpt, med = tmp_path / "ImageReward.pt", tmp_path / "med_config.json"
    ckpt.write_bytes(b"weights")
    med.write_text("{}")
    paths = ImageRewardPaths(checkpoint=str(ckpt), med_config=str(med))
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # not installed
    _, unavailable = build_scorers(ModelPaths(image_reward=paths), only=["image_reward"])
    assert "'image-reward' package is not importable" in unavailable["image_reward"]

    calls = []

    class FakeModel:
        def score(self, prompt, images):
            calls.append((prompt, [im.size for im in images]))
            return float(len(prompt))

    def load(name, device="cpu", download_root=None, med_config=None):
        calls.append((name, device, med_config))
        return FakeModel()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    scorer = ImageRewardScore(paths)
    assert calls == [(str(ckpt), "cpu", str(med))]  # never a hub name: no download
    assert scorer(IMAGES, PROMPTS) == [12.0, 15.0]
    assert calls[1:] == [
        (PROMPTS[0], [(512, 512)]),
        (PROMPTS[1], [(512, 512)]),
    ]  # official: score(prompt, [image])
