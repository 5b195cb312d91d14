"""TempFlow-GRPO parts: branching, seed groups, noise-aware weights, NFE, window plans."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

import alignkit.rollout as rollout_module
from alignkit.config import BackboneConfig, CreditConfig, LoraConfig
from alignkit.credit import GroupCredit
from alignkit.modalities.image.sd3 import SD3Sampler
from alignkit.modalities.image.tiny import build_tiny_sd3_pipeline
from alignkit.plans import AllStochastic, Branch, Deterministic, PlanSchedule, Window
from alignkit.rollout import RolloutEngine, RolloutRequest
from alignkit.types import index_batch

N_STEPS = 5
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> SD3Sampler:
    folder = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    cfg = BackboneConfig(name="sd3", pretrained=str(folder), height=32, width=32, num_steps=N_STEPS,
                         max_sequence_length=16, lora=LoraConfig(rank=4, alpha=8))
    return SD3Sampler.from_config(cfg, step_kind="flow_grpo", noise_level=0.7, device="cpu")


def _request(num_seeds: int = 2, iteration: int = 0) -> RolloutRequest:
    return RolloutRequest(prompts=PROMPTS, prompt_ids=[10, 11], metadata=[{}, {}], num_seeds=num_seeds, seed=5,
                          iteration=iteration)


def _branch(children: int = 3, **kw: object) -> PlanSchedule:
    return Branch(children=children, **kw).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))


def test_children_share_the_trunk_and_store_only_their_branch_step(sampler: SD3Sampler) -> None:
    req = _request()
    schedule = _branch(children=3)
    rollout = RolloutEngine(sampler, batch_size=64).run(req, schedule)
    n_trunks, k, branch = 4, 3, list(range(N_STEPS - 1))
    assert len(rollout.keys) == n_trunks * len(branch) * k
    tr = rollout.transitions
    # one stored policy action per child, taken at its branch step
    assert torch.equal(tr.sample_index, torch.arange(len(rollout.keys)))
    assert torch.equal(tr.step, rollout.keys.branch_step)
    # the trunk: the ODE from the same initial noise, in the same batch layout (all 4 trunks in one batch)
    prompt_index = torch.arange(2).repeat_interleave(2)
    seed_index = torch.arange(2).repeat(2)
    gens = [rollout_module.sample_generator(5, 0, 10 + int(p), int(s)) for p, s in zip(prompt_index, seed_index)]
    x = sampler.initial_state(gens).float()
    cond = index_batch(sampler.encode_prompts(PROMPTS), prompt_index)
    trunk = []
    with torch.no_grad():
        for i in range(N_STEPS - 1):
            trunk.append(x)
            x = sampler.transition(x, torch.full((4,), i), cond, stochastic=False).mode()
    for row in range(len(rollout.keys)):
        t = int(rollout.keys.prompt_index[row]) * 2 + int(rollout.keys.seed_index[row])
        kstep = int(rollout.keys.branch_step[row])
        assert torch.equal(tr.state[row], trunk[kstep][t]), f"child {row} does not start from its trunk state"
    # children of one branch point differ (their branch noise differs) ...
    first = rollout.final_state[:k]
    assert not torch.equal(first[0], first[1])


def test_same_branch_noise_gives_the_same_reward(sampler: SD3Sampler, monkeypatch: pytest.MonkeyPatch) -> None:
    """With everything else deterministic, children differ only through their branch noise."""
    real = rollout_module.sample_generator

    def ignore_child_id(*parts: int) -> torch.Generator:
        return real(*parts[:5]) if len(parts) == 6 else real(*parts)

    monkeypatch.setattr(rollout_module, "sample_generator", ignore_child_id)
    rollout = RolloutEngine(sampler, batch_size=64).run(_request(), _branch(children=3))
    from alignkit.rewards.compression import JpegCompressibility

    rewards = torch.tensor(JpegCompressibility()(rollout.samples, rollout.sample_prompts, rollout.sample_metadata))
    groups = GroupCredit(CreditConfig(group_by="seed")).groups(rollout.keys)
    for g in groups.unique():
        members = rollout.samples[groups == g]
        assert all(torch.equal(members[0], m) for m in members), "same branch noise must give the same sample"
        assert len(set(rewards[groups == g].tolist())) == 1
    # and without the patch the seed groups have spread
    monkeypatch.setattr(rollout_module, "sample_generator", real)
    rollout = RolloutEngine(sampler, batch_size=64).run(_request(), _branch(children=3))
    assert not torch.equal(rollout.samples[0], rollout.samples[1])


def _flow_grpo_std(sigma: float, sigma_next: float, a: float = 0.7) -> float:
    """The transition std of the Flow-GRPO SDE written out from the spec."""
    denom = 1 - (sigma_next if sigma == 1.0 else sigma)
    return a * math.sqrt(sigma / denom) * math.sqrt(sigma - sigma_next)


def test_noise_aware_weights_follow_the_schedule(sampler: SD3Sampler) -> None:
    rollout = RolloutEngine(sampler, batch_size=64).run(_request(), _branch(children=2, select="fixed",
                                                                              steps=[0, 2, 3]))
    sig = sampler.sigmas.tolist()
    s = {j: _flow_grpo_std(sig[j], sig[j + 1]) for j in (0, 2, 3)}
    trained = [s[int(j)] for j in rollout.transitions.step]
    mean_s = sum(trained) / len(trained)
    score = torch.randn(len(rollout.keys))
    credit = GroupCredit(CreditConfig(group_by="seed", noise_aware=True)).assign(score, rollout.keys,
                                                                                rollout.transitions)
    expected = torch.tensor([s[int(j)] / mean_s for j in rollout.transitions.step])
    torch.testing.assert_close(credit.weight, expected, rtol=1e-5, atol=1e-6)
    assert credit.weight.mean().item() == pytest.approx(1.0, abs=1e-5)
    flat = GroupCredit(CreditConfig(group_by="seed", noise_aware=False)).assign(score, rollout.keys,
                                                                               rollout.transitions)
    assert torch.equal(flat.weight, torch.ones_like(flat.weight))


@pytest.mark.parametrize("group_by", ["seed", "prompt"])
def test_branch_advantages_match_a_plain_loop(sampler: SD3Sampler, group_by: str) -> None:
    rollout = RolloutEngine(sampler, batch_size=64).run(_request(), _branch(children=3, select="random", m=2))
    keys = rollout.keys
    score = torch.randn(len(keys), generator=torch.Generator().manual_seed(3))
    credit = GroupCredit(CreditConfig(group_by=group_by)).assign(score, keys, rollout.transitions)
    for i in range(len(keys)):
        same = [j for j in range(len(keys))
                if keys.prompt_index[j] == keys.prompt_index[i] and keys.branch_step[j] == keys.branch_step[i]
                and (group_by == "prompt" or keys.seed_index[j] == keys.seed_index[i])]
        vals = [float(score[j]) for j in same]
        expected = (float(score[i]) - statistics.fmean(vals)) / (statistics.pstdev(vals) + 1e-4)
        assert float(credit.sample_advantage[i]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert len(same) == (3 if group_by == "seed" else 6)


def _closed_form_nfe(schedule: PlanSchedule, n: int) -> int:
    if schedule.branch_steps is None:
        return n
    ks = schedule.branch_steps
    return max(ks) + 1 + schedule.children * sum(n - 1 - k for k in ks)


@pytest.mark.parametrize("plan", [
    AllStochastic(), Deterministic(), Window(size=2, start="random"), Window(size=3, start="progressive"),
    Branch(children=2), Branch(children=3, select="fixed", steps=[1, 3]), Branch(children=2, select="random", m=2),
    Branch(children=2, select="window", size=2),
], ids=lambda p: type(p).__name__ + str(sorted(vars(p).items()))[:40])
def test_nfe_equals_closed_form(sampler: SD3Sampler, plan: object) -> None:
    schedule = plan.schedule(N_STEPS, 3, torch.Generator().manual_seed(1))
    rollout = RolloutEngine(sampler, batch_size=5).run(_request(), schedule)
    assert rollout.nfe == 4 * _closed_form_nfe(schedule, N_STEPS)
    # all-steps branching costs N - 1 + K N (N - 1) / 2 per noise (children share the trunk's evaluation of
    # their branch step) against N for Flow-GRPO
    if isinstance(plan, Branch) and plan.select == "all":
        assert rollout.nfe == 4 * (N_STEPS - 1 + plan.children * N_STEPS * (N_STEPS - 1) // 2)
    assert len(rollout.transitions) == len(rollout.keys) * (
        1 if schedule.branching else len(schedule.stochastic_steps))


def test_on_policy_ratio_is_one_for_branch_transitions(sampler: SD3Sampler) -> None:
    rollout = RolloutEngine(sampler, batch_size=64).run(_request(), _branch(children=2))
    tr = rollout.transitions
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
    with torch.no_grad():
        lp = sampler.transition(tr.state, tr.step, cond, stochastic=True).log_prob(tr.next_state)
    ratio = torch.exp(lp - tr.log_prob)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_window_plans() -> None:
    g = torch.Generator().manual_seed(0)
    starts = {Window(size=3, start="random").schedule(10, i, g).stochastic_steps[0] for i in range(200)}
    assert starts == set(range(0, 10 - 1 - 3 + 1))  # every start keeping the window off the last step
    prog = [Window(size=2, start="progressive", shift_every=2).schedule(6, i, g).stochastic_steps for i in range(8)]
    assert prog[:8] == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]
    assert Window(size=2, start="progressive").schedule(6, 4, g).stochastic_steps == (0, 1)  # wraps around
    assert Window(size=6, start="random").validate(6)  # window too long
    assert Branch(children=2, select="fixed", steps=[0, 5]).validate(6)  # step 5 is the last step
    rnd = Branch(children=2, select="random", m=3).schedule(10, 0, torch.Generator().manual_seed(4))
    assert len(rnd.branch_steps) == 3 and all(0 <= k < 9 for k in rnd.branch_steps)


def test_tempflow_recipe_trains(tmp_path: Path) -> None:
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    cfg = load_run_config("sd3_tiny_tempflow_grpo", [
        f"output_dir={tmp_path}", "train.epochs=1", "backbone.num_steps=4", "algo.plan.options.children=2",
        "train.prompts_per_epoch=2", "train.train_batch_size=8",
    ])
    trainer = Trainer(cfg, tensorboard=False)
    state = trainer.train()
    row = state.history[0]
    assert row["train/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert row["rollout/nfe"] == 4 * (3 + 2 * (3 + 2 + 1))  # trunk to step 2, children finish steps k+1..3
    assert math.isfinite(row["train/loss"]) and state.global_step == math.ceil(4 * 3 * 2 / 8)


@pytest.mark.parametrize("plan", ["linear", "branch"])
def test_rewards_scored_during_the_rollout_equal_scoring_at_the_end(sampler: SD3Sampler, plan: str) -> None:
    """Chunks reach the sink while the rollout goes on; the assembled table equals one call on all samples."""
    from alignkit.reward_set import OverlappedScorer, RewardSet, RewardTerm
    from alignkit.rewards.compression import JpegCompressibility

    events: list[str] = []

    class Recording(JpegCompressibility):
        def __call__(self, samples, prompts, metadata):
            events.append(f"score {len(prompts)}")
            return super().__call__(samples, prompts, metadata)

    reward_set = RewardSet([RewardTerm("jpeg", Recording(), 1.0)])
    schedule = _branch(children=2) if plan == "branch" else AllStochastic().schedule(N_STEPS, 0, torch.Generator())
    engine = RolloutEngine(sampler, batch_size=2, decode_batch_size=2)
    real_transition = sampler.transition

    def transition(*args, **kwargs):
        events.append("step")
        return real_transition(*args, **kwargs)

    req = _request()
    scorer = OverlappedScorer(reward_set, req.prompts, req.metadata)
    sampler.transition = transition  # type: ignore[method-assign]
    try:
        rollout = engine.run(req, schedule, sink=scorer.submit)
    finally:
        del sampler.transition
    table = scorer.result()
    expected = reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
    assert torch.equal(table.raw["jpeg"], expected.raw["jpeg"])
    # chunks of at most decode_batch_size were scored, and the first before the last denoising step
    sizes = [int(e.split()[1]) for e in events if e.startswith("score")][:-1]
    assert sizes and max(sizes) <= 2 and sum(sizes) == len(rollout.sample_prompts)
    first_score = next(i for i, e in enumerate(events) if e.startswith("score"))
    last_step = max(i for i, e in enumerate(events) if e == "step")
    assert first_score < last_step


def test_decoded_samples_do_not_depend_on_decode_chunking(sampler: SD3Sampler) -> None:
    req, schedule = _request(), _branch(children=2)
    a = RolloutEngine(sampler, batch_size=64).run(req, schedule)
    b = RolloutEngine(sampler, batch_size=64, decode_batch_size=5).run(req, schedule)
    assert torch.allclose(a.samples, b.samples, atol=1e-5)
