"""BrushDataModule: batch contract, mask semantics, determinism, shuffling, equal ranks, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.train.data_builders import object_masks, tokenizer_folder, write_shards
from train.data import BrushDataModule
from train.data.shards import expand_sources
from train.data.transforms import normalize_batch

RES = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(tokenizer_folder(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """13 samples in two uneven shards."""
    return write_shards(tmp_path_factory.mktemp("shards"), [5, 8])


def make_dm(shards, tok, **kw) -> BrushDataModule:
    args = dict(
        train_shards=[str(p) for p in shards], tokenizer=tok, resolution=RES, batch_size=2, num_workers=0
    )
    args.update(kw)
    return BrushDataModule(**args)


def epoch_batches(dm: BrushDataModule, rank: int = 0, world: int = 1, epoch: int = 0) -> list[dict]:
    loader = dm.train_dataloader_for(rank, world)
    dm.sampler.set_epoch(epoch)
    return list(loader)


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_contract(shards, tok):
    dm = make_dm(shards, tok, batch_size=3)
    batches = epoch_batches(dm)
    assert len(batches) == 13 // 3 == len(dm.train_dataloader_for(0, 1))
    b = batches[0]
    assert b["pixel_values"].shape == (3, 3, RES, RES) and b["masks"].shape == (3, 1, RES, RES)
    assert b["pixel_values"].dtype == b["masks"].dtype == torch.uint8  # normalised on the device
    assert "conditioning_pixel_values" not in b
    x = normalize_batch(b)
    assert x["pixel_values"].shape == x["conditioning_pixel_values"].shape == (3, 3, RES, RES)
    for name in ("pixel_values", "conditioning_pixel_values", "masks"):
        assert x[name].dtype == torch.float32 and x[name].is_contiguous()
    assert torch.equal(x["pixel_values"], b["pixel_values"].float() / 127.5 - 1.0)
    assert x["pixel_values"].min() >= -1.0 and x["pixel_values"].max() <= 1.0
    assert x["pixel_values"].std() > 0.1  # a real photo, not a constant
    assert set(x["masks"].unique().tolist()) <= {0.0, 1.0}
    assert normalize_batch(x) is x  # float batches (custom datasets) pass through
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (3, 77)
    assert "input_ids_2" not in b
    assert b["original_size"].tolist() == [[48, 64]] * 3
    assert b["crop_top_left"].dtype == torch.int64 and b["crop_top_left"].shape == (3, 2)
    # short side 48 -> 32: width 64 -> ceil(42.67) = 43, so the crop's left is in [0, 11] and top is 0
    assert (b["crop_top_left"][:, 0] == 0).all() and (b["crop_top_left"][:, 1] <= 43 - RES).all()
    assert b["num_bad"].dtype == torch.int64 and int(b["num_bad"]) == 0
    assert len(b["keys"]) == 3 and all(k.startswith("s") for k in b["keys"])
    assert dm.num_samples == 13


def test_sdxl_tokenizer_2(shards, tmp_path):
    dm = make_dm(shards, str(tokenizer_folder(tmp_path / "xl", sdxl=True)))
    b = epoch_batches(dm)[0]
    assert b["input_ids_2"].shape == b["input_ids"].shape == (2, 77)


def test_tokenizer_errors(shards, tmp_path):
    with pytest.raises(OSError, match="no tokenizer/ folder"):
        make_dm(shards, str(tmp_path)).setup()
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        make_dm(shards, "no-such-org/no-such-model").setup()
    with pytest.raises(ValueError, match="tokenizer"):
        make_dm(shards, "").setup()


def test_mask_semantics(tmp_path, tok):
    """keep=1 where the conditioning image equals the image; the hole is -1; invert_prob picks the side."""
    paths = write_shards(tmp_path, [6], height=RES, width=RES, num_masks=1)  # no resize, no crop
    for invert, inpaint_object in ((0.0, True), (1.0, False)):
        dm = make_dm(paths, tok, morph_prob=0.0, invert_prob=invert, batch_size=6)
        b = normalize_batch(epoch_batches(dm)[0])
        keep = b["masks"].bool().expand_as(b["pixel_values"])
        assert torch.equal(b["conditioning_pixel_values"][keep], b["pixel_values"][keep])
        assert (b["conditioning_pixel_values"][~keep] == -1.0).all()
        for key, m in zip(b["keys"], b["masks"][:, 0]):
            obj = torch.from_numpy(object_masks(int(key[1:]), RES, RES, 1)[0])
            assert torch.equal(m == 0, obj if inpaint_object else ~obj), key


def test_random_masks_and_empty_prompts(tmp_path, tok):
    # empty segmentation list -> brush masks (official 128 px strokes: the photos must be larger than that)
    paths = write_shards(tmp_path, [8], num_masks=0, height=384, width=512)
    dm = make_dm(paths, tok, proportion_empty_prompts=1.0, invert_prob=0.0, batch_size=8)
    b = epoch_batches(dm)[0]
    empty = dm.tokenizers("")["input_ids"]
    assert all(torch.equal(ids, empty) for ids in b["input_ids"])
    inpaint_fraction = 1 - b["masks"].float().mean((1, 2, 3))
    assert ((inpaint_fraction > 0) & (inpaint_fraction < 1)).any()  # strokes, not "keep all"


def test_deterministic_across_worker_counts(shards, tok):
    ref = epoch_batches(make_dm(shards, tok, num_workers=0), epoch=1)
    other = epoch_batches(make_dm(shards, tok, num_workers=2), epoch=1)
    assert keys_of(ref) == keys_of(other)
    for a, b in zip(ref, other):
        for name in ("pixel_values", "masks", "input_ids", "crop_top_left"):
            assert torch.equal(a[name], b[name]), name


def test_global_shuffle_differs_per_epoch(shards, tok):
    dm = make_dm(shards, tok)
    e0, e1 = keys_of(epoch_batches(dm, epoch=0)), keys_of(epoch_batches(dm, epoch=1))
    assert len(e0) == len(set(e0)) == 12 and len(set(e1)) == 12
    assert e0 != e1
    assert keys_of(epoch_batches(make_dm(shards, tok), epoch=0)) == e0  # same seed, same order
    assert keys_of(epoch_batches(make_dm(shards, tok, seed=1), epoch=0)) != e0
    # both shards are mixed within the first batches (global, not per-shard, shuffle)
    first_half = {int(k[1:]) < 5 for k in e0[:6]}
    assert first_half == {True, False}


def test_equal_batches_on_two_ranks_with_uneven_shards(shards, tok):
    dm = make_dm(shards, tok)
    per_rank = [epoch_batches(dm, rank=r, world=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3] == [len(dm.train_dataloader_for(r, 2)) for r in range(2)]
    k0, k1 = keys_of(per_rank[0]), keys_of(per_rank[1])
    assert not set(k0) & set(k1) and len(set(k0) | set(k1)) == 12
    # the ranks together consume the single-rank global order, step by step
    single = keys_of(epoch_batches(make_dm(shards, tok, batch_size=4)))
    interleaved = list(
        itertools.chain.from_iterable(
            a + b for a, b in zip([b["keys"] for b in per_rank[0]], [b["keys"] for b in per_rank[1]])
        )
    )
    assert interleaved == single


@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume_mid_epoch_with_workers(shards, tok, world):
    """Consume k batches, save, new datamodule + load: the rest equals the uninterrupted run, both epochs."""

    def run(dm, rank):
        loader = dm.train_dataloader_for(rank, world)
        out = []
        for epoch in range(dm.sampler.epoch, 2):
            dm.sampler.set_epoch(epoch)
            out += [(b["keys"], b["pixel_values"]) for b in loader]
        return out

    for rank in range(world):
        full = run(make_dm(shards, tok, num_workers=2), rank)
        dm = make_dm(shards, tok, num_workers=2)
        it = iter(dm.train_dataloader_for(rank, world))
        k = 2 if world == 1 else 1
        first = [(b["keys"], b["pixel_values"]) for b in itertools.islice(it, k)]
        state = dm.state_dict()
        assert state["epoch"] == 0 and state["consumed_samples"] == k * 2 * world
        del it
        resumed_dm = make_dm(shards, tok, num_workers=2)
        resumed_dm.load_state_dict(state)
        rest = run(resumed_dm, rank)
        assert [k for k, _ in first + rest] == [k for k, _ in full]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first + rest, full))


def test_resume_state_at_epoch_end_and_validation(shards, tok):
    dm = make_dm(shards, tok)
    batches = epoch_batches(dm, epoch=0)
    state = dm.state_dict()
    assert state["consumed_samples"] == 12 and state["consumed_batches"] == len(batches)
    with pytest.raises(ValueError, match="not a BrushDataModule state"):
        make_dm(shards, tok).load_state_dict({"epoch": 0})
    other = make_dm(shards[:1], tok)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="data set or seed changed"):
        other.train_dataloader_for(0, 1)


def test_source_expansion(tmp_path):
    paths = write_shards(tmp_path / "d", [1, 1, 1])
    d = tmp_path / "d"
    assert expand_sources(str(d / "shard-{000..002}.tar")) == [str(p) for p in paths]
    assert expand_sources(str(d / "shard-00[02].tar")) == [str(paths[0]), str(paths[2])]
    assert expand_sources([str(d / "*.tar"), str(paths[0])]) == [str(p) for p in paths]
    assert expand_sources(str(d)) == [str(p) for p in paths]
    assert expand_sources("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(FileNotFoundError, match="shard-003"):
        expand_sources(str(d / "shard-{002..003}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_sources(str(d / "*.zip"))


def test_index_cached_next_to_shards_and_explicit_index(tmp_path, tok):
    from brushnet.brushdata import write_index

    paths = write_shards(tmp_path / "d", [3, 4])
    dm = make_dm(paths, tok)
    dm.prepare_data()
    cached = list((tmp_path / "d").glob(".brushdata-index-*.json"))
    assert len(cached) == 1
    dm.setup()
    assert dm.num_samples == 7
    index = tmp_path / "index.json"
    write_index(paths, index, root=tmp_path)
    by_index = BrushDataModule(index=str(index), tokenizer=tok, resolution=RES, batch_size=2, num_workers=0)
    assert keys_of(epoch_batches(by_index)) == keys_of(epoch_batches(dm))
    only_first = BrushDataModule(
        train_shards=str(paths[0]),
        index=str(index),
        tokenizer=tok,
        resolution=RES,
        batch_size=1,
        num_workers=0,
    )
    only_first.setup()
    assert only_first.num_samples == 3


def test_stream_mode_yields_equal_batches(shards, tok):
    dm = make_dm(shards, tok, mode="stream", num_workers=2, shuffle_buffer=4)
    per_rank = [list(dm.train_dataloader_for(r, 2)) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    b = per_rank[0][0]
    assert b["pixel_values"].shape == (2, 3, RES, RES) and b["input_ids"].shape == (2, 77)
    assert len(dm.train_dataloader_for(0, 2)) == 3
    assert np.all([len(x["keys"]) == 2 for x in per_rank[1]])
    assert dm.state_dict() == {}


def test_stream_mode_pipe_source_needs_epoch_samples(shards, tok):
    url = f"pipe:cat {shards[0]}"
    with pytest.raises(ValueError, match="epoch_samples"):
        make_dm([url], tok, mode="stream").train_dataloader_for(0, 1)
    dm = make_dm([url], tok, mode="stream", epoch_samples=4)
    assert [len(b["keys"]) for b in dm.train_dataloader_for(0, 1)] == [2, 2]
    with pytest.raises(ValueError, match="indexed mode"):
        make_dm([url], tok).setup()


def test_constructor_parses_from_yaml_with_jsonargparse(shards, tok):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(BrushDataModule, "data")
    cfg = parser.parse_string(
        f"data:\n  train_shards: {shards[0].parent}/shard-{{000..001}}.tar\n  tokenizer: {tok}\n"
        "  resolution: 32\n  mode: indexed\n  num_workers: 0\n"
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, BrushDataModule) and dm.augment.resolution == 32
    dm.setup()
    assert dm.num_samples == 13
    with pytest.raises(Exception, match="indexed"):
        parser.parse_string("data:\n  train_shards: x.tar\n  mode: sideways\n")
