"""Masked discrete diffusion: reveal schedule, step log-probs and KL, scales, rollouts, loading, the toy task.

The sampler contract of the masked LM (greedy decode against a plain one, branching NFE and seeding, reference,
export, configuration errors) is in tests/conformance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from alignkit.config import BackboneConfig, ConfigError, CreditConfig, LoraConfig
from alignkit.credit import GroupCredit
from alignkit.modalities.discrete.masked import MASKED_CONFIDENCE, entropy, reveal_schedule
from alignkit.modalities.discrete.mlm import MaskedLMSampler
from alignkit.modalities.discrete.tiny import build_char_tokenizer, build_tiny_masked_lm, save_masked_lm
from alignkit.plans import Branch
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import index_batch
from alignkit.worlds.arithmetic.world import PROMPT_LENGTH, all_problems, arithmetic_source, shipped_weights

G, N_STEPS = 4, 4  # 3 reveal steps (1, 1, 2 positions) and the final identity step
PROMPTS = ["12+34=", "9-3="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_char_tokenizer()
    model = build_tiny_masked_lm(tok, hidden=32, layers=1, heads=2, seed=3)
    with torch.no_grad():  # sharper than the random init, so the categorical tests see uneven distributions
        model.cls.predictions.decoder.weight.mul_(8.0)
    return save_masked_lm(model, tok, tmp_path_factory.mktemp("mlm"))


def _cfg(folder: Path, **options: object) -> BackboneConfig:
    return BackboneConfig(name="masked_lm", pretrained=str(folder), num_steps=N_STEPS,
                          max_sequence_length=PROMPT_LENGTH, options={"gen_length": G, **options},
                          lora=LoraConfig(rank=4, alpha=8, target_modules=["query", "value"]))


def _sampler(folder: Path, temperature: float = 1.0, **options: object) -> MaskedLMSampler:
    return MaskedLMSampler.from_config(_cfg(folder, **options), step_kind="masked_confidence", noise_level=temperature,
                                       device="cpu")


@pytest.fixture(scope="module")
def sampler(model_dir: Path) -> MaskedLMSampler:
    return _sampler(model_dir, temperature=0.8)


def _reference_logits(sampler: MaskedLMSampler, state: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits at the generated positions, computed directly (not through the sampler's step)."""
    ids = torch.cat([cond["prompt_ids"], state], 1)
    mask = torch.cat([cond["prompt_mask"], torch.ones_like(state)], 1)
    logits = sampler.model(input_ids=ids, attention_mask=mask).logits[:, -G:].float()
    logits[..., sampler.forbidden] = -1e9
    return logits


def _partial_state(sampler: MaskedLMSampler) -> torch.Tensor:
    m = sampler.mask_id
    return torch.tensor([[m, 7, m, m], [m, m, m, m]])  # one token already revealed in row 0


# --- schedule and step kind -------------------------------------------------------------------------------


def test_reveal_schedule() -> None:
    assert reveal_schedule(8, 4).tolist() == [1, 2, 2, 3]  # masked after each step: 7, 5, 3, 0 (MaskGIT cosine)
    assert reveal_schedule(8, 4, "linear").tolist() == [2, 2, 2, 2]
    for g, n in [(4, 4), (5, 4), (16, 7), (3, 1)]:
        counts = reveal_schedule(g, n)
        assert int(counts.sum()) == g and bool((counts >= 1).all())
    with pytest.raises(ValueError, match=r"backbone.num_steps=5.*gen_length"):
        reveal_schedule(4, 5)


def test_flow_step_kinds_are_refused(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"algo\.step_kind='flow_grpo'.*masked_confidence"):
        MaskedLMSampler.from_config(_cfg(model_dir), step_kind="flow_grpo", noise_level=1.0, device="cpu")
    with pytest.raises(TypeError, match="masked-diffusion reveal rule"):
        MASKED_CONFIDENCE(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.7)


# --- the step distribution -----------------------------------------------------------------------------------


@torch.no_grad()
def test_log_prob_matches_categorical(sampler: MaskedLMSampler) -> None:
    cond = sampler.encode_prompts(PROMPTS)
    state = _partial_state(sampler)
    step = torch.tensor([1, 0])
    dist = sampler.transition(state, step, cond, stochastic=True)
    nxt = dist.sample([torch.Generator().manual_seed(s) for s in (1, 2)])
    cat = torch.distributions.Categorical(logits=_reference_logits(sampler, state, cond) / sampler.temperature)
    revealed = (state == sampler.mask_id) & (nxt != sampler.mask_id)
    expected = torch.where(revealed, cat.log_prob(nxt), torch.zeros(())).sum(1)
    torch.testing.assert_close(dist.log_prob(nxt), expected, rtol=1e-5, atol=1e-5)
    # row 1 is at step 0 (reveals 1), row 0 at step 1 (reveals 1 of its 3 masked positions); kept tokens stay
    assert revealed.sum(1).tolist() == sampler.reveal_counts[step].tolist()
    assert int(nxt[0, 1]) == 7
    # the mode is the argmax at the same positions
    mode = dist.mode()
    assert torch.equal(mode != sampler.mask_id, nxt != sampler.mask_id)
    assert torch.equal(mode[revealed], cat.logits.argmax(-1)[revealed])


@torch.no_grad()
def test_positions_are_not_part_of_the_action(sampler: MaskedLMSampler) -> None:
    """Positions are the top-confidence masked ones (untempered, before any draw), whatever the draw."""
    cond = sampler.encode_prompts(PROMPTS)
    state = sampler.initial_state([torch.Generator()] * 2)
    dist = sampler.transition(state, torch.tensor([1, 1]), cond, stochastic=True)  # reveals 1 position per row
    conf = torch.log_softmax(_reference_logits(sampler, state, cond), -1).amax(-1)  # [B, G]
    top = torch.zeros_like(dist.reveal)
    top[torch.arange(2), conf.argmax(1)] = True
    assert torch.equal(dist.reveal, top)
    draws = [dist.sample([torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 99)])
             for s in range(20)]
    assert all(torch.equal(d != sampler.mask_id, top) for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1  # the values do vary


@torch.no_grad()
def test_step_is_a_normalised_distribution_and_sampling_follows_it(model_dir: Path) -> None:
    sampler = _sampler(model_dir, temperature=1.5, schedule="linear")  # reveal counts [2, 1, 1, 0]
    cond = index_batch(sampler.encode_prompts(PROMPTS), torch.tensor([0]))
    state = sampler.initial_state([torch.Generator()])
    dist = sampler.transition(state, torch.tensor([0]), cond, stochastic=True)
    pos = torch.nonzero(dist.reveal[0]).flatten().tolist()
    assert len(pos) == 2
    vocab = dist.log_probs.shape[-1]
    candidates, grid = [], []
    values_ = [v for v in range(vocab) if v != sampler.mask_id]  # forbidden values stay in: probability 0
    for values in itertools.product(values_, repeat=2):
        nxt = state.clone()
        nxt[0, pos] = torch.tensor(values)
        candidates.append(nxt)
        grid.append(values[0] * vocab + values[1])
    batch = torch.cat(candidates)
    lp = dist.index(torch.zeros(len(batch), dtype=torch.long)).log_prob(batch)
    assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-5)  # sums to 1 over all next states
    # empirical frequencies of the drawn next states match exp(log_prob)
    n = 3000
    draws = dist.index(torch.zeros(n, dtype=torch.long)).sample([sample_generator(7, i) for i in range(n)])
    keys = (draws[:, pos[0]] * vocab + draws[:, pos[1]]).tolist()
    freq = torch.bincount(torch.tensor(keys), minlength=vocab * vocab).double() / n
    prob = torch.zeros(vocab * vocab, dtype=torch.float64).index_put_((torch.tensor(grid),), lp.exp().double())
    assert float((freq - prob).abs().max()) < 4 * float((prob * (1 - prob) / n).sqrt().max()) + 1e-3
    assert float((freq * prob).sum()) > 0  # not vacuous
    assert float(prob[freq == 0].sum()) < 0.05  # mass the sampler never draws is small


@torch.no_grad()
def test_log_prob_rejects_rewritten_tokens(sampler: MaskedLMSampler) -> None:
    cond = sampler.encode_prompts(PROMPTS)
    state = _partial_state(sampler)
    dist = sampler.transition(state, torch.tensor([1, 0]), cond, stochastic=True)
    bad = dist.mode()
    bad[0, 1] = 8
    with pytest.raises(ValueError, match="already revealed"):
        dist.log_prob(bad)
    with pytest.raises(ValueError, match="row 0 reveals 0 positions, the step reveals 1"):
        dist.log_prob(state)


@torch.no_grad()
def test_kl_against_reference(model_dir: Path, sampler: MaskedLMSampler) -> None:
    cond = sampler.encode_prompts(PROMPTS)
    state = _partial_state(sampler)
    step = torch.tensor([1, 0])
    dist = sampler.transition(state, step, cond, stochastic=True)
    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-6)
    tok = build_char_tokenizer()
    other = _sampler(save_masked_lm(build_tiny_masked_lm(tok, hidden=32, layers=1, heads=2, seed=11), tok,
                                    model_dir.parent / "other"), temperature=0.8)
    ref = other.transition(state, step, cond, stochastic=True)
    p = torch.distributions.Categorical(logits=_reference_logits(sampler, state, cond) / 0.8)
    q = torch.distributions.Categorical(logits=_reference_logits(other, state, cond) / 0.8)
    masked = (state == sampler.mask_id).float()
    expected = (torch.distributions.kl_divergence(p, q) * masked).sum(1) / masked.sum(1)
    torch.testing.assert_close(dist.kl(ref), expected, rtol=1e-4, atol=1e-5)
    assert bool((expected > 0).all())


@torch.no_grad()
def test_scale_settings(model_dir: Path) -> None:
    state = None
    scales = {}
    for kind in ("masked_fraction", "entropy", "uniform"):
        s = _sampler(model_dir, temperature=0.8, scale=kind)
        cond = s.encode_prompts(PROMPTS)
        state = _partial_state(s)
        dist = s.transition(state, torch.tensor([1, 0]), cond, stochastic=True)
        scales[kind] = dist.scale
        assert torch.equal(s.transition(state, torch.tensor([1, 0]), cond, stochastic=False).scale, torch.zeros(2))
        if kind == "entropy":
            cat = torch.distributions.Categorical(logits=_reference_logits(s, state, cond) / 0.8)
            expected = (cat.entropy() * dist.reveal).sum(1)
            torch.testing.assert_close(dist.scale, expected.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(entropy(dist.log_probs).float(), cat.entropy(), rtol=1e-4, atol=1e-5)
    assert scales["masked_fraction"].tolist() == [0.75, 1.0]
    assert scales["uniform"].tolist() == [1.0, 1.0]


# --- rollouts ----------------------------------------------------------------------------------------------


def _request(seed: int = 5) -> RolloutRequest:
    return RolloutRequest(prompts=PROMPTS, prompt_ids=[3, 4], metadata=[{}, {}], num_seeds=2, seed=seed, iteration=0)


def _greedy_trunk(sampler: MaskedLMSampler) -> list[torch.Tensor]:
    """States before each step of the greedy decode of every (prompt, seed) row, computed step by step."""
    cond = index_batch(sampler.encode_prompts(PROMPTS), torch.arange(2).repeat_interleave(2))
    x = sampler.initial_state([torch.Generator()] * 4)
    states = []
    with torch.no_grad():
        for i in range(N_STEPS):
            states.append(x)
            x = sampler.transition(x, torch.full((4,), i), cond, stochastic=False).mode()
    return [*states, x]


def test_children_differ_from_the_trunk_only_from_their_branch_step(sampler: MaskedLMSampler) -> None:
    k = 3
    schedule = Branch(children=k).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))
    rollout = RolloutEngine(sampler, batch_size=5).run(_request(), schedule)
    trunk = _greedy_trunk(sampler)
    tr, keys = rollout.transitions, rollout.keys
    assert len(keys) == 4 * (N_STEPS - 1) * k and torch.equal(tr.step, keys.branch_step)
    mask = sampler.mask_id
    with torch.no_grad():
        for c in range(len(keys)):
            t = int(keys.prompt_index[c]) * 2 + int(keys.seed_index[c])
            step = int(keys.branch_step[c])
            assert torch.equal(tr.state[c], trunk[step][t])  # identical to the trunk up to the branch step
            # the branch step reveals the trunk's positions (only the values are the action) ...
            assert torch.equal(tr.next_state[c] != mask, trunk[step + 1][t] != mask)
            # ... and the child keeps every token it drew
            drawn = tr.next_state[c] != mask
            assert torch.equal(rollout.final_state[c][drawn], tr.next_state[c][drawn])
    assert bool((tr.log_prob <= 0).all()) and bool(torch.isfinite(tr.log_prob).all())
    # some children leave the trunk (temperature 0.8 over a random model)
    trunk_of = keys.prompt_index * 2 + keys.seed_index
    assert any(not torch.equal(rollout.final_state[c], trunk[-1][int(trunk_of[c])]) for c in range(len(keys)))


def test_noise_aware_weights_follow_the_scale(model_dir: Path) -> None:
    s = _sampler(model_dir, temperature=0.8, scale="masked_fraction")
    schedule = Branch(children=2).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))
    rollout = RolloutEngine(s, batch_size=16).run(_request(), schedule)
    score = torch.rand(len(rollout.keys), generator=torch.Generator().manual_seed(0))
    credit = GroupCredit(CreditConfig(group_by="seed", noise_aware=True)).assign(score, rollout.keys,
                                                                                 rollout.transitions)
    frac = 1.0 - torch.cumsum(s.reveal_counts, 0)[rollout.transitions.step - 1].float() / G
    frac[rollout.transitions.step == 0] = 1.0
    torch.testing.assert_close(credit.weight, frac / frac.mean())
    assert float(credit.weight.mean()) == pytest.approx(1.0)


# --- loading -------------------------------------------------------------------------------------------------


def test_from_pretrained_of_a_saved_tiny_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    real = AutoModelForMaskedLM.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(cls: type, *args: object, **kwargs: object) -> object:
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForMaskedLM, "from_pretrained", classmethod(spy))
    s = _sampler(model_dir)
    assert seen and "trust_remote_code" not in seen[0]
    direct = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert all(torch.equal(p, dict(s.model.named_parameters()).get(n, p)) for n, p in direct.named_parameters())
    cfg = _cfg(model_dir)
    cfg.trust_remote_code = True
    MaskedLMSampler.from_config(cfg, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    assert seen[-1].get("trust_remote_code") is True
    with pytest.raises(FileNotFoundError, match=r"backbone\.pretrained='/no/such/folder'"):
        MaskedLMSampler.from_config(BackboneConfig(name="masked_lm", pretrained="/no/such/folder", num_steps=2),
                                    step_kind="masked_confidence", noise_level=1.0, device="cpu")


def test_prompts_are_an_unmasked_prefix_and_decode_stops_at_the_end_token(sampler: MaskedLMSampler) -> None:
    cond = sampler.encode_prompts(["1+2=", "12+34="])
    tok = sampler.tokenizer
    assert cond["prompt_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6]
    assert tok.decode(cond["prompt_ids"][0, 2:].tolist()) == "1+2="
    with pytest.raises(ValueError, match=r"backbone\.max_sequence_length=6"):
        sampler.encode_prompts(["123+456="])
    ids = [tok.convert_tokens_to_ids(c) for c in "85"]
    assert sampler.decode(torch.tensor([[*ids, sampler.end_id, ids[0]]])) == ["85"]


# --- the toy task and the shipped model -----------------------------------------------------------------------


def test_arithmetic_splits_are_disjoint() -> None:
    train = {p.caption() for p in all_problems("train")}
    held = {p.caption() for p in all_problems("heldout")}
    assert not train & held and 0.15 < len(held) / (len(train) + len(held)) < 0.25
    from alignkit.config import PromptsConfig

    tr, ev = arithmetic_source(PromptsConfig(source="arithmetic", options={"train_size": 50, "eval_size": 20}))
    assert len(tr) == 50 and len(ev) == 20 and not set(tr.prompts) & held and set(ev.prompts) <= held
    assert all(str(eval(p[:-1])) == m["answer"] for p, m in zip(ev.prompts, ev.metadata))


def test_shipped_model_reproduces_its_reported_heldout_accuracy() -> None:
    from alignkit.worlds.arithmetic.pretrain import heldout_accuracy

    folder = shipped_weights()
    info = json.loads((folder / "pretrain_info.json").read_text())
    assert sum(f.stat().st_size for f in folder.iterdir()) < 3_000_000
    accuracy = heldout_accuracy(folder)
    assert accuracy == pytest.approx(info["heldout_greedy_exact_match"], abs=2 / info["heldout_problems"])
    assert 0.2 < accuracy < 0.95  # decent but imperfect: room for RL


# --- image tokens: the shapes-world palette backbone ----------------------------------------------------------


def test_palette_backbone_samples_shapes_images_scored_by_shapeeval(tmp_path: Path) -> None:
    from alignkit.worlds.shapes.palette import PALETTE_RGB, MaskedPaletteSampler, build_tiny_palette_model
    from alignkit.worlds.shapes.shapeeval import ShapeEval
    from alignkit.worlds.shapes.world import prompt_set

    model, tok = build_tiny_palette_model(grid=8, caption_length=8)
    folder = save_masked_lm(model, tok, tmp_path / "palette")
    cfg = BackboneConfig(name="masked_palette", pretrained=str(folder), num_steps=4, height=32, width=32,
                         max_sequence_length=8, options={"grid": 8, "scale": "entropy"},
                         lora=LoraConfig(rank=4, alpha=8, target_modules=["query", "value"]))
    sampler = MaskedPaletteSampler.from_config(cfg, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    assert sampler.gen_length == 64 and sampler.reveal_counts.tolist() == [9, 23, 32, 0]
    specs = prompt_set(2, 0, "train")
    request = RolloutRequest(prompts=[s.caption() for s in specs], prompt_ids=[0, 1],
                             metadata=[s.to_metadata() for s in specs], num_seeds=2, seed=0, iteration=0)
    rollout = RolloutEngine(sampler, batch_size=32).run(request, Branch(children=2, select="fixed", steps=[1])
                                                        .schedule(4, 0, torch.Generator()))
    images = rollout.samples
    assert images.shape == (8, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    palette = torch.tensor(list(PALETTE_RGB.values()), dtype=torch.float32) / 255  # [5, 3]
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert bool(((pixels - palette).abs().amax(-1) < 1e-6).any(-1).all())  # only palette colours are revealed
    assert set(rollout.final_state.unique().tolist()) <= set(sampler.palette_ids)
    scores = ShapeEval()(images, rollout.sample_prompts, rollout.sample_metadata)
    assert len(scores) == 8 and all(isinstance(s, float) and 0 <= s <= 1 for s in scores)
    with pytest.raises(ConfigError, match=r"backbone\.options\.grid=0"):
        MaskedPaletteSampler.from_config(BackboneConfig(name="masked_palette", pretrained=str(folder), num_steps=4,
                                                        options={"grid": 0}), step_kind="masked_confidence",
                                         noise_level=1.0, device="cpu")


def test_grpo_updates_raise_the_probability_of_the_rewarded_token(model_dir: Path) -> None:
    """One prompt, one group of children at the last reveal step, rewarded when they draw a chosen token:
    the rollout log-prob is reproduced (ratio 1) and a few clipped GRPO steps raise that token's probability."""
    from alignkit.config import ObjectiveConfig
    from alignkit.credit import group_normalize
    from alignkit.objective import grpo_objective

    sampler = _sampler(model_dir, temperature=1.0)
    cond1 = sampler.encode_prompts(PROMPTS[:1])
    state = sampler.initial_state([torch.Generator()])
    step = N_STEPS - 2  # the last step that reveals tokens
    with torch.no_grad():
        for i in range(step):
            state = sampler.transition(state, torch.tensor([i]), cond1, stochastic=False).mode()
    k = 32
    states, steps = state.expand(k, -1).clone(), torch.full((k,), step)
    cond = index_batch(cond1, torch.zeros(k, dtype=torch.long))

    def probs() -> torch.Tensor:
        with torch.no_grad():
            d = sampler.transition(states[:1], steps[:1], index_batch(cond1, torch.zeros(1, dtype=torch.long)),
                                   stochastic=True)
        return d.log_probs[0].exp()[d.reveal[0]]  # [r, V] at the revealed positions

    p0 = probs()
    target = int(p0[0].argsort(descending=True)[1])  # the runner-up token of the first revealed position
    opt = torch.optim.Adam(sampler.trainable_parameters(), lr=3e-2)
    cfg = ObjectiveConfig(clip_range=0.2, adv_clip=5.0, beta=0.0)
    for it in range(8):
        with torch.no_grad():
            d = sampler.transition(states, steps, cond, stochastic=True)
            nxt = d.sample([torch.Generator().manual_seed(100 * it + j) for j in range(k)])
            old = d.log_prob(nxt)
        pos = torch.nonzero(d.reveal[0]).flatten()[0]
        reward = (nxt[:, pos] == target).float()
        adv, _ = group_normalize(reward, torch.zeros(k, dtype=torch.long))
        out = grpo_objective(sampler.transition(states, steps, cond, stochastic=True).log_prob(nxt), old, adv,
                             torch.ones(k), None, cfg)
        if it == 0:
            assert float(out.ratio_mean) == pytest.approx(1.0, abs=1e-5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(probs()[0, target]) > float(p0[0, target]) + 0.2  # 0.12 -> 0.49 when written
