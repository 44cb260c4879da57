"""Label stage: labellers (classical, tiny random SAM), mask selection, BrushData output, shard planning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from brushnet.brushdata import decode_sample, read_sample, scan_shard
from data_pipeline.config import LabelConfig, SamConfig
from data_pipeline.label import run_label
from data_pipeline.labelers import MaskProposal, make_labeler, select_masks
from data_pipeline.labelers.classical import ClassicalLabeler
from data_pipeline.labelers.sam import SamLabeler, build_sam
from data_pipeline.sharding import TaskSlice
from tests.data_pipeline.helpers import photo, write_download_unit


class Recording:
    """Wraps a real labeller and keeps what it proposed per image (to compare with what was written)."""

    def __init__(self, inner):
        self.inner, self.name, self.version = inner, inner.name, inner.version
        self.calls: list[tuple[np.ndarray, list[MaskProposal]]] = []

    def propose(self, image):
        out = self.inner.propose(image)
        self.calls.append((image, out))
        return out


class BoxLabeler:
    """A cheap deterministic labeller for plumbing tests: one centred box per image."""

    name, version = "box", "test"

    def propose(self, image):
        mask = np.zeros(image.shape[:2], dtype=bool)
        h, w = mask.shape
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
        return [MaskProposal(mask, 0.9)]


def _read_shard(path):
    return [decode_sample(read_sample(path, r), key=r.key, shard=path.name) for r in scan_shard(path)]


def _tiny_sam_cfg(**kw) -> SamConfig:
    return SamConfig(
        model_type="tiny", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, **kw
    )


def test_select_masks_filters_area_and_score_and_keeps_best_k():
    def prop(area, score):
        m = np.zeros((10, 10), dtype=bool)
        m.flat[:area] = True
        return MaskProposal(m, score)

    props = [prop(1, 0.99), prop(30, 0.5), prop(20, 0.9), prop(95, 0.95), prop(40, 0.9), prop(10, 0.1)]
    kept = select_masks(props, min_area_frac=0.05, max_area_frac=0.9, min_score=0.2, max_masks=2)
    assert [(p.area, p.score) for p in kept] == [(40, 0.9), (20, 0.9)]


def test_classical_labeler_segments_objects_of_a_real_photo():
    image = photo("astronaut")
    props = ClassicalLabeler().propose(image)
    kept = select_masks(props, min_area_frac=0.01, max_area_frac=0.8, min_score=0.0, max_masks=16)
    assert len(kept) >= 3
    assert all(p.mask.shape == image.shape[:2] and p.mask.dtype == bool for p in kept)
    # distinct regions, not one mask repeated
    assert len({p.mask.tobytes() for p in kept}) == len(kept)
    assert all(0.0 <= p.score <= 1.0 for p in kept)


def test_auto_labeler_falls_back_to_classical_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        labeler = make_labeler(LabelConfig(labeler="auto"))
    assert labeler.name == "classical-felzenszwalb"
    assert "CLASSICAL" in caplog.text and "label.sam.checkpoint" in caplog.text


def test_build_sam_loads_a_saved_checkpoint_through_the_registry_path(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), ckpt)
    torch.manual_seed(1)
    loaded = build_sam("tiny", ckpt)
    for (name, a), b in zip(sam.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    image = photo("coffee", max_side=128)
    cfg = _tiny_sam_cfg(checkpoint=str(ckpt))
    ref = SamLabeler(cfg, sam=sam).propose(image)
    got = make_labeler(LabelConfig(labeler="auto", sam=cfg)).propose(image)  # auto + checkpoint -> SAM
    assert len(ref) == len(got) >= 1
    for a, b in zip(ref, got):
        assert np.array_equal(a.mask, b.mask) and a.score == pytest.approx(b.score)
    broken = {k: v for k, v in sam.state_dict().items() if not k.startswith("mask_decoder")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth does not match model_type 'tiny'"):
        build_sam("tiny", tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_sam("tiny", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"needs label\.sam\.checkpoint"):
        build_sam("vit_b")


def test_label_stage_on_tiny_sam_writes_official_brushdata_whose_rle_equals_the_masks(tmp_path):
    images = [photo("astronaut", 128), photo("rocket", 128)]
    keys = write_download_unit(tmp_path, images)
    torch.manual_seed(0)
    cfg = LabelConfig(labeler="sam", sam=_tiny_sam_cfg(), min_area_frac=0.0, max_area_frac=1.0, max_masks=3)
    labeler = Recording(SamLabeler(cfg.sam))
    report = run_label(tmp_path, [tmp_path / "filtered" / "part-00000.parquet"], cfg, labeler=labeler)
    assert report.ok == 2 and report.failed == 0
    assert sorted(p.name for p in (tmp_path / "brushdata").iterdir()) == ["p00000-00000.tar"]
    samples = _read_shard(tmp_path / "brushdata" / "p00000-00000.tar")
    assert [s.key for s in samples] == [f"p00000_{k}" for k in keys]
    for sample, (image, proposals) in zip(samples, labeler.calls):
        expected = select_masks(proposals, min_area_frac=0.0, max_area_frac=1.0, min_score=0.0, max_masks=3)
        assert len(sample.masks_rle) == len(expected) >= 1
        for i, p in enumerate(expected):
            assert np.array_equal(sample.mask(i), p.mask)
        assert (sample.height, sample.width) == image.shape[:2]
        assert sample.caption == f"photo {sample.meta['source_key']}"
        assert sample.meta["labeler"]["name"] == "sam-tiny"
        assert sample.meta["punsafe"] is None and sample.meta["aesthetic_score"] == 6.5
        assert [m["area"] for m in sample.meta["masks"]] == [p.area for p in expected]


def test_label_shards_cut_by_samples_per_shard_split_by_task_and_skip_done(tmp_path):
    write_download_unit(tmp_path, [photo("coffee", 128)] * 5, name="p00000", per_tar=3)
    write_download_unit(tmp_path, [photo("rocket", 128)] * 2, name="p00001")
    parts = sorted((tmp_path / "filtered").glob("part-*.parquet"))
    cfg = LabelConfig(samples_per_shard=2)
    first = run_label(tmp_path, parts, cfg, TaskSlice(1, 2), labeler=BoxLabeler())
    assert sorted(p.name for p in (tmp_path / "brushdata").iterdir()) == ["p00001-00000.tar"]
    second = run_label(tmp_path, parts, cfg, TaskSlice(0, 2), labeler=BoxLabeler())
    names = sorted(p.name for p in (tmp_path / "brushdata").iterdir())
    assert names == ["p00000-00000.tar", "p00000-00001.tar", "p00000-00002.tar", "p00001-00000.tar"]
    sizes = [len(scan_shard(tmp_path / "brushdata" / n)) for n in names]
    assert sizes == [2, 2, 1, 2] and first.ok + second.ok == 7
    keys = [r.key for n in names[:3] for r in scan_shard(tmp_path / "brushdata" / n)]
    assert len(set(keys)) == 5  # across the two source tars, in order, no duplicate
    again = run_label(tmp_path, parts, cfg, labeler=BoxLabeler())
    assert again.ok == 0 and again.details["shards_skipped"] == 4


def test_images_without_masks_are_skipped_and_leave_no_empty_tar(tmp_path):
    write_download_unit(tmp_path, [photo("camera", 128)] * 2)
    cfg = LabelConfig(min_area_frac=0.9)  # nothing that big: every image is skipped
    report = run_label(tmp_path, [tmp_path / "filtered" / "part-00000.parquet"], cfg, labeler=BoxLabeler())
    assert report.skipped == 2 and report.details["skipped: no mask kept"] == 2
    assert list((tmp_path / "brushdata").iterdir()) == []
    again = run_label(tmp_path, [tmp_path / "filtered" / "part-00000.parquet"], cfg, labeler=BoxLabeler())
    assert again.details["shards_skipped"] == 1


def test_sam_batch_labelling_matches_one_image_at_a_time(tmp_path):
    torch.manual_seed(0)
    labeler = SamLabeler(_tiny_sam_cfg())
    images = [photo("coffee", 128), photo("astronaut", 96)]  # different sizes: padding handled per image
    batched = labeler.propose_batch(images)
    for image, got in zip(images, batched):
        ref = labeler.propose(image)
        assert len(got) == len(ref) >= 1
        for a, b in zip(got, ref):
            assert np.array_equal(a.mask, b.mask) and a.score == pytest.approx(b.score, abs=1e-5)
    # and through the stage: batch_size 2 writes the same shard as batch_size 1
    write_download_unit(tmp_path / "a", images)
    write_download_unit(tmp_path / "b", images)
    for run, batch_size in ((tmp_path / "a", 1), (tmp_path / "b", 2)):
        cfg = LabelConfig(
            labeler="sam", sam=_tiny_sam_cfg(), max_area_frac=1.0, min_area_frac=0.0, batch_size=batch_size
        )
        run_label(run, [run / "filtered" / "part-00000.parquet"], cfg, labeler=labeler)
    a, b = (_read_shard(run / "brushdata" / "p00000-00000.tar") for run in (tmp_path / "a", tmp_path / "b"))
    assert [s.masks_rle for s in a] == [s.masks_rle for s in b] and len(a) == 2


def test_label_split_by_shard_covers_every_shard_once_across_tasks(tmp_path):
    write_download_unit(tmp_path, [photo("coffee", 96)] * 9)
    parts = [tmp_path / "filtered" / "part-00000.parquet"]
    cfg = LabelConfig(samples_per_shard=1)
    owned = []
    for i in range(3):
        before = set((tmp_path / "brushdata").glob("*.tar")) if (tmp_path / "brushdata").exists() else set()
        run_label(tmp_path, parts, cfg, TaskSlice(i, 3), labeler=BoxLabeler(), split_by="shard")
        owned.append(set((tmp_path / "brushdata").glob("*.tar")) - before)
    assert sum(len(o) for o in owned) == 9 and sum(1 for o in owned if o) >= 2  # one part, several tasks
