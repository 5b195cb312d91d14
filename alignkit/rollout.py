"""The rollout engine: one loop for every modality, driven by an exploration plan."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.interfaces import Sampler
from alignkit.plans import PlanSchedule
from alignkit.types import Rollout, SampleKeys, Transitions, index_batch

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 over the parts).

    Seeds of a sample depend only on its identity (run seed, iteration, prompt id, seed id, ...), never
    on batch layout or process rank.
    """
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (p & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z & ((1 << 63) - 1)


def sample_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from :func:`mix_seed` of ``parts``."""
    return torch.Generator(device="cpu").manual_seed(mix_seed(*parts))


@dataclass
class RolloutRequest:
    """What to sample.

    Attributes:
        prompts: ``P`` prompt strings.
        prompt_ids: ``P`` stable ids (dataset positions) used to seed each prompt's noises.
        metadata: ``P`` per-prompt metadata dicts.
        num_seeds: initial noises per prompt.
        seed: run seed.
        iteration: rollout iteration (part of every sample's seed).
    """

    prompts: list[str]
    prompt_ids: list[int]
    metadata: list[dict[str, Any]]
    num_seeds: int
    seed: int
    iteration: int


class RolloutEngine:
    """Samples trajectories with a :class:`Sampler` following a :class:`PlanSchedule`.

    Rows are processed in batches of ``batch_size`` samples; each row owns a generator seeded from its
    identity, used first for the initial noise and then for every exploring step.
    """

    def __init__(self, sampler: Sampler, *, batch_size: int, decode_batch_size: int | None = None) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.decode_batch_size = decode_batch_size or batch_size

    @torch.no_grad()
    def run(self, request: RolloutRequest, schedule: PlanSchedule) -> Rollout:
        sampler = self.sampler
        num_steps = sampler.num_steps
        bad = [s for s in schedule.stochastic_steps if not 0 <= s < num_steps - 1]
        if bad:
            raise ValueError(
                f"exploring steps {bad} are outside 0..{num_steps - 2} (the last of {num_steps} steps never "
                "explores); fix the plan's steps or backbone.num_steps"
            )
        sampler.train(False)
        cond_all = sampler.encode_prompts(request.prompts)
        p_count = len(request.prompts)
        prompt_index = torch.arange(p_count).repeat_interleave(request.num_seeds)  # [S]
        seed_index = torch.arange(request.num_seeds).repeat(p_count)  # [S]
        stochastic = set(schedule.stochastic_steps)

        finals: list[torch.Tensor] = []
        parts: list[Transitions] = []
        for start in range(0, len(prompt_index), self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, len(prompt_index)))
            gens = [
                sample_generator(request.seed, request.iteration, request.prompt_ids[int(prompt_index[r])],
                                 int(seed_index[r]))
                for r in rows
            ]
            cond = index_batch(cond_all, prompt_index[rows])
            final, stored = self._trajectory(sampler.initial_state(gens).float(), cond, gens, stochastic, rows)
            finals.append(final)
            parts.extend(stored)

        final_state = torch.cat(finals)
        samples = self._decode(final_state)
        transitions = Transitions.cat(parts) if parts else _empty_transitions(final_state)
        keys = SampleKeys(prompt_index, seed_index, torch.full_like(prompt_index, -1))
        return Rollout(
            prompts=list(request.prompts), metadata=list(request.metadata), cond=cond_all, keys=keys,
            samples=samples, final_state=final_state, transitions=transitions,
            nfe=len(prompt_index) * schedule.nfe_per_seed(num_steps), num_steps=num_steps,
        )

    def _trajectory(
        self,
        x: torch.Tensor,
        cond: dict[str, torch.Tensor],
        gens: Sequence[torch.Generator],
        stochastic: set[int],
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, list[Transitions]]:
        """Run all steps from ``x`` ``[B, ...]``; store the exploring steps as transitions."""
        stored: list[Transitions] = []
        for i in range(self.sampler.num_steps):
            step = torch.full((x.shape[0],), i, dtype=torch.long)
            explore = i in stochastic
            dist = self.sampler.transition(x, step.to(x.device), cond, stochastic=explore)
            if explore:
                nxt = dist.sample(gens)
                stored.append(Transitions(
                    state=x, next_state=nxt, step=step, log_prob=dist.log_prob(nxt).float().cpu(),
                    scale=dist.scale.float().cpu(), sample_index=rows.clone(),
                ))
            else:
                nxt = dist.mode()
            x = nxt
        return x, stored

    def _decode(self, final_state: torch.Tensor) -> Any:
        out = [self.sampler.decode(final_state[i : i + self.decode_batch_size])
               for i in range(0, final_state.shape[0], self.decode_batch_size)]
        if isinstance(out[0], torch.Tensor):
            return torch.cat(out)
        return [item for chunk in out for item in chunk]


def _empty_transitions(like: torch.Tensor) -> Transitions:
    shape = (0, *like.shape[1:])
    zl = torch.zeros(0, dtype=torch.long)
    zf = torch.zeros(0)
    return Transitions(like.new_zeros(shape), like.new_zeros(shape), zl, zf, zf, zl)
