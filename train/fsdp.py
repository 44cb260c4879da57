"""FSDP2 (``torch.distributed.fsdp.fully_shard``) sharding plan for BrushNet training.

Why FSDP2 and not Lightning's ``FSDPStrategy``: the latter wraps FSDP1 and refuses a CPU accelerator, so it
could never be tested here; ``ModelParallelStrategy`` + ``fully_shard`` in ``configure_model`` runs the same
code over gloo on CPU and over NCCL on GPUs, and checkpoints as a sharded (DCP) directory.

The plan (:func:`apply_fsdp2`):

* Every ``BrushNetModel`` (the trainable branch, and an EMA copy if the module holds one) and every
  ``UNet2DConditionModel`` (the frozen base), or for DiT bases every ``BrushNetSD3Model`` /
  ``BrushNetFluxModel`` and ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``, is sharded **separately**: trainable and frozen parameters
  never share an FSDP unit (a unit with mixed ``requires_grad`` keeps full-size gradient buffers).
* Inside each, one unit per block that is *called through its own* ``forward``: ``ResnetBlock2D``,
  ``BasicTransformerBlock``, ``Downsample2D``, ``Upsample2D``. FSDP2 gathers a unit's parameters in its
  forward pre-hook, so the unit must be a module whose ``forward`` runs: ``BrushNetModel.forward`` calls
  the resnets and samplers of its ``DownBlock2D``/``UpBlock2D`` directly, never the blocks themselves,
  so sharding at the diffusers-block level would leave the branch's parameters un-gathered.
  Whatever is left (conv_in, time embedding, the zero convs, transformer proj/norm) joins the model's root
  unit. DiT models: one unit per transformer block of the base and the branch (the families'
  ``block_class_names``, :mod:`brushnet.dit.family`; the injection hooks the stock blocks' ``forward``).
* The VAE and text encoder(s) stay replicated: they run under ``no_grad`` through ``vae.encode`` /
  ``encode_prompt``-style calls (``encode`` is not ``forward``, so FSDP2 hooks would never gather the VAE),
  and they are small next to the UNet (SD1.5 bf16: VAE 0.17 GB, CLIP-L 0.25 GB, UNet 1.72 GB).
* Mixed precision: ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``; the sharded parameters keep their
  storage dtype, so the branch's fp32 master weights are the shards the optimizer updates.
* Activation checkpointing: the diffusers ``gradient_checkpointing`` flag (non-reentrant
  ``torch.utils.checkpoint``) around each resnet/transformer block, which FSDP2 supports: the recompute in
  backward re-runs the unit's pre-forward hook and gathers the parameters again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from brushnet.atomic import atomic_folder
from brushnet.dit.family import FluxFamily, SD3Family
from brushnet.dit.flux_model import BrushNetFluxModel
from brushnet.dit.sd3_model import BrushNetSD3Model
from brushnet.model import BrushNetModel

# Diffusers modules that are always invoked through their own forward() (so FSDP2 hooks fire).
_BLOCK_CLASS_NAMES = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "Downsample2D",
    "Upsample2D",
    *SD3Family.block_class_names,
    *FluxFamily.block_class_names,
)
# The trainable branch (and its EMA copy) of each family.
BRANCH_CLASSES: tuple[type[nn.Module], ...] = (BrushNetModel, BrushNetSD3Model, BrushNetFluxModel)


def _base_classes() -> tuple[type[nn.Module], ...]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    return (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)


def sharded_roots(module: nn.Module) -> list[nn.Module]:
    """The submodules :func:`apply_fsdp2` shards: every branch (:data:`BRANCH_CLASSES`) and base UNet /
    transformer."""
    roots = [m for m in module.modules() if isinstance(m, BRANCH_CLASSES + _base_classes())]
    if not any(isinstance(m, BRANCH_CLASSES) for m in roots):
        raise ValueError(f"apply_fsdp2: {type(module).__name__} holds no BrushNetModel to shard")
    return roots


def _check_uniform_requires_grad(root: nn.Module) -> None:
    flags = {p.requires_grad for p in root.parameters()}
    if len(flags) > 1:
        names = [n for n, p in root.named_parameters() if not p.requires_grad][:3]
        raise ValueError(
            f"{type(root).__name__} mixes trainable and frozen parameters (frozen: {names} ...): freeze or "
            "unfreeze the whole model before apply_fsdp2, or FSDP2 keeps full-size gradients for the unit"
        )


def shard_model(
    root: nn.Module,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool = True,
) -> int:
    """``fully_shard`` each block of ``root`` (see module docstring), then ``root``; returns the unit count."""
    _check_uniform_requires_grad(root)
    blocks = [m for m in root.modules() if type(m).__name__ in _BLOCK_CLASS_NAMES and m is not root]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return len(blocks) + 1


def apply_fsdp2(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> dict[str, int]:
    """Shard the branch(es) and the frozen UNet of ``module`` in place; call from ``configure_model``.

    ``mesh``: the data-parallel mesh (``self.device_mesh["data_parallel"]`` under
    :class:`FSDP2Strategy`). ``param_dtype``/``reduce_dtype``: compute and gradient-reduction dtypes
    (``torch.bfloat16`` on GPUs; ``None`` keeps the storage dtype, e.g. fp32 on CPU). Trainable models are
    upcast to fp32 storage first so the optimizer always updates fp32 master shards.
    Returns ``{qualified name: number of FSDP units}`` for logging.
    """
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp2 expects a 1-D data-parallel mesh, got {mesh.ndim}-D {mesh}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    names = {id(m): n for n, m in module.named_modules()}
    units = {}
    for root in sharded_roots(module):
        if isinstance(root, FSDPModule):  # configure_model may run once per trainer entry point
            continue
        if any(p.requires_grad for p in root.parameters()) and param_dtype is not None:
            root.float()
        if activation_checkpointing:
            root.enable_gradient_checkpointing()
        units[names[id(root)] or type(root).__name__] = shard_model(root, mesh, mp, reshard_after_forward)
    return units


def is_sharded(params: Iterable[torch.Tensor | dict]) -> bool:
    """True if any parameter (or any in a param-group dict) is a DTensor, i.e. sharded by FSDP2."""
    from torch.distributed.tensor import DTensor

    for p in params:
        group = p["params"] if isinstance(p, dict) else [p]
        if any(isinstance(t, DTensor) for t in group):
            return True
    return False


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded) state dict of ``model`` on CPU, on rank 0 only ({} elsewhere).

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_branch(branch: nn.Module, folder: str | os.PathLike, *, rank: int) -> Path | None:
    """Write a sharded branch as an official-format diffusers folder from rank 0 (atomic: temp + rename).

    Collective (gathers the shards); returns the folder on rank 0 and ``None`` elsewhere.
    """
    state = full_state_dict(branch)
    if rank != 0:
        return None
    folder = Path(folder)
    with torch.device("meta"):
        plain = next(c for c in BRANCH_CLASSES if isinstance(branch, c)).from_config(branch.config)
    plain.load_state_dict(state, assign=True)
    with atomic_folder(folder) as tmp:
        plain.save_pretrained(tmp)
    return folder


def _check_optimizer_shapes(optim_state: dict, saved: dict, *, prefix: str, path: Path) -> None:
    """Fail with a clear message where a saved optimizer state tensor has another global shape.

    This is what happens when per-shard 8-bit state (``absmax``: one row per shard) is resumed on a
    different number of FSDP shards; DCP itself would only report a size mismatch.
    """
    for fqn, state in optim_state.get("state", {}).items():
        for name, value in state.items():
            meta = saved.get(f"{prefix}.{fqn}.{name}")
            size = getattr(meta, "size", None)
            if torch.is_tensor(value) and size is not None and tuple(size) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint {path}: optimizer state {fqn}.{name} was saved with shape {tuple(size)}, "
                    f"this run needs {tuple(value.shape)}; sharded 8-bit AdamW state is quantized per "
                    "shard and resumes only on the same number of FSDP ranks (devices x num_nodes)"
                )


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a ``torch.dtype``, or ``None``) -> ``torch.dtype | None``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)} or null")
    return _DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with every process in the data-parallel (FSDP) mesh dimension.

    ``ModelParallelStrategy`` defaults to ``data_parallel_size=num_nodes`` and puts the devices of a node
    into a tensor-parallel dimension; BrushNet has no tensor parallelism, so here the whole world is one
    FSDP group and the data sampler gives every rank distinct samples. Checkpoints are DCP directories
    (one file per rank + ``meta.pt``, on a filesystem every node sees) unless
    ``save_distributed_checkpoint=False``. The sharding options live here so a config overlay
    (``configs/fsdp.yaml``) switches a run to FSDP2 without touching the model section; the
    LightningModule's ``configure_model`` calls :meth:`shard`.

    ``save_frozen_base=False`` (default) leaves the frozen base-model weights (UNet, VAE, text encoders:
    every frozen parameter outside a ``BrushNetModel``) out of sharded checkpoints, about 2 GB per SD1.5
    checkpoint; the module reloads them from the base model on resume. A checkpoint is loaded with whatever
    model keys it holds, so checkpoints saved either way resume; a missing *trainable* key is an error.
    """

    def __init__(
        self,
        param_dtype: str | None = "bf16",
        reduce_dtype: str | None = "bf16",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        save_frozen_base: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        self.save_frozen_base = save_frozen_base
        self.param_dtype, self.reduce_dtype = parse_dtype(param_dtype), parse_dtype(reduce_dtype)
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The 1-D mesh to pass to :func:`apply_fsdp2`."""
        return self.device_mesh["data_parallel"]

    def _frozen_base_keys(self) -> set[str]:
        in_branch = {
            id(p) for m in self.model.modules() if isinstance(m, BRANCH_CLASSES) for p in m.parameters()
        }
        return {n for n, p in self.model.named_parameters() if not p.requires_grad and id(p) not in in_branch}

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if self.save_frozen_base or not self._save_distributed_checkpoint:
            return state
        frozen = self._frozen_base_keys()
        return {k: v for k, v in state.items() if k not in frozen}

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict:
        """Lightning's sharded load, restricted to the model keys the checkpoint holds (see class doc)."""
        import torch.distributed.checkpoint as dcp
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / _METADATA_FILENAME).is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        model_state = get_model_state_dict(self.model)
        present = {k: v for k, v in model_state.items() if f"state_dict.{k}" in saved}
        missing = sorted(set(model_state) - set(present) - self._frozen_base_keys())
        if missing and self.lightning_module.strict_loading:
            raise KeyError(
                f"checkpoint {path} lacks model keys {missing[:5]} (+{max(0, len(missing) - 5)} more)"
            )
        target = {"state_dict": present}
        dcp.load(target, checkpoint_id=path)
        self.model.load_state_dict(target["state_dict"], strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            _check_optimizer_shapes(optim_state[key], saved, prefix=f"{key}.state", path=path)
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        # The loaded weights, so ``on_load_checkpoint`` hooks can validate keys as with a DDP checkpoint.
        metadata["state_dict"] = target["state_dict"]
        return metadata

    def shard(self, module: nn.Module) -> dict[str, int]:
        """:func:`apply_fsdp2` with this strategy's mesh and options (idempotent)."""
        return apply_fsdp2(
            module,
            mesh=self.fsdp_mesh,
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            activation_checkpointing=self.activation_checkpointing,
            reshard_after_forward=self.reshard_after_forward,
        )
