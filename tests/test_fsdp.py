"""The FSDP helpers that need no process group: which blocks are sharded, the state a sampler writes, and
the refusal of units whose parameter dtypes FSDP cannot gather together (the sharded training itself is
tested with two processes in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.fsdp import default_units, gather_full, module_state, shard_like, shard_module, trainable_state


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList(
            [torch.nn.Linear(8, 8)]))])
        self.head = torch.nn.Linear(8, 4)


def test_default_units_are_the_top_level_blocks() -> None:
    net = _Net()
    units = default_units(net)
    # breadth-first: the direct ModuleList first, then the one inside a plain child; never inside a block
    assert units == [net.blocks[0], net.encoder.layers[0], net.encoder.layers[1]]


def test_trainable_state_lists_tied_parameters_under_each_name() -> None:
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied, as a masked LM's decoder and word embeddings
    net[0].weight.requires_grad_(True)
    state = trainable_state(net)
    assert set(state) == {"0.weight", "1.weight"} and torch.equal(state["0.weight"], state["1.weight"])


def test_module_state_substitutes_given_values() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    new = torch.full((2, 2), 7.0)
    state = module_state(net, {"0.weight": new})
    assert state["0.weight"] is new and torch.equal(state["0.bias"], net[0].bias)
    assert "1.running_mean" in state  # buffers come from the module
    assert module_state(net, None).keys() == state.keys()


def test_unsharded_tensors_pass_through() -> None:
    t = torch.arange(6.0).view(2, 3)
    assert shard_like(t, torch.zeros(2, 3)) is t
    nested = gather_full({"state": {0: {"exp_avg": t, "step": 3}}, "param_groups": [{"lr": 0.1}]})
    assert torch.equal(nested["state"][0]["exp_avg"], t) and nested["state"][0]["step"] == 3


def test_mixed_dtypes_without_bf16_are_refused() -> None:
    block = torch.nn.Linear(4, 4).to(torch.bfloat16)
    block.lora = torch.nn.Linear(4, 1)  # float32 adapter weights next to bfloat16 base weights
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([block])
    with pytest.raises(ConfigError) as info:
        shard_module(root, default_units(root), "no")
    msg = str(info.value)
    assert "Linear" in msg and "torch.bfloat16" in msg and "torch.float32" in msg
    assert "train.mixed_precision=bf16" in msg and "backbone.dtype=float32" in msg


def test_root_checked_on_its_own_parameters() -> None:
    """A float32 root with bfloat16 blocks is not mixed: each unit is gathered on its own."""
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4).to(torch.bfloat16)])
    root.head = torch.nn.Linear(4, 4)
    with pytest.raises(Exception) as info:  # passes the dtype check, then needs a process group
        shard_module(root, default_units(root), "no")
    assert not isinstance(info.value, ConfigError)


def test_a_torch_without_the_fsdp2_calls_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_force_sum_reduction_for_comms")
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(ConfigError) as info:
        shard_module(root, default_units(root), "no")
    msg = str(info.value)
    assert f"torch {torch.__version__}" in msg and "set_force_sum_reduction_for_comms" in msg
    assert "train.sharding=ddp" in msg
