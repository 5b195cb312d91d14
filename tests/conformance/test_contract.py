"""The sampler contract every backbone's tiny builder runs (in the style of diffusers' pipeline tester mixin).

Each test is parametrised over :data:`cases.CASES` (SD3, FLUX, Wan, Stable Audio 3, the masked LM); to put a new
backbone under the whole contract, add one ``BackboneCase`` there (its docstring says what to give). Items that
do not apply to a backbone are skipped with the reason its case gives.

    ODE / greedy rollout      equals the stock pipeline's own sampling from the same initial noise
    prompts                   encoded once per rollout (not per step or child), rows independent of the batch
    branching                 closed-form NFE, stored log-probs recomputed, batch-layout and global-RNG independent
    step kinds                every exploring step stores a transition whose log-prob recomputes
    reference                 the KL reference is the base model (adapter off / frozen copy), ignoring updates
    export                    LoRA and fully fine-tuned weights load into the stock pipeline (its documented way)
                              and sample exactly as alignkit does; old checkpoints still resume, other LoRA
                              settings are refused
    gradient checkpointing    leaves the gradients unchanged
    check_config              refuses bad settings before loading, naming field, value and fix
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cases import CASES, BackboneCase

from alignkit.config import ConfigError, LoraConfig
from alignkit.plans import AllStochastic, Branch, Deterministic
from alignkit.registry import SAMPLERS
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import index_batch

N_STEPS = 4  # every case samples 4 steps
TOL = 1e-5
EXPORT_TOL = 1e-4
"""Exports are compared under a deliberately large adapter, which amplifies float32 rounding differences between
two equal computations done in other batch shapes (e.g. a negative prompt encoded once vs once per prompt)."""
EFFECT = 1000 * EXPORT_TOL  # the adapter / the fine-tune must change the output by far more than the tolerance

GUIDED = [pytest.param(c, g, id=f"{c.name}-{i}") for c in CASES for i, g in enumerate(c.guidance)]
KINDS = [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in c.step_kinds]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> BackboneCase:
    return request.param


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``pretrained(case)``: the case's tiny pretrained folder, built once per module."""
    folders: dict[str, Path] = {}

    def get(case: BackboneCase) -> Path:
        if case.name not in folders:
            folders[case.name] = tmp_path_factory.mktemp(case.name)
            case.build(folders[case.name])
        return folders[case.name]

    return get


def _skip(case: BackboneCase, item: str) -> None:
    """Skip contract item ``item`` where the case says it does not apply, giving its reason."""
    if item in case.skip:
        pytest.skip(f"{case.name}: {case.skip[item]}")


@pytest.fixture(scope="module")
def shared(pretrained: Any) -> Any:
    """``shared(case, step_kind=None, **overrides)``: a sampler built once per module for its settings, for the
    checks that only sample with it (they leave it as they found it)."""
    samplers: dict[str, Any] = {}

    def get(case: BackboneCase, step_kind: str | None = None, **overrides: Any) -> Any:
        key = f"{step_kind} {case.config(pretrained(case), **overrides)!r}"
        if key not in samplers:
            samplers[key] = case.make(pretrained(case), step_kind=step_kind, **overrides)
        return samplers[key]

    return get


@pytest.fixture(scope="module")
def stock_pipelines(pretrained: Any) -> Any:
    """``stock_pipelines(case)``: the case's stock pipeline, loaded once per module (without adapters)."""
    pipes: dict[str, Any] = {}

    def get(case: BackboneCase) -> Any:
        if case.name not in pipes:
            pipes[case.name] = case.stock.load(pretrained(case))
        return pipes[case.name]

    return get


def _request(case: BackboneCase, num_seeds: int = 1, seed: int = 7) -> RolloutRequest:
    return RolloutRequest(prompts=list(case.prompts), prompt_ids=[0, 1], metadata=[{}, {}], num_seeds=num_seeds,
                          seed=seed, iteration=0)


def _ode(sampler: Any, case: BackboneCase) -> Any:
    return RolloutEngine(sampler, batch_size=2).run(_request(case), Deterministic().schedule(N_STEPS, 0,
                                                                                              torch.Generator()))


def _initial(sampler: Any) -> torch.Tensor:
    """The initial states of :func:`_request`'s two rows (run seed 7, iteration 0, prompt ids 0 and 1)."""
    return sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(2)])


def _assert_same(ours: Any, theirs: Any, tol: float = TOL) -> None:
    """Float tensors equal to float tolerance; token ids and texts exactly."""
    if isinstance(ours, torch.Tensor) and ours.is_floating_point():
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    elif isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs)
    else:
        assert ours == theirs


def _effect(a: torch.Tensor, b: torch.Tensor) -> float:
    """How much two outputs differ: the largest absolute difference, or the share of differing tokens."""
    return float((a - b).abs().max()) if a.is_floating_point() else float((a != b).float().mean())


def _trainable(sampler: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad}


def _assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a)


def _perturb(module: torch.nn.Module, *, lora: bool, seed: int = 0) -> None:
    """Move the trainable weights far from where they start, the same way whatever ran before: LoRA A drawn as peft's
    gaussian init draws it (std 1 / rank, but from a seeded generator), LoRA B (zero at the start: no effect) std 0.3;
    under full fine-tuning every weight gets noise of std 0.05."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if not lora:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[0])
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --- sampling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "guidance"), GUIDED)
def test_ode_rollout_equals_the_stock_pipeline(case: BackboneCase, guidance: dict[str, Any], shared: Any,
                                               stock_pipelines: Any) -> None:
    sampler = shared(case, **guidance)
    rollout = _ode(sampler, case)
    assert rollout.nfe == 2 * N_STEPS and len(rollout.transitions) == 0
    final, samples = case.stock.sample(stock_pipelines(case), list(case.prompts), _initial(sampler), sampler.cfg)
    _assert_same(rollout.final_state, final)
    _assert_same(rollout.samples, samples)


def test_a_prompts_conditioning_does_not_depend_on_the_other_prompts(case: BackboneCase, shared: Any) -> None:
    sampler = shared(case)
    prompts = list(case.prompts)
    first = sampler.encode_prompts(prompts)
    flipped = sampler.encode_prompts(prompts[::-1])
    assert first.keys() == flipped.keys()
    for key, value in first.items():
        _assert_same(flipped[key], value.flip(0))


def test_prompts_are_encoded_once_per_rollout(case: BackboneCase, shared: Any) -> None:
    _skip(case, "encoder")
    sampler = shared(case)
    prompts = list(case.prompts)
    sampler.encode_prompts(prompts)  # a negative prompt may be encoded once per sampler: done now
    pipe = sampler.pipe
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, n, None) is not None]
    assert encoders
    rows: list[list[int]] = [[] for _ in encoders]
    hooks = [encoder.register_forward_hook(
        lambda _m, args, kwargs, _o, seen=seen: seen.append(int((args[0] if args else kwargs["input_ids"]).shape[0])),
        with_kwargs=True) for seen, encoder in zip(rows, encoders)]
    try:
        ode = Deterministic().schedule(N_STEPS, 0, torch.Generator())
        RolloutEngine(sampler, batch_size=1).run(_request(case), ode)  # 2 batches of 4 steps
        during = [sum(r) for r in rows]
        for r in rows:
            r.clear()
        sampler.encode_prompts(prompts)
    finally:
        for hook in hooks:
            hook.remove()
    assert during == [sum(r) for r in rows] == [case.encoder_rows] * len(encoders)


def test_branching_rollout_nfe_log_probs_and_seeding(case: BackboneCase, shared: Any) -> None:
    sampler = shared(case)
    schedule = Branch(children=2).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))
    rollout = RolloutEngine(sampler, batch_size=12).run(_request(case), schedule)
    trunks, branch_steps, k = 2, [0, 1, 2], 2
    n = trunks * len(branch_steps) * k
    state_shape = tuple(_initial(sampler).shape[1:])
    assert len(rollout.keys) == n and len(rollout.samples) == n and rollout.final_state.shape == (n, *state_shape)
    # the trunk runs to its last branch step, each child finishes the steps after its own
    assert rollout.nfe == trunks * (max(branch_steps) + 1 + k * sum(N_STEPS - 1 - s for s in branch_steps)) == 30
    tr = rollout.transitions
    assert tr.state.shape == tr.next_state.shape == (n, *state_shape)
    assert torch.equal(tr.step, rollout.keys.branch_step) and (tr.scale > 0).all()
    assert torch.isfinite(tr.log_prob).all()
    rows = torch.arange(0, n, 5)
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index[rows]])
    with torch.no_grad():
        again = sampler.transition(tr.state[rows], tr.step[rows], cond, stochastic=True)
    torch.testing.assert_close(again.log_prob(tr.next_state[rows]), tr.log_prob[rows], rtol=0, atol=TOL)
    # each row owns its generators: another batch layout gives the same rollout, and the global RNG is not used
    rng = torch.get_rng_state()
    other = RolloutEngine(sampler, batch_size=5).run(_request(case), schedule)
    assert torch.equal(rng, torch.get_rng_state())
    _assert_same(other.final_state, rollout.final_state)
    _assert_same(other.transitions.next_state, tr.next_state)
    torch.testing.assert_close(other.transitions.log_prob, tr.log_prob, rtol=0, atol=TOL)


@pytest.mark.parametrize(("case", "step_kind"), KINDS)
def test_every_exploring_step_stores_a_recomputable_transition(case: BackboneCase, step_kind: str,
                                                                shared: Any) -> None:
    sampler = shared(case, step_kind=step_kind)
    rollout = RolloutEngine(sampler, batch_size=2).run(_request(case), AllStochastic().schedule(N_STEPS, 0,
                                                                                                 torch.Generator()))
    tr = rollout.transitions
    assert len(tr) == 2 * (N_STEPS - 1) and sorted(set(tr.step.tolist())) == list(range(N_STEPS - 1))
    assert torch.isfinite(tr.log_prob).all() and (tr.scale > 0).all()
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
    with torch.no_grad():
        again = sampler.transition(tr.state, tr.step, cond, stochastic=True)
    torch.testing.assert_close(again.log_prob(tr.next_state), tr.log_prob, rtol=0, atol=TOL)


def test_reference_is_the_base_model(case: BackboneCase, pretrained: Any) -> None:
    """LoRA: the reference (adapter disabled) ignores every update of the adapter (full fine-tuning: its frozen copy,
    checked in the full export test)."""
    sampler = case.make(pretrained(case))
    cond = sampler.encode_prompts(list(case.prompts))
    x, step = _initial(sampler), torch.tensor([0, N_STEPS - 2])
    with torch.no_grad():
        before = sampler.transition(x, step, cond, stochastic=True)
        _perturb(sampler.trainable_module(), lora=True)
        after = sampler.transition(x, step, cond, stochastic=True)
        with sampler.reference():
            ref = sampler.transition(x, step, cond, stochastic=True)
        back = sampler.transition(x, step, cond, stochastic=True)
    assert (after.kl(ref) > 1e-6).all()
    torch.testing.assert_close(before.kl(ref), torch.zeros(2), rtol=0, atol=1e-7)
    torch.testing.assert_close(back.kl(after), torch.zeros(2), rtol=0, atol=1e-7)  # the policy is back after it


# --- export -----------------------------------------------------------------------------------------------------


def test_lora_export_samples_in_the_stock_pipeline_as_in_alignkit(case: BackboneCase, pretrained: Any,
                                                                  tmp_path: Path) -> None:
    """The exported adapter, loaded the stock way, gives alignkit's own ODE output from the same noise, at the
    trained alpha (diffusers assumed alpha = rank before the adapter settings were saved with the weights)."""
    folder, export = pretrained(case), tmp_path / "export"
    sampler = case.make(folder)
    lora = sampler.cfg.lora
    assert lora.alpha != lora.rank  # else a lost alpha would go unnoticed
    _perturb(sampler.trainable_module(), lora=True)
    ours = _ode(sampler, case).final_state
    with sampler.reference():
        effect = _effect(ours, _ode(sampler, case).final_state)
    assert effect > (EFFECT if ours.is_floating_point() else 0)
    sampler.save_trainable(export)
    stock = case.stock.load(folder)
    case.stock.load_lora(stock, export)
    _assert_same(ours, case.stock.sample(stock, list(case.prompts), _initial(sampler), sampler.cfg)[0], EXPORT_TOL)

    # alignkit resumes from it, refuses it under other LoRA settings, and still reads the layout it wrote before
    trained = _trainable(sampler)
    fresh = case.make(folder)
    fresh.load_trainable(export)
    _assert_equal_tensors(_trainable(fresh), trained)
    other = case.make(folder, lora=LoraConfig(**{**vars(lora), "alpha": 2 * lora.alpha}))
    with pytest.raises(ValueError, match=rf"alpha={lora.alpha:g}.*set backbone\.lora\.alpha={lora.alpha:g} "):
        other.load_trainable(export)
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        other.load_trainable(tmp_path / "absent")
    if case.legacy is not None:
        case.legacy(export)
        old = case.make(folder)
        old.load_trainable(export)
        _assert_equal_tensors(_trainable(old), trained)


def test_full_export_samples_in_the_stock_pipeline_as_in_alignkit(case: BackboneCase, pretrained: Any,
                                                                  tmp_path: Path) -> None:
    folder = pretrained(case)
    full = LoraConfig(enabled=False)
    sampler = case.make(folder, lora=full)
    base = _ode(sampler, case).final_state
    _perturb(sampler.trainable_module(), lora=False)
    ours = _ode(sampler, case).final_state
    assert _effect(ours, base) > (EFFECT if ours.is_floating_point() else 0)
    with sampler.reference():  # the frozen copy made at construction: the update does not reach it
        _assert_same(_ode(sampler, case).final_state, base)
    sampler.save_trainable(tmp_path / "export")
    stock = case.stock.load_full(folder, tmp_path / "export")
    _assert_same(ours, case.stock.sample(stock, list(case.prompts), _initial(sampler), sampler.cfg)[0], EXPORT_TOL)
    fresh = case.make(folder, lora=full)
    fresh.load_trainable(tmp_path / "export")
    _assert_equal_tensors(_trainable(fresh), _trainable(sampler))


# --- training ---------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(case: BackboneCase, pretrained: Any) -> None:
    grads = []
    for checkpointing in (False, True):
        sampler = case.make(pretrained(case), gradient_checkpointing=checkpointing)
        _perturb(sampler.trainable_module(), lora=True)
        cond = sampler.encode_prompts(list(case.prompts))
        gens = [sample_generator(1, i) for i in range(2)]
        x, step = _initial(sampler), torch.tensor([1, 2])
        with torch.no_grad():
            nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
        sampler.train(True)
        sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
        sampler.train(False)
        grads.append({n: p.grad.clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0] and all("lora_" in n for n in grads[0])
    assert all(float(g.abs().max()) > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


# --- configuration ----------------------------------------------------------------------------------------------


def test_check_config_refuses_bad_settings_before_loading(case: BackboneCase, pretrained: Any,
                                                          tmp_path: Path) -> None:
    overrides, fragments = case.bad
    cfg = case.config(tmp_path / "absent", **overrides)
    problems = case.sampler.check_config(cfg)
    assert len(problems) == len(fragments), problems
    for problem, fragment in zip(problems, fragments):
        assert fragment in problem
    with pytest.raises(ConfigError):  # not FileNotFoundError: nothing was loaded
        case.sampler.from_config(cfg, step_kind=case.step_kinds[0], noise_level=case.noise_level, device="cpu")
    assert not case.sampler.check_config(case.config(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"backbone\.pretrained="):
        case.make(tmp_path / "absent")
    targets = LoraConfig(**{**vars(case.backbone["lora"]), "target_modules": case.bad_lora_targets})
    with pytest.raises(ValueError, match="target_modules"):
        case.make(pretrained(case), lora=targets)


def test_is_a_registered_sampler(case: BackboneCase) -> None:
    assert SAMPLERS.get(case.name) is case.sampler
