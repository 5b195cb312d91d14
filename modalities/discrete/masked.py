"""Masked (absorbing-state) discrete diffusion: reveal schedule, step distribution and a sampler base.

State: ``[B, G]`` long token ids of the generated region, ``mask_id`` where a position is not yet revealed;
the initial state is all ``mask_id`` (there is no initial noise: randomness enters only at stochastic steps).
Of the ``N`` steps (``backbone.num_steps``), steps ``0 .. N-2`` reveal ``r_i`` positions each
(:func:`reveal_schedule`: MaskGIT's cosine schedule or a linear one, at least one per step, ``sum r_i = G``)
and the last step is the identity: it reveals nothing and skips the model. It plays the part of the flows'
final sigma -> 0 step, which never explores, so every step that draws tokens, including the one that
fills the least confident positions, can be a policy action. (The rollout engine still counts the identity
step as one evaluation in its NFE.)

**What a step's action is.** The positions are chosen by confidence *before* any value is drawn: the
confidence of a masked position is the largest probability of the untempered model distribution there,
and the ``r_i`` most confident masked positions (ties to the lower index) are revealed. This choice is a
deterministic function of (state, parameters), identical for a stochastic and a deterministic step from
the same state. The action is the token values at those positions: a stochastic step draws each one
independently from ``softmax(logits / T)`` (``T`` = ``algo.noise_level``) with the row's own generator, a
deterministic step takes the argmax. Hence

    log pi(next | state) = sum over revealed j of log softmax(logits_j / T)[next_j]

is the exact log-probability of the next state under the policy that drew it (summed, not averaged, over
the revealed tokens; it sums to one over every value assignment of the revealed positions, tested).
Training recomputes it under the current parameters for the positions the *stored* transition revealed
(read off ``next_state``): like the greedy trunk, the position choice is treated as dynamics given the
state, not as a differentiated action.

MaskGIT's own rule (rank positions by the confidence of the *sampled* tokens, plus annealed Gumbel noise)
is not offered: the positions it reveals depend on values drawn at positions it then leaves masked, whose
marginal probability has no closed form, so the sum above would not be its log-probability.

**Exploration scale** (the noise-aware weight analogue, ``backbone.options.scale``): ``masked_fraction``
(masked positions before the step / ``G``), ``entropy`` (summed entropy, in nats, of the tempered
distributions at the positions the step reveals: the entropy of the step's action) or ``uniform`` (1).
A deterministic step has scale 0.

**Deterministic steps** (``backbone.options.deterministic_step``): ``argmax`` takes the most likely token at
each revealed position (greedy decoding: right for short answers, but on image tokens it reveals mostly
background, the most likely value of almost every cell). ``keyed_sample`` draws the revealed tokens from the
tempered distribution with Gumbel noise keyed by the state and the step index (the Gumbel-max trick with a
generator seeded from a hash of the row's tokens): a deterministic function of the state, as a flow's ODE step
is, whose draws are distributed as the stochastic step's. The trunk and the children's continuations of
TempFlow-GRPO then look like samples, and evaluation is reproducible.
"""

from __future__ import annotations

import hashlib
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignkit.interfaces import Sampler, StepDistribution
from alignkit.registry import STEP_KINDS
from alignkit.types import Conditioning

SCHEDULES = ("cosine", "linear")
SCALES = ("masked_fraction", "entropy", "uniform")
DETERMINISTIC_STEPS = ("argmax", "keyed_sample")
FORBIDDEN_LOGIT = -1e9
"""Logit of tokens a step may never reveal (mask, padding): probability exactly 0 in float32."""


def reveal_schedule(length: int, num_steps: int, kind: str = "cosine") -> torch.Tensor:
    """``[N]`` long: positions revealed at each of ``N`` steps, each >= 1, summing to ``length``.

    ``cosine`` (MaskGIT): ``floor(G cos(pi/2 (i + 1) / N))`` positions stay masked after step ``i``;
    ``linear``: ``floor(G (1 - (i + 1) / N))``. Counts are then adjusted so that every step reveals at
    least one position.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"backbone.options.schedule={kind!r}: use one of {', '.join(SCHEDULES)}")
    if not 1 <= num_steps <= length:
        raise ValueError(
            f"backbone.num_steps={num_steps}: a masked model over {length} positions needs 1..{length} steps "
            f"(each step reveals at least one position); lower backbone.num_steps or raise backbone.options.gen_length"
        )
    frac = (lambda u: math.cos(math.pi / 2 * u)) if kind == "cosine" else (lambda u: 1.0 - u)
    masked = [length] + [math.floor(length * frac((i + 1) / num_steps) + 1e-9) for i in range(num_steps)]
    masked[num_steps] = 0
    for i in range(1, num_steps):
        masked[i] = max(min(masked[i], masked[i - 1] - 1), num_steps - i)
    return torch.tensor([masked[i] - masked[i + 1] for i in range(num_steps)], dtype=torch.long)


class RevealRule:
    """A masked-diffusion step kind (``algo.step_kind``): how a step picks the positions it reveals.

    Registered in the step-kind registry beside the flow step families so that recipes name it the same
    way; only masked-diffusion samplers accept it.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` bool: the ``count[b]`` (``[B]`` long) most confident masked positions of each row.

        ``confidence``: ``[B, G]`` float; ``masked``: ``[B, G]`` bool. Ties go to the lower position.
        """
        score = torch.where(masked, confidence, torch.full_like(confidence, -math.inf))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [B, G]
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(score.shape[1], device=order.device).expand_as(order))
        return (ranks < count.unsqueeze(1)) & masked

    def __call__(self, *args: object) -> None:
        raise TypeError(
            f"algo.step_kind={self.name!r} is a masked-diffusion reveal rule; flow backbones take a flow step "
            "family (ode, flow_grpo, cps, dance_grpo)"
        )

    def __repr__(self) -> str:
        return f"RevealRule({self.name!r})"


MASKED_CONFIDENCE = RevealRule("masked_confidence")
"""Reveal the most confident masked positions (confidence measured before values are drawn); registered
as step kind ``masked_confidence`` through the ``alignkit.steps`` entry point."""


@dataclass
class MaskedStep:
    """One masked-diffusion step for a batch ``[B, G]``.

    Attributes:
        state: ``[B, G]`` long tokens before the step (``mask_id`` where masked).
        log_probs: ``[B, G, V]`` float32 ``log softmax(logits / T)``, the policy at every position.
        reveal: ``[B, G]`` bool, the positions this step reveals.
        step_scale: ``[B]`` float32 exploration scale (0 for a deterministic step).
        mask_id: the mask token id.
        mode_noise: ``[B, G, V]`` float32 Gumbel noise added to ``log_probs`` by :meth:`mode`
            (``deterministic_step=keyed_sample``); None: plain argmax.
    """

    state: torch.Tensor
    log_probs: torch.Tensor
    reveal: torch.Tensor
    step_scale: torch.Tensor
    mask_id: int
    mode_noise: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.step_scale

    def index(self, rows: torch.Tensor) -> MaskedStep:
        return MaskedStep(self.state[rows], self.log_probs[rows], self.reveal[rows], self.step_scale[rows],
                          self.mask_id, None if self.mode_noise is None else self.mode_noise[rows])

    def mode(self) -> torch.Tensor:
        """The deterministic step ``[B, G]``: at the revealed positions the argmax of ``log_probs`` (plus
        ``mode_noise`` when set: a keyed draw), the state elsewhere."""
        scores = self.log_probs if self.mode_noise is None else self.log_probs.detach() + self.mode_noise
        return torch.where(self.reveal, scores.argmax(-1), self.state)

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Values at the revealed positions drawn from the tempered distributions, row ``b`` with
        ``generators[b]`` (on the CPU, so a draw does not depend on batch position or device)."""
        if len(generators) != self.state.shape[0]:
            raise ValueError(f"need one generator per batch row: got {len(generators)} for batch {self.state.shape[0]}")
        out = self.state.clone()
        probs = self.log_probs.detach().float().exp().cpu()  # [B, G, V]
        reveal = self.reveal.cpu()
        for b, gen in enumerate(generators):
            pos = torch.nonzero(reveal[b]).flatten()
            if len(pos):
                drawn = torch.multinomial(probs[b, pos], 1, generator=gen).flatten()  # [r]
                out[b, pos.to(out.device)] = drawn.to(out.device)
        return out

    def log_prob(self, next_state: torch.Tensor) -> torch.Tensor:
        """``[B]`` sum of the tempered log-probabilities of the tokens ``next_state`` reveals.

        The revealed positions are read from ``next_state`` (masked before, not after), so a stored
        transition is scored on its own positions even when the current parameters would rank others first;
        their number must be the step's.
        """
        next_state = next_state.to(self.state.device)
        masked = self.state == self.mask_id
        changed = (~masked) & (next_state != self.state)
        if bool(changed.any()):
            raise ValueError("next_state changes tokens that were already revealed; a masked step only fills masks")
        revealed = masked & (next_state != self.mask_id)  # [B, G]
        counts, expected = revealed.sum(1), self.reveal.sum(1)
        if not torch.equal(counts, expected):
            bad = int(torch.nonzero(counts != expected)[0])
            raise ValueError(f"next_state row {bad} reveals {int(counts[bad])} positions, the step reveals "
                             f"{int(expected[bad])}; pass the step index the transition was sampled at")
        tokens = torch.where(revealed, next_state, torch.zeros_like(next_state))
        lp = self.log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, G]
        return torch.where(revealed, lp, torch.zeros_like(lp)).sum(1)

    def kl(self, reference: StepDistribution) -> torch.Tensor:
        """``[B]`` mean over the positions masked before the step of ``KL(pi_T || ref_T)`` per position.

        Every masked position counts (not only the revealed ones): all of them are predictions the policy
        may reveal, now or later, and they set the confidence ranking.
        """
        if not isinstance(reference, MaskedStep):
            raise TypeError(f"KL between MaskedStep and {type(reference).__name__} is undefined")
        per_pos = (self.log_probs.exp() * (self.log_probs - reference.log_probs)).sum(-1)  # [B, G]
        masked = (self.state == self.mask_id).to(per_pos.dtype)
        return (per_pos * masked).sum(1) / masked.sum(1).clamp_min(1)


def keyed_gumbel(state: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, G, V]`` float32 standard Gumbel noise, row ``b`` drawn from a generator seeded by a hash of
    ``state[b]``'s tokens and ``step[b]`` (on the CPU: the same for a row whatever its batch or device)."""
    rows = []
    for tokens, k in zip(state.cpu().tolist(), step.cpu().tolist(), strict=True):
        digest = hashlib.blake2b(repr((int(k), tokens)).encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        u = torch.rand(len(tokens), vocab, generator=gen).clamp_(1e-20, 1.0)
        rows.append(-torch.log(-torch.log(u)))
    return torch.stack(rows).to(state.device)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """``[...]`` entropy in nats of categorical distributions given as ``[..., V]`` log-probabilities."""
    lp = log_probs.double()
    p = lp.exp()
    return -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)


class MaskedDiffusionSampler(Sampler):
    """Transition logic shared by masked-token backbones (text, image tokens).

    Subclasses provide the model's logits over the generated positions, prompt encoding and decoding;
    this class owns the reveal schedule, the step kind, the temperature and the exploration scale.

    Args:
        gen_length: generated positions ``G``.
        num_steps: steps ``N`` including the final identity step (``2 <= N <= G + 1``).
        mask_id: the mask token id.
        step_kind: a reveal rule registered as a step kind (``masked_confidence``).
        temperature: sampling temperature ``T`` of stochastic steps (``algo.noise_level``).
        scale: ``masked_fraction``, ``entropy`` or ``uniform`` (see the module docstring).
        schedule: ``cosine`` or ``linear``.
        forbidden: token ids the model may never reveal (mask, padding, ...).
        deterministic_step: ``argmax`` or ``keyed_sample`` (see the module docstring).
    """

    def __init__(self, *, gen_length: int, num_steps: int, mask_id: int, step_kind: str, temperature: float,
                 scale: str = "masked_fraction", schedule: str = "cosine", forbidden: Sequence[int] = (),
                 deterministic_step: str = "argmax") -> None:
        rule = STEP_KINDS.get(step_kind)
        if not isinstance(rule, RevealRule):
            raise ValueError(
                f"algo.step_kind={step_kind!r} is a flow step family; masked-diffusion backbones take a reveal "
                f"rule: set algo.step_kind=masked_confidence"
            )
        if scale not in SCALES:
            raise ValueError(f"backbone.options.scale={scale!r}: use one of {', '.join(SCALES)}")
        if temperature <= 0:
            raise ValueError(f"algo.noise_level={temperature}: the sampling temperature must be > 0 (e.g. 1.0)")
        if deterministic_step not in DETERMINISTIC_STEPS:
            raise ValueError(f"backbone.options.deterministic_step={deterministic_step!r}: use one of "
                             f"{', '.join(DETERMINISTIC_STEPS)}")
        self.deterministic_step = deterministic_step
        self.rule = rule
        self.gen_length = gen_length
        self.mask_id = mask_id
        self.temperature = float(temperature)
        self.scale_kind = scale
        if num_steps < 2:
            raise ValueError(f"backbone.num_steps={num_steps}: need >= 2 (reveal steps and the final identity step)")
        counts = reveal_schedule(gen_length, num_steps - 1, schedule)
        self.reveal_counts = torch.cat([counts, counts.new_zeros(1)])  # [N], the last step reveals nothing
        self.forbidden = sorted(set(forbidden) | {mask_id})

    @property
    def num_steps(self) -> int:
        return int(self.reveal_counts.shape[0])

    @abstractmethod
    def logits(self, state: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``[B, G, V]`` float logits of the model at the generated positions of ``state`` ``[B, G]``."""

    def initial_state(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``[B, G]`` all-mask states (deterministic: no generator is consumed)."""
        return torch.full((len(generators), self.gen_length), self.mask_id, dtype=torch.long, device=self.device)

    def transition(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning, *,
                   stochastic: bool) -> MaskedStep:
        state = state.to(self.device).long()
        count = self.reveal_counts.to(state.device)[step.to(state.device)]  # [B]
        if not bool((count > 0).any()):  # the final identity step: no model evaluation
            b = state.shape[0]
            nothing = torch.zeros(1, 1, 1, device=state.device).expand(b, self.gen_length, 1)  # [B, G, 1]
            return MaskedStep(state=state, log_probs=nothing, reveal=torch.zeros_like(state, dtype=torch.bool),
                              step_scale=torch.zeros(b, device=state.device), mask_id=self.mask_id)
        logits = self.logits(state, cond).float()  # [B, G, V]
        if self.forbidden:
            # a large finite value, not -inf: exp gives exactly 0, and gradients through the KL stay finite
            logits = logits.index_fill(-1, torch.tensor(self.forbidden, device=logits.device), FORBIDDEN_LOGIT)
        masked = state == self.mask_id  # [B, G]
        confidence = torch.log_softmax(logits, -1).amax(-1).detach()  # [B, G], untempered, before any draw
        count = torch.minimum(count, masked.sum(1))  # [B]
        reveal = self.rule.select(confidence, masked, count)  # [B, G]
        log_probs = torch.log_softmax(logits / self.temperature, -1)  # [B, G, V]
        if not stochastic:
            scale = torch.zeros(state.shape[0], device=state.device)
        elif self.scale_kind == "masked_fraction":
            scale = masked.float().sum(1) / self.gen_length
        elif self.scale_kind == "entropy":
            h = entropy(log_probs.detach())  # [B, G]
            scale = torch.where(reveal, h, torch.zeros_like(h)).sum(1).float()
        elif self.scale_kind == "uniform":
            scale = torch.ones(state.shape[0], device=state.device)
        else:  # checked in __init__
            raise ValueError(f"backbone.options.scale={self.scale_kind!r}: use one of {', '.join(SCALES)}")
        noise = None
        if not stochastic and self.deterministic_step == "keyed_sample":
            noise = keyed_gumbel(state, step, logits.shape[-1])
        return MaskedStep(state=state, log_probs=log_probs, reveal=reveal, step_scale=scale, mask_id=self.mask_id,
                          mode_noise=noise)
