"""Shared-input training: the children of one branch point share (state, step, conditioning); the update cuts
minibatches on whole input groups, evaluates each distinct input once and takes every child's log-prob from that
one distribution. The gradient equals the per-transition gradient of the same rows (tiny SD3, tiny Wan, the
masked LM), through gradient accumulation, masked samples and noise-aware weights; tied transitions can be left
out (``algo.objective.skip_tied``)."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from alignkit.compose import load_run_config
from alignkit.config import RunConfig
from alignkit.cost import count_flops
from alignkit.distributed import Shard
from alignkit.modalities.discrete.tiny import build_char_tokenizer, build_tiny_masked_lm, save_masked_lm
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.trainer import Trainer
from alignkit.types import Credit, Transitions
from alignkit.update import TRAIN_METRICS, Updater, distinct_inputs

# --- minibatches without a model ------------------------------------------------------------------------------


def _updater(tmp_path: Path, **train: Any) -> Updater:
    cfg = RunConfig()
    for k, v in train.items():
        target = cfg.algo.objective if k == "skip_tied" else cfg.algo if k == "timestep_fraction" else cfg.train
        setattr(target, k, v)
    # the minibatch layout reads only the configuration; no model is involved
    return Updater(cfg, SimpleNamespace(device=torch.device("cpu")), None, None, [], None, None, None,  # type: ignore[arg-type]
                   Shard(), False, tmp_path)


def _transitions(input_id: list[int], sample_index: list[int] | None = None, step: list[int] | None = None
                 ) -> Transitions:
    m = len(input_id)
    return Transitions(state=torch.zeros(m, 1), next_state=torch.zeros(m, 1),
                       step=torch.tensor(step) if step is not None else torch.zeros(m, dtype=torch.long),
                       log_prob=torch.zeros(m), scale=torch.ones(m),
                       sample_index=torch.tensor(sample_index) if sample_index is not None else torch.arange(m),
                       input_id=torch.tensor(input_id))


def _credit(m: int, mask: torch.Tensor | None = None, advantage: torch.Tensor | None = None) -> Credit:
    return Credit(advantage=advantage if advantage is not None else torch.ones(m), weight=torch.ones(m),
                  mask=mask if mask is not None else torch.ones(m, dtype=torch.bool),
                  sample_advantage=torch.zeros(m), zero_std_fraction=0.0)


def test_distinct_inputs_numbers_groups_by_first_appearance() -> None:
    first, group = distinct_inputs(torch.tensor([7, 3, 7, 9, 3, 3]))
    assert first.tolist() == [0, 1, 3] and group.tolist() == [0, 1, 0, 2, 1, 1]
    first, group = distinct_inputs(torch.tensor([], dtype=torch.long))
    assert first.tolist() == [] and group.tolist() == []


def test_minibatches_hold_whole_groups_up_to_the_batch_size(tmp_path: Path) -> None:
    # 12 branch points of 4 children (ids shuffled in storage order), one of them with 2 masked children
    ids = torch.arange(12).repeat_interleave(4)[torch.randperm(48, generator=torch.Generator().manual_seed(0))]
    mask = torch.ones(48, dtype=torch.bool)
    mask[(ids == 5).nonzero().flatten()[:2]] = False
    tr, credit = _transitions(ids.tolist()), _credit(48, mask)
    up = _updater(tmp_path, train_batch_size=10)
    batches = up.minibatches(tr, credit, epoch=0, inner=0)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == mask.nonzero().flatten().tolist()  # every kept transition once
    for b in batches:
        assert len(b) <= 10
        for g in ids[b].unique():
            assert int((ids[b] == g).sum()) == int((ids[mask] == g).sum()), "a group was cut"
    for b, nxt in itertools.pairwise(batches):  # packed greedily: the next group did not fit
        assert len(b) + int((ids[nxt] == ids[nxt[0]]).sum()) > 10
    # deterministic in (seed, epoch, inner epoch), different across inner epochs
    assert all(torch.equal(a, b) for a, b in zip(batches, up.minibatches(tr, credit, 0, 0), strict=True))
    assert not torch.equal(torch.cat(up.minibatches(tr, credit, 0, 1)), rows)


def test_a_group_larger_than_the_batch_is_a_minibatch_of_its_own(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ids = [0] * 6 + [1] * 2 + [2] * 2
    up = _updater(tmp_path, train_batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = up.minibatches(_transitions(ids), _credit(10), epoch=0, inner=0)
    assert sorted(len(b) for b in batches) == [4, 6] or sorted(len(b) for b in batches) == [2, 2, 6]
    assert any(len(b) == 6 and set(b.tolist()) == set(range(6)) for b in batches)
    assert "input group of 6 transitions" in caplog.text and "train.train_batch_size=4" in caplog.text


def test_distinct_ids_give_the_per_transition_minibatches_bit_for_bit(tmp_path: Path) -> None:
    """Flow-GRPO transitions never share an input: shared-input training changes nothing, including a random
    subset of each sample's steps (``timestep_fraction``)."""
    samples, steps = 6, 5
    sample_index = torch.arange(samples).repeat_interleave(steps)
    step = torch.arange(steps).repeat(samples)
    tr = _transitions((sample_index * steps + step).tolist(), sample_index.tolist(), step.tolist())
    credit = _credit(len(tr))
    on = _updater(tmp_path, train_batch_size=7, timestep_fraction=0.6)
    off = _updater(tmp_path, train_batch_size=7, timestep_fraction=0.6, shared_inputs=False)
    for inner in range(2):
        a, b = on.minibatches(tr, credit, 3, inner), off.minibatches(tr, credit, 3, inner)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    kept = torch.cat(a)
    assert torch.bincount(sample_index[kept]).tolist() == [3] * samples  # ceil(0.6 x 5) steps per sample


def test_timestep_fraction_keeps_whole_groups_whatever_it_subsamples(tmp_path: Path) -> None:
    """Transitions are subsampled per sample first, then grouped: each minibatch holds every kept member of a
    group (here several transitions per sample share inputs with another sample's)."""
    sample_index = [0, 0, 1, 1, 2, 2, 3, 3]
    ids = [0, 1, 0, 1, 2, 3, 2, 3]  # samples 0/1 and 2/3 are children of the same branch points
    tr = _transitions(ids, sample_index, [0, 1] * 4)
    up = _updater(tmp_path, train_batch_size=2, timestep_fraction=0.5)
    batches = up.minibatches(tr, _credit(8), epoch=0, inner=0)
    kept = torch.cat(batches)
    assert torch.bincount(torch.tensor(sample_index)[kept]).tolist() == [1, 1, 1, 1]
    for b in batches:
        for g in torch.tensor(ids)[b].unique():
            assert int((torch.tensor(ids)[b] == g).sum()) == int((torch.tensor(ids)[kept] == g).sum())


def test_skip_tied_leaves_zero_advantage_transitions_out(tmp_path: Path) -> None:
    adv = torch.tensor([0.0, 0.0, 1.2, -1.2, 0.0, 0.0, 0.7, 0.0])
    mask = torch.tensor([True] * 7 + [False])
    tr, credit = _transitions([0, 0, 1, 1, 2, 2, 3, 3]), _credit(8, mask, adv)
    skip = _updater(tmp_path, train_batch_size=4, skip_tied=True)
    assert skip.tied(credit).tolist() == [True, True, False, False, True, True, False, False]
    assert sorted(torch.cat(skip.minibatches(tr, credit, 0, 0)).tolist()) == [2, 3, 6]
    keep = _updater(tmp_path, train_batch_size=4)
    assert not keep.tied(credit).any()
    assert sorted(torch.cat(keep.minibatches(tr, credit, 0, 0)).tolist()) == list(range(7))


# --- gradients on real backbones ---------------------------------------------------------------------------


def spotty_reward(samples: Any, prompts: list[str], metadata: list[dict]) -> list[float | None]:
    """A reward that spreads samples and cannot score some: the mean pixel of images / videos (None where its
    first three decimals make a multiple of 5), a hash of the characters of text (None where the character codes
    sum to a multiple of 4)."""
    out: list[float | None] = []
    for s in samples:
        if isinstance(s, torch.Tensor):
            v = float(s.float().mean())
            out.append(None if int(v * 1000) % 5 == 0 else v)
        else:
            code = sum(ord(c) * (i + 1) for i, c in enumerate(s))
            out.append(None if sum(map(ord, s)) % 4 == 0 else (code % 101) / 101)
    return out


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_char_tokenizer()
    return save_masked_lm(build_tiny_masked_lm(tok, hidden=32, layers=1, heads=2, seed=0), tok,
                          tmp_path_factory.mktemp("mlm"))


BACKBONES = {
    # recipe, overrides: 2 prompts x 2 seeds; the KL term on (beta > 0); noise-aware weights (the recipes')
    "sd3": ("sd3_tiny_tempflow_grpo", ["backbone.num_steps=4", "algo.plan.options.children=3"]),
    "wan": ("wan_tiny_tempflow_grpo", ["algo.plan.options.children=3"]),
    "masked_lm": ("arithmetic_tempflow_grpo", ["algo.objective.beta=0.05", "train.prompts_per_epoch=3",
                                               "prompts.options.train_size=20", "prompts.options.eval_size=8"]),
}


def _trainer(name: str, out: Path, mlm: Path, *extra: str) -> Trainer:
    recipe, overrides = BACKBONES[name]
    base = [f"output_dir={out}", "train.epochs=1", "train.prompts_per_epoch=2", "train.sample_every=1000",
            "eval.before_after=false", "eval.every=0", "device=cpu", "train.learning_rate=1e-2"]
    if name == "masked_lm":
        base.append(f"backbone.pretrained={mlm}")
    cfg = load_run_config(recipe, [*base, *overrides, *extra])
    return Trainer(cfg, reward_set=RewardSet([RewardTerm("spotty", spotty_reward, 1.0)]), tensorboard=False)


def _epoch(trainer: Trainer) -> tuple[Any, Any, Credit]:
    rolled = trainer.rollout(0)
    gathered = trainer.score(rolled)
    return rolled.rollout, gathered, trainer.assign_credit(gathered).credit


def _gradient(trainer: Trainer, rollout: Any, credit: Credit, rows: torch.Tensor, shared: bool
              ) -> tuple[float, list[torch.Tensor], int]:
    trainer.cfg.train.shared_inputs = shared  # the updater reads the run's configuration
    for p in trainer.params:
        p.grad = None
    trainer.sampler.train(True)

    def loss_and_backward() -> float:
        out = trainer.updater.minibatch_loss(rollout, credit, rows)
        out.loss.backward()
        return float(out.loss.detach())

    loss, flops = count_flops(loss_and_backward)
    trainer.sampler.train(False)
    return loss, [p.grad.detach().clone() for p in trainer.params], flops


@pytest.mark.integration
@pytest.mark.parametrize("name", list(BACKBONES))
def test_shared_inputs_give_the_per_transition_gradient(name: str, tmp_path: Path, mlm_dir: Path) -> None:
    trainer = _trainer(name, tmp_path / name, mlm_dir)
    rollout, gathered, credit = _epoch(trainer)
    tr = gathered.transitions
    assert (~credit.mask).any() and credit.mask.any(), "the reward should mask some samples and keep others"
    # every child of one branch point has the branch point's id; distinct branch points have distinct ids
    point = torch.stack([gathered.keys.prompt_index[tr.sample_index], gathered.keys.seed_index[tr.sample_index],
                         tr.step], dim=1)
    _, by_point = torch.unique(point, dim=0, return_inverse=True)
    _, by_id = torch.unique(tr.input_id, return_inverse=True)
    pairs = torch.unique(torch.stack([by_point, by_id], 1), dim=0)  # one id per branch point and vice versa
    assert len(pairs) == len(by_point.unique()) == len(by_id.unique())

    rows = trainer.updater.minibatches(tr, credit, 0, 0)[0]  # a global minibatch of whole groups
    everything = torch.nonzero(credit.mask).flatten()  # and all trainable rows, in storage order
    for chosen in (rows, everything):
        loss_on, grad_on, flops_on = _gradient(trainer, rollout, credit, chosen, shared=True)
        loss_off, grad_off, flops_off = _gradient(trainer, rollout, credit, chosen, shared=False)
        assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-9)
        assert any(bool(g.abs().max() > 0) for g in grad_on), "the gradient should not vanish"
        scale = max(float(g.abs().max()) for g in grad_off)  # float rounding, relative to the gradient's scale
        for a, b in zip(grad_on, grad_off, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        # one forward (and reference forward and backward) per distinct input instead of per transition
        distinct = len(tr.input_id[chosen].unique())
        assert distinct < len(chosen)
        assert flops_on < flops_off
        assert flops_on / flops_off == pytest.approx(distinct / len(chosen), rel=0.25)


def _capture_gradients(trainer: Trainer) -> list[list[torch.Tensor]]:
    """The (summed, clipped) gradient of every optimizer step, read just before the step."""
    steps: list[list[torch.Tensor]] = []
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_pre_hook(lambda *_: steps.append([p.grad.detach().clone() for p in trainer.params]))
    return steps


@pytest.mark.integration
def test_optimizer_steps_with_accumulation_match_the_per_transition_path(tmp_path: Path, mlm_dir: Path) -> None:
    """Two runs over the same minibatches (whole groups; masked samples; noise-aware weights; 2 minibatches per
    optimizer step; 2 inner epochs): every optimizer step's gradient is the same with and without shared inputs,
    and the shared run evaluates one input per branch point."""
    extra = ["train.train_batch_size=9", "train.gradient_accumulation_steps=2", "train.inner_epochs=2"]
    shared = _trainer("sd3", tmp_path / "shared", mlm_dir, *extra)
    single = _trainer("sd3", tmp_path / "single", mlm_dir, *extra, "train.shared_inputs=false")
    rollout, gathered, credit = _epoch(shared)
    assert shared.cfg.algo.credit.noise_aware and not torch.equal(credit.weight, torch.ones_like(credit.weight))
    layout = {inner: shared.updater.minibatches(gathered.transitions, credit, 0, inner) for inner in range(2)}
    single.updater.minibatches = lambda tr, cr, epoch, inner: layout[inner]  # the same rows in both runs
    grads_shared, grads_single = _capture_gradients(shared), _capture_gradients(single)
    stats_shared = shared.optimize(rollout, gathered, credit, 0)
    stats_single = single.optimize(rollout, gathered, credit, 0)

    assert len(grads_shared) == len(grads_single) == math.ceil(len(layout[0]) / 2) * 2 >= 4
    for step_a, step_b in zip(grads_shared, grads_single, strict=True):
        scale = max(float(g.abs().max()) for g in step_b)
        for a, b in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    kept = int(credit.mask.sum())
    assert set(TRAIN_METRICS) <= set(stats_shared)  # each new count documented
    assert stats_shared["train/transitions_trained"] == stats_single["train/transitions_trained"] == 2 * kept
    assert stats_shared["train/distinct_inputs"] == stats_single["train/distinct_inputs"]
    assert stats_shared["train/inputs_evaluated"] == stats_shared["train/distinct_inputs"] < 2 * kept
    assert stats_single["train/inputs_evaluated"] == 2 * kept
    for key in ("train/loss", "train/kl", "train/policy_loss"):  # means of O(1) terms that nearly cancel
        assert stats_shared[key] == pytest.approx(stats_single[key], rel=1e-4, abs=1e-7)


@pytest.mark.integration
def test_skip_tied_trains_only_transitions_with_an_advantage(tmp_path: Path, mlm_dir: Path) -> None:
    """The masked LM's text reward ties often: with skip_tied those transitions cost nothing and are counted."""
    trainer = _trainer("masked_lm", tmp_path / "tied", mlm_dir, "algo.objective.skip_tied=true")
    rollout, gathered, credit = _epoch(trainer)
    tied = credit.mask & (credit.advantage == 0)
    assert tied.any() and (credit.mask & ~tied).any()
    rows = torch.cat(trainer.updater.minibatches(gathered.transitions, credit, 0, 0))
    assert sorted(rows.tolist()) == torch.nonzero(credit.mask & ~tied).flatten().tolist()
    stats = trainer.optimize(rollout, gathered, credit, 0)
    assert stats["train/tied_skipped"] == float(tied.sum())
    assert stats["train/transitions_trained"] == float((credit.mask & ~tied).sum())
    assert math.isfinite(stats["train/loss"]) and stats["train/kl"] >= 0
