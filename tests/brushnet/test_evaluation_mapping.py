"""BrushBench / EditBench mapping-file parsing: layout, row-major RLE, malformed entries named by id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brushnet.evaluation.benchmark import (
    BenchmarkError,
    GenerationSettings,
    check_run_config,
    load_mapping,
    load_source,
    output_paths,
)
from brushnet.masks import benchmark_rle_encode

from .evaluation_builders import box_mask, fake_benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return fake_benchmark(tmp_path_factory.mktemp("bench"))


def test_parses_inside_and_outside_masks(bench):
    inside = load_mapping(bench / "mapping_file.json", "inside")
    outside = load_mapping(bench / "mapping_file.json", "outside")
    assert [it.id for it in inside] == ["000", "001", "002"]
    assert inside[1].caption == "a photo of coffee" and inside[1].image == "images/coffee.jpg"
    np.testing.assert_array_equal(inside[1].inpaint_mask(), box_mask(120, 150, 200))
    np.testing.assert_array_equal(outside[0].inpaint_mask(), ~box_mask(128, 128, 256))
    assert load_source(bench, inside[0]).shape == (512, 512, 3)
    gen, masked = output_paths("/out", inside[0])
    assert (str(gen), str(masked)) == ("/out/images/astronaut.jpg", "/out/images/astronaut_masked.jpg")


def test_rle_is_row_major(tmp_path):
    # One run of 512 pixels starting at pixel 1: the first *row* in row-major order (a column in BrushData's).
    entry = {"image": "a.jpg", "caption": "c", "inpainting_mask": [1, 512]}
    (tmp_path / "m.json").write_text(json.dumps({"7": entry}))
    (item,) = load_mapping(tmp_path / "m.json")
    mask = item.inpaint_mask()
    assert mask[0].all() and mask.sum() == 512


def _write(tmp_path, mapping) -> str:
    path = tmp_path / "mapping_file.json"
    path.write_text(json.dumps(mapping))
    return str(path)


GOOD = {
    "image": "images/x.jpg",
    "caption": "a cat",
    "inpainting_mask": benchmark_rle_encode(box_mask(0, 0, 8)),
}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not a dict", "expected an object"),
        ({**GOOD, "caption": None}, "'caption' must be a string"),
        ({k: v for k, v in GOOD.items() if k != "image"}, "'image' must be a string"),
        ({**GOOD, "image": "/abs/x.jpg"}, "relative to the benchmark root"),
        ({**GOOD, "image": "../x.jpg"}, "relative to the benchmark root"),
        ({k: v for k, v in GOOD.items() if k != "inpainting_mask"}, "no 'inpainting_mask'"),
        ({**GOOD, "inpainting_mask": [1, 2, 3]}, "bad 'inpainting_mask'"),
        ({**GOOD, "inpainting_mask": [512 * 512, 5]}, "bad 'inpainting_mask'"),
        ({**GOOD, "inpainting_mask": []}, "empty"),
    ],
)
def test_malformed_entry_names_the_id(tmp_path, bad, message):
    path = _write(tmp_path, {"ok": GOOD, "bad-42": bad})
    with pytest.raises(BenchmarkError, match=message) as err:
        load_mapping(path)
    assert "'bad-42'" in str(err.value) and "mapping_file.json" in str(err.value)


def test_editbench_has_no_outpainting_mask(tmp_path):
    with pytest.raises(BenchmarkError, match="no 'outpainting_mask'"):
        load_mapping(_write(tmp_path, {"e1": GOOD}), "outside")


def test_bad_files(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_mapping(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BenchmarkError, match="not valid UTF-8 JSON"):
        load_mapping(tmp_path / "broken.json")
    with pytest.raises(BenchmarkError, match="non-empty JSON object"):
        load_mapping(_write(tmp_path, []))
    with pytest.raises(BenchmarkError, match="mask kind"):
        load_mapping(_write(tmp_path, {"a": GOOD}), "middle")


def test_missing_image_names_the_entry(tmp_path):
    (item,) = load_mapping(_write(tmp_path, {"id9": GOOD}))
    with pytest.raises(BenchmarkError, match=r"'id9'.*does not exist"):
        load_source(tmp_path, item)


def test_resume_with_other_settings_is_refused(tmp_path):
    settings = GenerationSettings(base="b", brushnet="n")
    check_run_config(tmp_path, settings)
    check_run_config(tmp_path, settings)  # same settings: fine
    with pytest.raises(BenchmarkError, match="steps: stored 50, now 10"):
        check_run_config(tmp_path, GenerationSettings(base="b", brushnet="n", steps=10))
