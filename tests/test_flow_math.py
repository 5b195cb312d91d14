"""Flow step math against the spec formulas of design.md section 3, written out independently here."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.flow import GaussianStep, cps_step, dance_grpo_step, flow_grpo_step, ode_step, randn

# (x, v, sigma, sigma_next, noise_level) scalar cases; includes sigma = 1 (first step) and sigma_next = 0.
SCALAR_CASES = [
    (0.3, -1.2, 0.8, 0.6, 0.7),
    (1.5, 0.4, 0.5, 0.25, 0.7),
    (-0.7, 2.0, 1.0, 0.9, 0.7),
    (2.2, -0.3, 1.0, 0.75, 0.3),
    (0.1, 0.1, 0.2, 0.0, 1.0),
    (-1.0, 0.8, 0.05, 0.01, 0.5),
]


def _batched(cases: list[tuple[float, ...]], shape: tuple[int, ...] = (2, 3)) -> tuple[torch.Tensor, ...]:
    """Batch of the scalar cases: row b has x and v filled with varied values around the case's x and v."""
    g = torch.Generator().manual_seed(0)
    b = len(cases)
    x = torch.tensor([c[0] for c in cases], dtype=torch.float64).reshape(b, *[1] * len(shape))
    v = torch.tensor([c[1] for c in cases], dtype=torch.float64).reshape(b, *[1] * len(shape))
    x = x + torch.randn(b, *shape, generator=g, dtype=torch.float64)
    v = v + torch.randn(b, *shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    sigma_next = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    return x, v, sigma, sigma_next


def _spec_flow_grpo(x: float, v: float, sigma: float, sigma_next: float, a: float) -> tuple[float, float]:
    den_sigma = sigma_next if sigma == 1.0 else sigma  # at sigma = 1 the next sigma replaces it in 1 - sigma
    sigma_t = a * math.sqrt(sigma / (1.0 - den_sigma))
    delta = sigma_next - sigma
    mean = x * (1 + sigma_t**2 * delta / (2 * sigma)) + v * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * delta
    return mean, sigma_t * math.sqrt(-delta)


def _spec_cps(x: float, v: float, sigma: float, sigma_next: float, a: float) -> tuple[float, float]:
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat = x - sigma * v
    x1_hat = x + (1 - sigma) * v
    return x0_hat * (1 - sigma_next) + x1_hat * math.sqrt(sigma_next**2 - std**2), std


def _spec_dance(x: float, v: float, sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    delta = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    return x + delta * v - 0.5 * eta**2 * score * delta, eta * math.sqrt(sigma - sigma_next)


def _check_elementwise(step_fn, spec) -> None:
    """Run ``step_fn`` on each scalar case (as a [1, 1] tensor) and on a batch; compare to ``spec``."""
    for x, v, s, sn, a in SCALAR_CASES:
        mean, std = step_fn(
            torch.tensor([[x]], dtype=torch.float64), torch.tensor([[v]], dtype=torch.float64),
            torch.tensor([s], dtype=torch.float64), torch.tensor([sn], dtype=torch.float64), a,
        )
        exp_mean, exp_std = spec(x, v, s, sn, a)
        assert mean.shape == (1, 1) and std.shape == (1,)
        assert mean.item() == pytest.approx(exp_mean, rel=1e-12, abs=1e-12), (x, v, s, sn, a)
        assert std.item() == pytest.approx(exp_std, rel=1e-12, abs=1e-12), (x, v, s, sn, a)
    # batched with per-row sigmas: every element against the scalar formula (one noise level for the batch)
    a = 0.7
    x, v, sigma, sigma_next = _batched(SCALAR_CASES)
    mean, std = step_fn(x, v, sigma, sigma_next, a)
    assert mean.shape == x.shape and std.shape == sigma.shape
    for b in range(x.shape[0]):
        s, sn = sigma[b].item(), sigma_next[b].item()
        for xe, ve, me in zip(x[b].flatten().tolist(), v[b].flatten().tolist(), mean[b].flatten().tolist()):
            assert me == pytest.approx(spec(xe, ve, s, sn, a)[0], rel=1e-12, abs=1e-12)
        assert std[b].item() == pytest.approx(spec(0.0, 0.0, s, sn, a)[1], rel=1e-12, abs=1e-12)


def test_flow_grpo_step_matches_spec():
    _check_elementwise(flow_grpo_step, _spec_flow_grpo)


def test_flow_grpo_step_at_sigma_one_is_finite_and_uses_next_sigma():
    x = torch.ones(1, 4, dtype=torch.float64)
    mean, std = flow_grpo_step(x, x, torch.tensor([1.0], dtype=torch.float64),
                               torch.tensor([0.9], dtype=torch.float64), 0.7)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    # sigma_t = 0.7 sqrt(1 / (1 - 0.9)) = 0.7 sqrt(10); std = sigma_t sqrt(0.1) = 0.7
    assert std.item() == pytest.approx(0.7, rel=1e-12)


def test_cps_step_matches_spec():
    _check_elementwise(cps_step, _spec_cps)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_cps_step_preserves_coefficients(a: float):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    e = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    sigma_next = torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    sn = sigma_next.reshape(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * e
    v = e - x0
    mean, std = cps_step(x, v, sigma, sigma_next, a)
    expected_std = sigma_next * math.sin(a * math.pi / 2)
    torch.testing.assert_close(std, expected_std)
    sd = expected_std.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mean, (1 - sn) * x0 + torch.sqrt((sn**2 - sd**2).clamp_min(0)) * e)
    # total noise coefficient: (mean's coefficient on e)^2 + std^2 = sigma_next^2
    coef = torch.sqrt((sn**2 - sd**2).clamp_min(0)).flatten()
    torch.testing.assert_close(coef**2 + expected_std**2, sigma_next**2)


def test_dance_grpo_step_matches_spec():
    _check_elementwise(dance_grpo_step, _spec_dance)


def test_dance_grpo_step_with_exact_velocity():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    e = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.4, 0.1], dtype=torch.float64)
    s, sn = sigma.reshape(-1, 1, 1), sigma_next.reshape(-1, 1, 1)
    x = (1 - s) * x0 + s * e
    v = e - x0
    ode = x + (sn - s) * v
    # exact field: x0_hat = x0, score = -e / sigma, so mean = Euler + (eta^2 / 2) (sigma' - sigma) e / sigma
    eta = 0.3
    mean, std = dance_grpo_step(x, v, sigma, sigma_next, eta)
    torch.testing.assert_close(mean, ode + 0.5 * eta**2 * (sn - s) * e / s)
    torch.testing.assert_close(std, eta * torch.sqrt(sigma - sigma_next))
    # eta -> 0: the correction vanishes quadratically and the step reduces to the ODE step
    for eta in (1e-2, 1e-4):
        mean, std = dance_grpo_step(x, v, sigma, sigma_next, eta)
        assert (mean - ode).abs().max().item() < 10 * eta**2
        assert std.max().item() < eta
    mean, std = dance_grpo_step(x, v, sigma, sigma_next, 0.0)
    torch.testing.assert_close(mean, ode)
    assert (std == 0).all()


def test_ode_step():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([1.0, 0.5, 0.25])
    sigma_next = torch.tensor([0.75, 0.25, 0.0])
    mean, std = ode_step(x, v, sigma, sigma_next, 0.7)
    for b in range(3):
        torch.testing.assert_close(mean[b], x[b] + (sigma_next[b].item() - sigma[b].item()) * v[b])
    assert std.shape == (3,) and (std == 0).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (4, 4, 8, 2)])
def test_gaussian_log_prob_matches_torch_normal(shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(sum(shape))
    mean = torch.randn(shape, generator=g)
    std = torch.rand(shape[0], generator=g) + 0.1
    x = mean + torch.randn(shape, generator=g) * 2
    step = GaussianStep(mean=mean, std=std, ode_mean=mean.clone())
    expected = torch.distributions.Normal(mean, std.reshape(-1, 1, 1, 1)).log_prob(x).flatten(1).mean(dim=1)
    lp = step.log_prob(x)
    assert lp.shape == (shape[0],)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_kl_matches_formula_and_true_kl():
    g = torch.Generator().manual_seed(4)
    shape = (3, 2, 4, 5)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    mu_ref = mu + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    std = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    kl = GaussianStep(mean=mu, std=std, ode_mean=mu).kl(GaussianStep(mean=mu_ref, std=std, ode_mean=mu_ref))
    assert kl.shape == (3,)
    n = 2 * 4 * 5
    for b in range(3):
        s = std[b].item()
        diffs = (mu[b] - mu_ref[b]).flatten().tolist()
        assert kl[b].item() == pytest.approx(sum(d * d / (2 * s * s) for d in diffs) / n, rel=1e-10)
    sd = std.reshape(-1, 1, 1, 1)
    normal = torch.distributions.Normal
    true_kl = torch.distributions.kl_divergence(normal(mu, sd), normal(mu_ref, sd))
    torch.testing.assert_close(kl, true_kl.flatten(1).sum(dim=1) / n)
    # identical distributions have zero KL
    assert torch.all(GaussianStep(mu, std, mu).kl(GaussianStep(mu, std, mu)) == 0)


def test_gaussian_kl_needs_gaussian_reference():
    step = GaussianStep(mean=torch.zeros(1, 2), std=torch.ones(1), ode_mean=torch.zeros(1, 2))
    with pytest.raises(TypeError, match="undefined"):
        step.kl(object())  # type: ignore[arg-type]


def test_log_prob_of_deterministic_step_raises():
    mean = torch.zeros(2, 3)
    det = GaussianStep(mean=mean, std=torch.zeros(2), ode_mean=mean)
    with pytest.raises(ValueError, match="deterministic"):
        det.log_prob(mean)
    partly = GaussianStep(mean=mean, std=torch.tensor([1.0, 0.0]), ode_mean=mean)
    with pytest.raises(ValueError, match="std 0"):
        partly.log_prob(mean)


def test_randn_row_depends_only_on_its_generator():
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    single = randn((1, 2, 3, 3), [gen(7)], torch.device("cpu"), torch.float32)
    batch = randn((3, 2, 3, 3), [gen(1), gen(7), gen(2)], torch.device("cpu"), torch.float32)
    assert single.shape == (1, 2, 3, 3) and batch.shape == (3, 2, 3, 3)
    torch.testing.assert_close(batch[1], single[0], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])
    half = randn((3, 2, 3, 3), [gen(1), gen(7), gen(2)], torch.device("cpu"), torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), batch, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="one generator per batch row"):
        randn((2, 3), [gen(0)], torch.device("cpu"), torch.float32)


def test_gaussian_sample_is_mean_plus_std_times_row_noise():
    mean = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    std = torch.tensor([0.5, 2.0])
    step = GaussianStep(mean=mean, std=std, ode_mean=mean)
    x = step.sample([torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    noise = torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    torch.testing.assert_close(x, mean + std[:, None] * noise)
    assert torch.equal(step.mode(), mean)


# --- log-probability conventions (algo.logprob) --------------------------------------------------------------


def test_log_prob_conventions_by_hand():
    """exact: the Gaussian log-density; cps_released: Flow-GRPO's released CPS code, -(x' - mean)^2; both averaged
    over the non-batch elements. Values written out by hand."""
    mean = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    nxt = torch.tensor([[1.0, 1.0], [2.0, 4.0]], dtype=torch.float64)
    std = torch.tensor([0.5, 2.0], dtype=torch.float64)
    released = GaussianStep(mean, std, mean, logprob="cps_released").log_prob(nxt)
    assert released.tolist() == [-(1.0 + 0.0) / 2, -(0.0 + 4.0) / 2]
    exact = GaussianStep(mean, std, mean).log_prob(nxt)
    c = 0.5 * math.log(2 * math.pi)
    row0 = (-(1.0 / (2 * 0.25)) + 0.0) / 2 - math.log(0.5) - c  # squared distances 1 and 0, std 0.5
    row1 = (0.0 - 4.0 / (2 * 4.0)) / 2 - math.log(2.0) - c  # squared distances 0 and 4, std 2
    assert exact.tolist() == pytest.approx([row0, row1], rel=1e-12)


def test_released_cps_log_ratio_is_the_exact_one_times_two_variances():
    """The constants cancel in a log-ratio; what remains differs by the step's factor 2 std^2."""
    g = torch.Generator().manual_seed(11)
    shape = (3, 2, 4, 4)
    old = torch.randn(shape, generator=g, dtype=torch.float64)
    new = torch.randn(shape, generator=g, dtype=torch.float64)
    std = torch.tensor([0.01, 0.3, 1.5], dtype=torch.float64)
    nxt = old + std.reshape(-1, 1, 1, 1) * torch.randn(shape, generator=g, dtype=torch.float64)

    def log_ratio(convention: str) -> torch.Tensor:
        return GaussianStep(new, std, new, logprob=convention).log_prob(nxt) - \
            GaussianStep(old, std, old, logprob=convention).log_prob(nxt)

    torch.testing.assert_close(log_ratio("cps_released"), log_ratio("exact") * 2 * std**2)


def test_released_cps_scaling_reaches_about_7900_on_sd3s_schedule():
    """The factor the released convention drops, 1 / (2 std^2) with std = sigma' sin(a pi / 2), at the last
    trainable step of SD3's 10-step schedule (shift 3, a = 0.7), as the docstring and README state."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()
    x = torch.zeros(10, 1, dtype=torch.float64)
    _, std = cps_step(x, x, sigmas[:-1], sigmas[1:], 0.7)
    factor = 1 / (2 * std[:-1] ** 2)  # the last step (sigma' = 0) never trains
    assert factor[0].item() == pytest.approx(0.683, abs=1e-3)
    assert factor[-1].item() == pytest.approx(7900, rel=1e-3)


def test_unknown_log_prob_convention_is_refused():
    mean = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"algo\.logprob='sum'.*exact or cps_released"):
        GaussianStep(mean, torch.ones(1), mean, logprob="sum")


@pytest.mark.parametrize(("overrides", "words"), [
    (["algo.logprob=summed"], "algo.logprob='summed': use exact or cps_released"),
    (["algo.logprob=cps_released"], "algo.logprob=cps_released with algo.step_kind='flow_grpo'"),
])
def test_log_prob_setting_is_validated(overrides: list[str], words: str):
    from alignkit.compose import load_run_config
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_run_config("sd3_tiny_flow_grpo", overrides)
    assert load_run_config("sd3_tiny_flow_grpo", ["algo=flow_grpo_cps", "algo.logprob=cps_released"]).algo.logprob \
        == "cps_released"


@pytest.mark.integration
def test_released_cps_convention_reaches_the_runs_log_probs(tmp_path):
    """A run with algo.logprob=cps_released stores, for the same samples as an exact run, the log-probs of the
    released convention: exact = released / (2 s^2) - log s - log sqrt(2 pi) per stored transition."""
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    def rollout(convention: str):
        cfg = load_run_config("sd3_tiny_flow_grpo", [
            f"output_dir={tmp_path / convention}", "algo=flow_grpo_cps", f"algo.logprob={convention}",
            "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4", "backbone.num_steps=4",
            "train.log_with=[]"])
        trainer = Trainer(cfg)
        try:
            return trainer.rollout(0).rollout.transitions
        finally:
            trainer.close()

    exact, released = rollout("exact"), rollout("cps_released")
    assert torch.equal(exact.next_state, released.next_state) and torch.equal(exact.scale, released.scale)
    s = exact.scale.double()
    assert (s > 0).all()
    expected = released.log_prob.double() / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(exact.log_prob.double(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(exact.log_prob, released.log_prob)
