"""Model-based metrics on tiny random networks, loaded from a config file through the production code path."""

from __future__ import annotations

import json
import math
import sys
import types

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


def test_clip_similarity_is_clamped_100_cosine(scorers):
    clip = scorers[0]["clip_similarity"]
    got = clip(IMAGES, PROMPTS)
    inputs = clip.processor(text=PROMPTS, images=IMAGES, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    np.testing.assert_allclose(got, (100 * cos).clamp(min=0).numpy(), rtol=1e-5, atol=1e-4)
    assert all(0 <= v <= 100 for v in got)


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


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"clip": {"pth": "x"}}))
    with pytest.raises(ValueError, match=r"section 'clip' has unknown keys \['pth'\]"):
        load_model_paths(bad)
    bad.write_text(json.dumps({"clipscore": {}}))
    with pytest.raises(ValueError, match="unknown section 'clipscore'"):
        load_model_paths(bad)
    bad.write_text(json.dumps({"hps": {"checkpoint": 3}}))
    with pytest.raises(ValueError, match=r"hps.checkpoint must be a string"):
        load_model_paths(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_model_paths(tmp_path / "none.yaml")


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
