"""Splitting a rollout over processes and gathering what credit assignment needs.

Every process rolls out a contiguous block of the epoch's prompts and scores its own samples. Before
advantages are computed, the reward table, the sample keys and the stored transitions' bookkeeping (step,
log-prob, scale, sample, input id) are gathered in rank order, so a group may span processes and every process
computes the same global credit. Gathered sample and transition orders equal those of a single-process run
of the same epoch: shards are contiguous in prompt order, and transitions are put in (sample, step) order
on every process (:func:`canonical_order`).

The world size is read from the launched processes (``accelerate launch``), never from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from alignkit.errors import DistributedError, RewardError
from alignkit.reward_set import RewardTable
from alignkit.types import SampleKeys, Transitions

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among the launched ones.

    Attributes:
        rank: index of this process, ``0 <= rank < world_size``.
        world_size: number of processes (1 without a launcher).
    """

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def block(self, items: list[T], setting: str) -> list[T]:
        """This process's contiguous block of ``items`` (an equal share of each).

        Raises:
            DistributedError: when ``len(items)`` is not a multiple of the world size; ``setting`` names
                the configuration field that sets the count.
        """
        n = len(items)
        if n % self.world_size:
            lower = n - n % self.world_size
            raise DistributedError(
                f"{setting}={n} cannot be split evenly over {self.world_size} processes; set it to a multiple of "
                f"{self.world_size} (e.g. {max(lower, self.world_size)} or {lower + self.world_size}) or launch "
                f"a number of processes that divides {n}"
            )
        share = n // self.world_size
        return items[self.rank * share:(self.rank + 1) * share]

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every process, in rank order (pickled; for small CPU objects)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes in place (a no-op for one process); returns it."""
        if self.distributed:
            import torch.distributed as dist

            if dist.get_backend() == "nccl" and tensor.device.type == "cpu":  # NCCL reduces device tensors only
                on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
                tensor.copy_(on_device)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def on_every_process(shard: Shard, fn: Callable[[], T]) -> T:
    """``fn()`` (scoring); an exception on any process raises :class:`RewardError` on every process, so that
    none waits in a later collective for one that failed (one process: ``fn()`` as it is)."""
    if not shard.distributed:
        return fn()
    result, failure = None, None
    try:
        result = fn()
    except Exception as exc:
        failure = f"process {shard.rank}: {type(exc).__name__}: {exc}"
    failures = [f for f in shard.gather(failure) if f]
    if failures:
        raise RewardError(failures[0])
    return result  # type: ignore[return-value]


def canonical_order(transitions: Transitions, num_steps: int) -> Transitions:
    """Transitions sorted by (sample, step): the order does not depend on rollout batching or sharding."""
    key = transitions.sample_index.long() * num_steps + transitions.step.long().cpu()  # [M]
    order = torch.argsort(key, stable=True)
    if torch.equal(order, torch.arange(len(order))):
        return transitions
    return transitions.select(order)


def header(transitions: Transitions) -> Transitions:
    """The bookkeeping of ``transitions`` with zero-width states (what credit assignment reads)."""
    m = len(transitions)
    empty = torch.empty((m, 0))
    return Transitions(state=empty, next_state=empty.clone(), step=transitions.step.cpu(),
                       log_prob=transitions.log_prob.cpu(), scale=transitions.scale.cpu(),
                       sample_index=transitions.sample_index.cpu(), input_id=transitions.input_id.cpu())


@dataclass
class Gathered:
    """The whole epoch's rollout structure, identical on every process.

    Attributes:
        table: rewards of all ``S`` samples, rank order.
        keys: keys of all samples; ``prompt_index`` indexes the epoch's global prompt list.
        transitions: bookkeeping of all ``M`` transitions (zero-width states), ``sample_index`` global.
        transition_offset: global index of this process's first transition.
        local_transitions: how many transitions this process holds.
        nfe: model evaluations of all processes.
    """

    table: RewardTable
    keys: SampleKeys
    transitions: Transitions
    transition_offset: int
    local_transitions: int
    nfe: int

    def local_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of global transition indices ``rows`` ``[B]``: ``(local indices [b], global indices [b])`` of those
        held by this process, in the order given."""
        lo, hi = self.transition_offset, self.transition_offset + self.local_transitions
        mine = (rows >= lo) & (rows < hi)  # [B]
        return rows[mine] - lo, rows[mine]

    def stand_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local [1], global [1])`` index of this process's first transition: a row to run with weight 0
        when the process holds none of a minibatch (a sharded module needs every process's forward)."""
        if not self.local_transitions:
            raise DistributedError("train.sharding=fsdp: this process holds no transition to run; every process "
                                   "must roll out some (check the exploration plan)")
        return torch.tensor([0]), torch.tensor([self.transition_offset])


def gather_rollout(shard: Shard, table: RewardTable, keys: SampleKeys, transitions: Transitions, *,
                   num_prompts: int, nfe: int) -> Gathered:
    """Gather the per-process reward tables, keys and transition bookkeeping (see the module docstring).

    Args:
        shard: this process's place.
        table, keys, transitions: this process's ``S_p`` samples' rewards and keys, its ``M_p`` transitions
            (in :func:`canonical_order`).
        num_prompts: prompts this process rolled out (``keys.prompt_index`` indexes them).
        nfe: model evaluations this process spent.
    """
    if not shard.distributed:
        return Gathered(table=table, keys=keys, transitions=transitions, transition_offset=0,
                        local_transitions=len(transitions), nfe=nfe)
    parts = shard.gather({"raw": table.raw, "invalid": table.invalid, "keys": keys, "tr": header(transitions),
                          "nfe": nfe, "prompts": num_prompts})
    prompt_off = sample_off = id_off = 0
    all_keys, all_tr = [], []
    offsets = []
    for part in parts:
        k: SampleKeys = part["keys"]
        tr: Transitions = part["tr"]
        all_keys.append(SampleKeys(k.prompt_index + prompt_off, k.seed_index, k.branch_step))
        tr.sample_index = tr.sample_index + sample_off
        # disjoint input ids per process: an input group (one trunk's branch point) never spans processes
        tr.input_id = tr.input_id - (int(tr.input_id.min()) if len(tr) else 0) + id_off
        id_off = int(tr.input_id.max()) + 1 if len(tr) else id_off
        all_tr.append(tr)
        offsets.append(sum(len(t) for t in all_tr[:-1]))
        prompt_off += part["prompts"]
        sample_off += len(k)
    merged = RewardTable(raw={name: torch.cat([p["raw"][name] for p in parts]) for name in parts[0]["raw"]},
                         invalid={name: sum(p["invalid"][name] for p in parts) for name in parts[0]["invalid"]})
    keys_all = SampleKeys(*(torch.cat([getattr(k, f) for k in all_keys])
                            for f in ("prompt_index", "seed_index", "branch_step")))
    return Gathered(table=merged, keys=keys_all, transitions=Transitions.cat(all_tr),
                    transition_offset=offsets[shard.rank], local_transitions=len(transitions),
                    nfe=sum(p["nfe"] for p in parts))


def end_process_group() -> None:
    """Destroy the default process group, if one is up, after a barrier: a gloo / NCCL group left to the
    interpreter's shutdown can abort the process ("terminate called without an active exception", exit -6)
    while its worker threads are torn down. Call it once, when the command is done with every trainer."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
