"""Branch sizes for the released base shapes (meta device): the branch holds exactly the pieces it copies."""

from __future__ import annotations

import pytest

from brushnet.dit.shapes import BASES, count, meta_branch, meta_transformer

_TEXT_STREAM = (
    "norm1_context.",
    "norm2_context.",
    "ff_context.",
    "attn.add_",
    "attn.to_add_out.",
    "attn.norm_added_",
)


def _image_stream_params(block) -> int:
    return sum(p.numel() for n, p in block.named_parameters() if not n.startswith(_TEXT_STREAM))


@pytest.mark.parametrize("name", list(BASES))
def test_branch_is_input_embedding_time_embedding_image_streams_and_zero_linears(name):
    base = meta_transformer(name)
    branch = meta_branch(base)
    n, dim = branch.config.num_layers, base.inner_dim
    assert n == -(-base.config.num_layers // 4)
    if BASES[name][0] == "sd3":
        p = base.config.patch_size
        embed = dim * (2 * 16 + 1) * p * p + dim
    else:
        embed = dim * (64 + 64 + 4) + dim
    expected = (
        embed
        + count(base.time_text_embed)
        + sum(_image_stream_params(base.transformer_blocks[k]) for k in range(n))
        + n * (dim * dim + dim)
    )
    assert count(branch) == expected
    assert count(meta_branch(base, branch_text=True)) == expected + count(base.context_embedder) + sum(
        count(base.transformer_blocks[k]) - _image_stream_params(base.transformer_blocks[k]) for k in range(n)
    )


def test_compute_overhead_follows_the_branch_depth():
    from brushnet.dit.shapes import compute_overhead

    medium, flux = compute_overhead("sd3.5-medium"), compute_overhead("flux.1-dev")
    for o in (medium, flux):
        assert o["training"] == pytest.approx(1.5 * o["inference"])
    # 6 image-only blocks of 24 joint blocks: a bit over a quarter (the first blocks carry SD3.5's attn2);
    # 5 of Flux's 57 blocks: under a tenth
    assert 0.25 < medium["inference"] < 0.3 and 0.05 < flux["inference"] < 0.1
