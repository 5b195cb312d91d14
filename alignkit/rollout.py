"""The rollout engine: one loop for every modality, driven by an exploration plan."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.cost import FlopMeter, maybe_meter, shape_key
from alignkit.interfaces import Sampler, StepDistribution
from alignkit.plans import PlanSchedule
from alignkit.types import Rollout, SampleKeys, Transitions, index_batch

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

SampleSink = Callable[[torch.Tensor, torch.Tensor, Any], None]
"""Receives finished samples as soon as they are decoded: ``(sample_index [n], prompt_index [n], samples)``
where ``samples`` is what :meth:`Sampler.decode` returned for those ``n`` samples (e.g. ``[n, 3, H, W]``)."""


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


def as_state(x: torch.Tensor) -> torch.Tensor:
    """Float states (latents) in float32; integer states (token ids of discrete models) as they are."""
    return x.float() if x.is_floating_point() else x


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
    identity, used first for the initial noise and then for every exploring step. With a ``meter`` the model
    FLOPs of transitions (phase ``rollout``) and decodes (``decode``) are counted (:mod:`alignkit.cost`).
    """

    def __init__(self, sampler: Sampler, *, batch_size: int, decode_batch_size: int | None = None,
                 meter: FlopMeter | None = None) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.decode_batch_size = decode_batch_size or batch_size
        self.meter = meter

    def _transition(self, state: torch.Tensor, step: torch.Tensor, cond: dict[str, torch.Tensor], *,
                    stochastic: bool) -> StepDistribution:
        """:meth:`Sampler.transition`, its FLOPs counted by the meter."""
        return maybe_meter(self.meter, "rollout", shape_key(state, cond, stochastic),
                           functools.partial(self.sampler.transition, state, step, cond, stochastic=stochastic))

    def _decode(self, state: torch.Tensor) -> Any:
        """:meth:`Sampler.decode`, its FLOPs counted by the meter."""
        return maybe_meter(self.meter, "decode", shape_key(state), functools.partial(self.sampler.decode, state))

    @torch.no_grad()
    def run(self, request: RolloutRequest, schedule: PlanSchedule, sink: SampleSink | None = None) -> Rollout:
        """Sample the request under ``schedule`` (linear or branching).

        Samples are decoded in chunks of ``decode_batch_size`` as soon as their trajectories finish; each
        chunk goes to ``sink`` (if given) while the rollout goes on, so a consumer such as a reward scorer
        on another thread overlaps with the remaining denoising.
        """
        sampler = self.sampler
        num_steps = sampler.num_steps
        bad = [s for s in schedule.trained_steps() if not 0 <= s < num_steps - 1]
        if bad:
            raise ValueError(
                f"exploring steps {bad} are outside 0..{num_steps - 2} (the last of {num_steps} steps never "
                "explores); fix the plan's steps or backbone.num_steps"
            )
        sampler.train(False)
        cond_all = sampler.encode_prompts(request.prompts)
        p_count = len(request.prompts)
        prompt_index = torch.arange(p_count).repeat_interleave(request.num_seeds)  # [T] one row per noise
        seed_index = torch.arange(request.num_seeds).repeat(p_count)  # [T]
        if schedule.branching:
            n_samples = len(prompt_index) * len(schedule.branch_steps or ()) * schedule.children
            decoded = _Decoded(self, n_samples, sink)
            final_state, transitions, keys, nfe = self._branching(request, schedule, cond_all, prompt_index,
                                                                   seed_index, decoded)
        else:
            decoded = _Decoded(self, len(prompt_index), sink)
            final_state, transitions, keys, nfe = self._linear(request, schedule, cond_all, prompt_index,
                                                                seed_index, decoded)
        expected = len(prompt_index) * schedule.nfe_per_seed(num_steps)
        if nfe != expected:
            raise AssertionError(f"NFE bookkeeping: counted {nfe}, closed form {expected}")
        return Rollout(
            prompts=list(request.prompts), metadata=list(request.metadata), cond=cond_all, keys=keys,
            samples=decoded.samples(), final_state=final_state, transitions=transitions, nfe=nfe,
            num_steps=num_steps,
        )

    def _noise_generators(self, request: RolloutRequest, rows: torch.Tensor, prompt_index: torch.Tensor,
                          seed_index: torch.Tensor) -> list[torch.Generator]:
        return [sample_generator(request.seed, request.iteration, request.prompt_ids[int(prompt_index[r])],
                                 int(seed_index[r])) for r in rows]

    def _linear(self, request: RolloutRequest, schedule: PlanSchedule, cond_all: dict[str, torch.Tensor],
                prompt_index: torch.Tensor, seed_index: torch.Tensor, decoded: _Decoded
                ) -> tuple[torch.Tensor, Transitions, SampleKeys, int]:
        """One trajectory per initial noise, exploring at ``schedule.stochastic_steps``."""
        stochastic = set(schedule.stochastic_steps)
        finals: list[torch.Tensor] = []
        parts: list[Transitions] = []
        for start in range(0, len(prompt_index), self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, len(prompt_index)))
            gens = self._noise_generators(request, rows, prompt_index, seed_index)
            cond = index_batch(cond_all, prompt_index[rows])
            final, stored = self._trajectory(as_state(self.sampler.initial_state(gens)), cond, gens, stochastic,
                                             rows)
            finals.append(final)
            parts.extend(stored)
            decoded.add(rows, prompt_index[rows], final)
        decoded.flush()
        final_state = torch.cat(finals)
        transitions = Transitions.cat(parts) if parts else _empty_transitions(final_state)
        keys = SampleKeys(prompt_index, seed_index, torch.full_like(prompt_index, -1))
        return final_state, transitions, keys, len(prompt_index) * self.sampler.num_steps

    def _branching(self, request: RolloutRequest, schedule: PlanSchedule, cond_all: dict[str, torch.Tensor],
                   prompt_index: torch.Tensor, seed_index: torch.Tensor, decoded: _Decoded
                   ) -> tuple[torch.Tensor, Transitions, SampleKeys, int]:
        """Deterministic trunks, ``K`` children per branch step drawn from the trunk's own evaluation of
        that step, then every child finished by the ODE, batched across branch points.

        At a branch step the trunk evaluates the model once with ``stochastic=True``: the distribution's
        ``mode()`` (the deterministic step) continues the trunk and its ``K`` draws are the children, so a
        child costs only the steps after its branch step. Samples are ordered trunk-major, then branch
        step, then child. Each child owns a generator seeded from its identity (run seed, iteration,
        prompt id, seed id, branch step, child id) and uses it once, for its branch noise.
        """
        sampler = self.sampler
        n = sampler.num_steps
        branch = sorted(schedule.branch_steps or ())
        position = {k: j for j, k in enumerate(branch)}
        k_children = schedule.children
        per_trunk = len(branch) * k_children
        last = max(branch) if branch else -1
        t_idx = torch.arange(len(prompt_index)).repeat_interleave(per_trunk)  # [C]
        b_step = torch.tensor(branch, dtype=torch.long).repeat_interleave(k_children).repeat(len(prompt_index))
        c_idx = torch.arange(k_children).repeat(len(prompt_index) * len(branch))  # [C]
        child_prompt = prompt_index[t_idx]
        state: torch.Tensor | None = None  # [C, ...] children states, allocated at the first draw
        step = b_step + 1  # [C] the next step each child evaluates
        parts: list[Transitions] = []
        nfe = 0
        for start in range(0, len(prompt_index), self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, len(prompt_index)))
            x = as_state(sampler.initial_state(self._noise_generators(request, rows, prompt_index, seed_index)))
            cond = index_batch(cond_all, prompt_index[rows])
            for i in range(last + 1):
                dist = self._transition(x, torch.full((len(rows),), i, device=x.device), cond,
                                        stochastic=i in position)
                nfe += len(rows)
                if i in position:
                    local = torch.arange(len(rows)).repeat_interleave(k_children)  # [R K]
                    children = (rows.repeat_interleave(k_children) * per_trunk + position[i] * k_children
                                + torch.arange(k_children).repeat(len(rows)))  # [R K] sample indices
                    sub = dist.index(local.to(x.device))
                    drawn = sub.sample([sample_generator(
                        request.seed, request.iteration, request.prompt_ids[int(prompt_index[t_idx[c]])],
                        int(seed_index[t_idx[c]]), 1 + i, int(c_idx[c])) for c in children])
                    if state is None:
                        state = torch.empty((len(t_idx), *drawn.shape[1:]), dtype=drawn.dtype, device=drawn.device)
                    state[children.to(drawn.device)] = drawn
                    parts.append(Transitions(
                        state=x[local.to(x.device)], next_state=drawn, step=torch.full((len(children),), i),
                        log_prob=sub.log_prob(drawn).float().cpu(), scale=sub.scale.float().cpu(),
                        sample_index=children, input_id=children // k_children,  # one input per branch point
                    ))
                if i < last:
                    x = dist.mode()
        if state is None:
            raise ValueError("a branching plan with no branch steps samples nothing; list at least one branch step")
        finished = [c for c in range(len(t_idx)) if int(step[c]) >= n]
        if finished:
            rows = torch.tensor(finished, dtype=torch.long)
            decoded.add(rows, child_prompt[rows], state[rows])
        pending = [c for c in range(len(t_idx)) if int(step[c]) < n]
        active: list[int] = []
        while pending or active:  # ODE completion of every child, batched across branch points
            take = self.batch_size - len(active)
            active += pending[:take]
            del pending[:take]
            idx = torch.tensor(active, dtype=torch.long)
            dist = self._transition(state[idx], step[idx].to(state.device),
                                    index_batch(cond_all, child_prompt[idx]), stochastic=False)
            nfe += len(idx)
            state[idx] = dist.mode()
            step[idx] += 1
            done = [r for r in active if int(step[r]) >= n]
            if done:
                rows = torch.tensor(done, dtype=torch.long)
                decoded.add(rows, child_prompt[rows], state[rows])
            active = [r for r in active if int(step[r]) < n]
        decoded.flush()
        transitions = Transitions.cat(parts)
        order = torch.argsort(transitions.sample_index)
        transitions = transitions.select(order)  # one transition per child, in sample order
        keys = SampleKeys(child_prompt, seed_index[t_idx], b_step)
        return state, transitions, keys, nfe

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
            dist = self._transition(x, step.to(x.device), cond, stochastic=explore)
            if explore:
                nxt = dist.sample(gens)
                stored.append(Transitions(
                    state=x, next_state=nxt, step=step, log_prob=dist.log_prob(nxt).float().cpu(),
                    scale=dist.scale.float().cpu(), sample_index=rows.clone(),
                    input_id=rows * self.sampler.num_steps + i,  # one input per (sample, step)
                ))
            else:
                nxt = dist.mode()
            x = nxt
        return x, stored


class _Decoded:
    """Decodes finished samples in chunks of the engine's ``decode_batch_size``, hands each chunk to the
    sink, and assembles all decoded samples in sample order."""

    def __init__(self, engine: RolloutEngine, total: int, sink: SampleSink | None) -> None:
        self.engine, self.total, self.sink = engine, total, sink
        self._rows: list[torch.Tensor] = []  # pending sample indices, [n] each
        self._prompts: list[torch.Tensor] = []
        self._states: list[torch.Tensor] = []
        self._chunks: list[tuple[torch.Tensor, Any]] = []

    def add(self, rows: torch.Tensor, prompt_index: torch.Tensor, final: torch.Tensor) -> None:
        """Finished samples ``rows`` ``[n]`` with their prompt indices ``[n]`` and final states ``[n, ...]``."""
        self._rows.append(rows)
        self._prompts.append(prompt_index)
        self._states.append(final)
        self.flush(only_full=True)

    def flush(self, only_full: bool = False) -> None:
        """Decode pending samples in chunks of ``decode_batch_size`` (only full chunks if ``only_full``)."""
        size = self.engine.decode_batch_size
        while self._rows and (not only_full or sum(len(r) for r in self._rows) >= size):
            rows, prompts, states = torch.cat(self._rows), torch.cat(self._prompts), torch.cat(self._states)
            k = min(size, len(rows))
            self._rows, self._prompts, self._states = [rows[k:]], [prompts[k:]], [states[k:]]
            if k == len(rows):
                self._rows, self._prompts, self._states = [], [], []
            out = self.engine._decode(states[:k])
            self._chunks.append((rows[:k], out))
            if self.sink is not None:
                self.sink(rows[:k], prompts[:k], out)

    def samples(self) -> Any:
        """Decoded samples in sample order (a tensor ``[S, ...]`` or a list of ``S`` items)."""
        index = torch.cat([rows for rows, _ in self._chunks])
        if len(index) != self.total or not torch.equal(torch.sort(index).values, torch.arange(self.total)):
            raise AssertionError(f"decoded {len(index)} samples, expected each of {self.total} once")
        order = torch.argsort(index)
        if isinstance(self._chunks[0][1], torch.Tensor):
            return torch.cat([out for _, out in self._chunks])[order]
        items = [item for _, out in self._chunks for item in out]
        return [items[int(i)] for i in order]


def _empty_transitions(like: torch.Tensor) -> Transitions:
    shape = (0, *like.shape[1:])
    zl = torch.zeros(0, dtype=torch.long)
    zf = torch.zeros(0)
    return Transitions(like.new_zeros(shape), like.new_zeros(shape), zl, zf, zf, zl)
