"""The random brush-mask generator: seeded, the official ranges and geometry, the official draw stream."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from brushnet.masks import MaskError, draw_brush_strokes, random_brush_mask, sample_brush_strokes


def test_brush_is_seeded_and_ignores_the_global_rng():
    np.random.seed(1)
    a = random_brush_mask(96, 80, np.random.default_rng(7), brush_width=16)
    np.random.seed(2)
    b = random_brush_mask(96, 80, np.random.default_rng(7), brush_width=16)
    assert a.dtype == bool and a.shape == (96, 80)
    np.testing.assert_array_equal(a, b)
    others = [random_brush_mask(96, 80, np.random.default_rng(s), brush_width=16) for s in range(8, 20)]
    assert any(not np.array_equal(a, o) for o in others)


def test_stroke_and_vertex_counts_follow_the_official_ranges():
    counts, vertex_counts = set(), set()
    for seed in range(300):
        strokes = sample_brush_strokes(128, 96, np.random.default_rng(seed))
        counts.add(len(strokes.strokes))
        vertex_counts |= {len(s) for s in strokes.strokes}
        assert strokes.width == 128
    assert counts == {0, 1, 2, 3}  # np.random.randint(4) strokes
    assert vertex_counts == set(range(1, 9))  # start point + randint(0, 8) vertices
    two = {
        len(sample_brush_strokes(64, 64, np.random.default_rng(s), max_strokes=2).strokes) for s in range(50)
    }
    assert two == {0, 1}


@pytest.mark.parametrize(("height", "width"), [(64, 512), (512, 64)])
def test_non_square_strokes_use_the_whole_image(height, width):
    """The official code swapped H and W for the start point; fixed, start points span both axes."""
    starts, all_vertices = [], []
    for seed in range(200):
        for stroke in sample_brush_strokes(height, width, np.random.default_rng(seed)).strokes:
            starts.append(stroke[0])
            all_vertices += stroke
    xs, ys = np.array(starts).T
    assert xs.min() < width * 0.1 and xs.max() > width * 0.9
    assert ys.min() < height * 0.1 and ys.max() > height * 0.9
    vx, vy = np.array(all_vertices).T
    assert vx.min() >= 0 and vx.max() <= width and vy.min() >= 0 and vy.max() <= height
    # every stroke is visible, and the union of small brushes covers the middle of the long axis
    union = np.zeros((height, width), bool)
    for seed in range(200):
        rng = np.random.default_rng(seed)
        strokes = sample_brush_strokes(height, width, rng, brush_width=8)
        mask = draw_brush_strokes(strokes, height, width)
        assert mask.any() == bool(strokes.strokes)
        union |= mask
    long_axis = union.any(axis=0) if width > height else union.any(axis=1)
    assert long_axis.mean() > 0.9


def official_brush_reference(height, width, rng, swap_bug):
    """The official random_brush_gen's semantics step by step (np.random.* replaced by ``rng``), with its
    H/W swap as an option, drawn with the same PIL calls; uint8 0/1."""
    canvas = PIL.Image.new("L", (width, height), 0)
    avg = math.sqrt(height**2 + width**2) / 8
    for _ in range(rng.integers(4)):
        n = rng.integers(0, 8)
        lo, hi = (
            2 * math.pi / 5 - rng.uniform(0, 2 * math.pi / 15),
            2 * math.pi / 5 + rng.uniform(0, 2 * math.pi / 15),
        )
        angles = [2 * math.pi - rng.uniform(lo, hi) if i % 2 == 0 else rng.uniform(lo, hi) for i in range(n)]
        xmax, ymax = (height, width) if swap_bug else (width, height)
        pts = [(int(rng.integers(0, xmax)), int(rng.integers(0, ymax)))]
        for a in angles:
            r = np.clip(rng.normal(avg, avg // 2), 0, 2 * avg)
            pts.append(
                (
                    int(np.clip(pts[-1][0] + r * math.cos(a), 0, xmax)),
                    int(np.clip(pts[-1][1] + r * math.sin(a), 0, ymax)),
                )
            )
        draw = PIL.ImageDraw.Draw(canvas)
        size = int(rng.uniform(128, 128))
        draw.line(pts, fill=1, width=size)
        for x, y in pts:
            draw.ellipse((x - size // 2, y - size // 2, x + size // 2, y + size // 2), fill=1)
        rng.random(2)  # the discarded PIL flips
    mask = np.asarray(canvas, np.uint8)
    if rng.random() > 0.5:
        mask = np.flip(mask, 0)
    if rng.random() > 0.5:
        mask = np.flip(mask, 1)
    return mask


@pytest.mark.parametrize(
    ("height", "width", "swap_bug"), [(320, 320, True), (200, 360, False), (360, 200, False)]
)
def test_brush_matches_the_official_generator_on_the_same_stream(height, width, swap_bug):
    """Square: identical to the official code (its H/W swap is harmless there). Non-square: identical to
    the official code with the swap fixed."""
    for seed in range(25):
        ours = random_brush_mask(height, width, np.random.default_rng(seed))
        reference = official_brush_reference(height, width, np.random.default_rng(seed), swap_bug)
        np.testing.assert_array_equal(ours, reference.astype(bool), err_msg=f"seed {seed}")
    if not swap_bug:  # and the fix changes something there
        assert any(
            not np.array_equal(
                random_brush_mask(height, width, np.random.default_rng(s)),
                official_brush_reference(height, width, np.random.default_rng(s), True).astype(bool),
            )
            for s in range(25)
        )


def test_brush_geometry_disc_line_and_flips():
    from brushnet.masks import BrushStrokes

    disc = draw_brush_strokes(BrushStrokes([[(50, 40)]], 20, False, False), 100, 120)
    assert disc[40, 50] and disc[40, 59] and not disc[40, 62] and not disc[0, 0]
    assert abs(disc.sum() - math.pi * 10**2) < 0.15 * math.pi * 10**2
    line = draw_brush_strokes(BrushStrokes([[(10, 50), (110, 50)]], 10, False, False), 100, 120)
    assert line[50, 10:111].all() and line[46:55, 60].all() and not line[40, 60]
    flipped = draw_brush_strokes(BrushStrokes([[(10, 20)]], 6, True, True), 100, 120)
    assert flipped[99 - 20, 119 - 10] and not flipped[20, 10]


def test_brush_coverage_is_in_the_official_ballpark():
    """Default brushes at 512x512: about a quarter empty (0 strokes), the rest cover a sizeable area."""
    masks = [random_brush_mask(512, 512, np.random.default_rng(s)) for s in range(40)]
    cover = np.array([m.mean() for m in masks])
    assert 0.05 < (cover == 0).mean() < 0.5
    assert 0.1 < cover[cover > 0].mean() < 0.8


def test_brush_rejects_bad_arguments():
    with pytest.raises(MaskError, match="positive"):
        random_brush_mask(0, 10, np.random.default_rng(0))
    with pytest.raises(MaskError, match="brush_width"):
        random_brush_mask(10, 10, np.random.default_rng(0), brush_width=0)
