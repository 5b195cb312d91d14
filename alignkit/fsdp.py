"""Fully sharded data parallel training (``train.sharding=fsdp``) through PyTorch's FSDP2 (``fully_shard``).

Each unit the sampler names (:meth:`alignkit.interfaces.Sampler.fsdp_units`, by default the blocks of the
trainable module's top-level ``ModuleList`` s) and then the trainable module itself are sharded over the
launched processes: every parameter becomes a ``DTensor`` holding ``1 / world_size`` of its rows, gathered
for the forward and backward of its unit and reduce-scattered after the backward. Frozen base weights and
LoRA weights are sharded alike, so a backbone too large for one device trains on several.

What the trainer does differently under FSDP (:class:`alignkit.trainer.Trainer`):

- every process runs every forward and backward of the sharded module in the same order (each one gathers
  parameters from all processes). A process that holds no transition of a global minibatch runs one of its
  own with weight 0;
- gradients are summed by FSDP's reduce-scatter (divide factor 1) at the last minibatch of each optimizer
  step, instead of the explicit all-reduce of the DDP path;
- checkpoints hold full tensors: optimizer and EMA state are gathered from all processes
  (:func:`gather_full`) and the main process writes them in the same format as an unsharded run; loading
  shards them again (:func:`shard_like`). Trainable weights are loaded before sharding;
- held-out evaluation is split over the processes in blocks of equal size (padded), as under DDP, so every
  process runs as many forwards (:func:`alignkit.evaluation.evaluate_heldout`).
"""

from __future__ import annotations

from typing import Any

import torch

from alignkit.config import ConfigError


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or state tensor of a sharded module)."""
    return isinstance(tensor, _dtensor_type())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` on CPU; a collective for a ``DTensor`` (every process must call it)."""
    if is_sharded(tensor):  # copied: a plain tensor, not the all-gather's lazily waited wrapper
        return tensor.full_tensor().detach().to("cpu", copy=True)
    return tensor.detach().cpu()


def gather_full(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples of tensors, e.g. an optimizer state dict) with every tensor
    replaced by :func:`full` of it. A collective: all processes call it on structures of the same layout."""
    if isinstance(obj, torch.Tensor):
        return full(obj)
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v) for v in obj)
    return obj


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Full ``value`` as a tensor placed like ``like``: this process's shard when ``like`` is a ``DTensor``
    of the same global shape (no communication: every process holds ``value``), else ``value`` unchanged."""
    if not is_sharded(like) or tuple(value.shape) != tuple(like.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of full state: turn each per-parameter state tensor of a sharded
    parameter into its shard (``exp_avg``, ``exp_avg_sq``; scalars such as ``step`` stay as they are)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = shard_like(value, p)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full values of ``module``'s trainable parameters by name, on CPU (a collective under FSDP); a tied
    parameter is gathered once and listed under each of its names."""
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            if id(p) not in gathered:
                gathered[id(p)] = full(p)
            out[name] = gathered[id(p)]
    return out


def module_state(module: torch.nn.Module, params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with the full parameter values ``params`` substituted (what a sampler writes
    when it saves a sharded module); the module's own tensors when ``params`` is None.

    Raises:
        ValueError: a sharded entry is missing from ``params`` (only trainable parameters are gathered).
    """
    state = module.state_dict()
    if params is None:
        return state
    out = {name: params.get(name, value) for name, value in state.items()}
    left = [name for name, value in out.items() if is_sharded(value)]
    if left:
        raise ValueError(f"{len(left)} sharded entries were not gathered, e.g. {left[:3]}")
    return out


def default_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of ``module``'s top-level ``ModuleList`` s (transformer blocks, decoder layers), searched
    breadth-first and not inside a block already taken."""
    units: list[torch.nn.Module] = []
    queue = list(module.children())
    while queue:
        child = queue.pop(0)
        if isinstance(child, torch.nn.ModuleList):
            units.extend(child)
        else:
            queue.extend(child.children())
    return units


def shard_module(module: torch.nn.Module, units: list[torch.nn.Module], mixed_precision: str) -> list[Any]:
    """Apply ``fully_shard`` to each of ``units`` and then to ``module`` (in place); gradients are summed,
    not averaged, over processes. Returns the sharded modules (``module`` last).

    Args:
        mixed_precision: ``train.mixed_precision``: ``no`` (parameters gathered in their own dtype) or
            ``bf16`` (gathered and computed in bfloat16, gradients reduced in float32).

    Raises:
        ConfigError: a unit mixes parameter dtypes without ``bf16`` to gather them in (``fp16`` is refused
            by :class:`alignkit.config.TrainConfig`: there is no sharded loss scaler here).
    """
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        FSDPModule = None
    needed = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms", "set_requires_gradient_sync")
    if FSDPModule is None or not all(hasattr(FSDPModule, name) for name in needed):
        raise ConfigError([f"train.sharding=fsdp: torch {torch.__version__} lacks the FSDP2 API used here "
                           f"(fully_shard with {', '.join(needed)}; tested with torch 2.14); upgrade torch or use "
                           "train.sharding=ddp"])
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        in_units = {id(p) for unit in units for p in unit.parameters()}
        groups = [list(unit.parameters()) for unit in units]
        groups.append([p for p in module.parameters() if id(p) not in in_units])
        for unit, params in zip([*units, module], groups, strict=True):
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ConfigError([
                    f"train.sharding=fsdp: {type(unit).__name__} holds parameters of several dtypes "
                    f"({sorted(str(d) for d in dtypes)}, e.g. bfloat16 base weights and float32 LoRA weights) and "
                    "train.mixed_precision=no gathers each in its own; set train.mixed_precision=bf16 or "
                    "backbone.dtype=float32"
                ])
    done = []
    for unit in [*units, module]:
        # resharded after every forward, the root too: parameters are never left gathered between calls,
        # so a write to the shards (optimizer step, EMA swap, loading) is seen by the next forward
        fully_shard(unit, mp_policy=policy, reshard_after_forward=True)
        unit.set_gradient_divide_factor(1.0)  # the loss is already scaled by each process's share
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        done.append(unit)
    return done
