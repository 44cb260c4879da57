"""Fast, single-process checks of the FSDP2 plan and the sharded 8-bit AdamW (a 1-rank gloo group).

The 2-process Lightning runs (fit, resume, export, 8-bit under FSDP2 vs DDP) are in
``test_fsdp_multiprocess.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from brushnet.injection import unet_forward_with_brushnet
from brushnet.model import BrushNetModel
from brushnet.testing.tiny import tiny_unet
from train.fsdp import apply_fsdp2, export_branch, is_sharded
from train.monitor import gradient_norm
from train.optim_sharded import ShardedAdamW8bit, make_sharded_adamw8bit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


class Holder(nn.Module):
    """What the trainer's LightningModule holds: a frozen UNet and a trainable branch."""

    def __init__(self):
        super().__init__()
        self.unet = tiny_unet("sd15").requires_grad_(False)
        self.brushnet = BrushNetModel.from_unet(self.unet)
        self.text_encoder = nn.Linear(4, 32)  # stands in for a replicated frozen module


def _loss(h: Holder, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.cat([x * 0.5, torch.ones(2, 1, 8, 8)], 1)
    text, t = torch.randn(2, 7, 32, generator=g), torch.tensor([10, 500])
    down, mid, up = h.brushnet(x, t, text, cond, return_dict=False)
    return unet_forward_with_brushnet(h.unet, x, t, text, down, mid, up).pow(2).mean()


def test_apply_fsdp2_shards_branch_and_unet_per_block(mesh):
    h = Holder()
    with torch.no_grad():  # non-zero residuals, so the branch's gradients reach its inner blocks
        for conv in [*h.brushnet.brushnet_down_blocks, h.brushnet.brushnet_mid_block]:
            conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(h)
    ref_loss = _loss(reference)
    ref_loss.backward()
    units = apply_fsdp2(h, mesh=mesh, activation_checkpointing=True)
    # branch: 4 down + 2 mid + 6 up resnets (tiny: 2 levels, 2 layers) + 1 downsampler + 1 upsampler + root
    assert units == {"unet": 21, "brushnet": 15}
    assert isinstance(h.brushnet, FSDPModule) and isinstance(h.unet, FSDPModule)
    assert isinstance(h.brushnet.down_blocks[0].resnets[0], FSDPModule)
    assert not isinstance(h.text_encoder, FSDPModule)
    assert all(isinstance(p, DTensor) for p in h.brushnet.parameters())
    assert not isinstance(h.text_encoder.weight, DTensor)
    assert h.brushnet.gradient_checkpointing and isinstance(h.unet.down_blocks[0].resnets[0], FSDPModule)
    assert is_sharded(h.brushnet.parameters()) and not is_sharded(h.text_encoder.parameters())
    loss = _loss(h)
    loss.backward()
    # one rank: sharded + checkpointed computes what the plain modules compute
    torch.testing.assert_close(loss, ref_loss)
    ref_grads = dict(reference.brushnet.named_parameters())
    for name, p in h.brushnet.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name].grad, msg=name)
    assert ref_grads["down_blocks.0.resnets.0.conv1.weight"].grad.abs().sum() > 0
    # TrainingMonitor's train/grad_norm over DTensor gradients equals the plain modules' gradient norm
    plain = torch.cat([p.grad.flatten() for p in reference.brushnet.parameters()]).norm()
    torch.testing.assert_close(gradient_norm(h.brushnet.parameters()), plain)
    assert all(p.grad is None for p in h.unet.parameters())


def test_apply_fsdp2_refuses_mixed_requires_grad_and_missing_branch(mesh):
    h = Holder()
    h.brushnet.conv_in_condition.requires_grad_(False)
    with pytest.raises(ValueError, match="mixes trainable and frozen"):
        apply_fsdp2(h, mesh=mesh)
    with pytest.raises(ValueError, match="no BrushNetModel"):
        apply_fsdp2(nn.Sequential(nn.Linear(2, 2)), mesh=mesh)


def test_export_branch_writes_loadable_official_folder(mesh, tmp_path):
    h = Holder()
    expected = {k: v.clone() for k, v in h.brushnet.state_dict().items()}
    apply_fsdp2(h, mesh=mesh)
    folder = export_branch(h.brushnet, tmp_path / "export", rank=0)
    loaded = BrushNetModel.from_pretrained(folder)
    assert list(loaded.config.block_out_channels) == [32, 64]
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left next to it


def _params(seed: int = 0) -> list[nn.Parameter]:
    torch.manual_seed(seed)
    # one tensor above bitsandbytes' min_8bit_size (8-bit state), one below (32-bit state)
    return [nn.Parameter(torch.randn(96, 80)), nn.Parameter(torch.randn(50))]


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_sharded_adamw8bit_equals_bitsandbytes_on_plain_tensors():
    ours, ref = _params(), _params()
    _steps(ShardedAdamW8bit(ours, lr=1e-2), ours, 5)
    _steps(bnb.optim.AdamW8bit(ref, lr=1e-2), ref, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    assert not torch.equal(ours[0], _params()[0])


def test_sharded_adamw8bit_dtensor_state_and_resume(mesh):
    def sharded_linear():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(80, 96), nn.Linear(96, 3))
        from torch.distributed.fsdp import fully_shard

        fully_shard(m, mesh=mesh)
        return m

    def run(m, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            m(torch.randn(4, 80, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    m = sharded_linear()
    opt = make_sharded_adamw8bit(m.parameters(), lr=1e-2)
    run(m, opt, 3, seed=0)
    st = opt.state[m[0].weight]
    assert isinstance(st["state1"], DTensor) and st["state1"].dtype == torch.uint8
    assert st["state1"].shape == m[0].weight.shape
    assert isinstance(st["absmax1"], DTensor) and tuple(st["absmax1"].shape) == (1, 30)  # 96*80/256
    assert opt.state[m[1].bias]["state1"].dtype == torch.float32  # 3 < min_8bit_size
    saved = copy.deepcopy(opt.state_dict())  # the live state is updated in place
    saved_model = {k: v.full_tensor().clone() for k, v in m.state_dict().items()}

    run(m, opt, 2, seed=1)
    after = [p.full_tensor().clone() for p in m.parameters()]

    m2 = sharded_linear()
    with torch.no_grad():
        for k, p in m2.state_dict().items():
            p.to_local().copy_(saved_model[k])
    opt2 = ShardedAdamW8bit(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved)
    run(m2, opt2, 2, seed=1)
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(after, m2.parameters()))


def test_sharded_adamw8bit_refuses_other_shard_count(mesh):
    params = _params()
    opt = ShardedAdamW8bit(params)
    _steps(opt, params, 1)
    sd = opt.state_dict()
    sd["state"][0]["absmax1"] = torch.zeros(7)
    with pytest.raises(ValueError, match="same number of FSDP shards"):
        ShardedAdamW8bit(_params()).load_state_dict(sd)


@pytest.mark.parametrize(
    ("name", "dtype"), [("fsdp.yaml", torch.bfloat16), ("fsdp_cpu.yaml", None)], ids=["gpu", "cpu"]
)
def test_fsdp_config_overlays_build_the_strategy(name, dtype):
    import yaml
    from jsonargparse import ArgumentParser

    from train.fsdp import FSDP2Strategy

    parser = ArgumentParser()
    parser.add_argument("--trainer.strategy", type=FSDP2Strategy | str)
    overlay = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg = parser.parse_object({"trainer": {"strategy": overlay["trainer"]["strategy"]}})
    strategy = parser.instantiate_classes(cfg).trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.param_dtype is dtype and strategy.reduce_dtype is dtype
    assert strategy._tensor_parallel_size == 1 and not strategy.save_frozen_base


def test_parse_dtype_rejects_unknown_names():
    from train.fsdp import parse_dtype

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
