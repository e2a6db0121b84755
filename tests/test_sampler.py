"""The shared sampler against independent computations: float64 formulas, diffusers, torch.distributions."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common import flow_matching_loss, group_advantages, rollout, sde_step, sigma_schedule


@pytest.mark.parametrize("n,shift", [(10, 3.0), (40, 3.0), (14, 1.0), (6, 5.0), (1, 3.0)])
def test_sigma_schedule_matches_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ref = sched.sigmas.double()
    ours = sigma_schedule(n, shift).double()
    assert ours.shape == (n + 1,)
    assert torch.allclose(ours, ref, atol=1e-6), (ours, ref)
    assert ours[0] == 1 and ours[-1] == 0


@pytest.mark.parametrize("n,mu", [(10, math.log(3.0)), (25, 0.63), (16, 1.15), (1, 0.8)])
def test_flux_spacing_matches_the_flux_scheduler(n, mu):
    """FluxPipeline: linspace(1, 1/T, T) handed to a dynamically shifting scheduler with e^mu."""
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours = sigma_schedule(n, math.exp(mu), "flux").double()
    assert torch.allclose(ours, sched.sigmas.double(), atol=1e-6), (ours, sched.sigmas)
    assert ours[-2] > sigma_schedule(n, math.exp(mu)).double()[-2] or n == 1  # coarser end than SD3's spacing
    with pytest.raises(ValueError, match="unknown sigma spacing 'sdxl'; known: sd3, flux"):
        sigma_schedule(n, 3.0, "sdxl")


def sde_step_float64(x, v, s, s_next, a, noise):
    """The step written out again in numpy float64, term by term from the SDE."""
    x, v, noise = (np.asarray(t, dtype=np.float64) for t in (x, v, noise))
    denom = 1 - (s_next if s == 1 else s)
    sigma_t = a * math.sqrt(s / denom)
    dt = s_next - s
    drift = v + sigma_t**2 / (2 * s) * (x + (1 - s) * v)
    mean = x + drift * dt
    std = sigma_t * math.sqrt(-dt)
    sample = mean + std * noise
    logp = -((sample - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return sample, logp.reshape(len(x), -1).mean(1), mean, std


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("i", [0, 1, 5, 9])  # i = 0 is sigma = 1, i = 9 the last step to sigma = 0
def test_sde_step_matches_float64(a, i):
    g = torch.Generator().manual_seed(i)
    sig = sigma_schedule(10, 3.0)
    x, v, noise = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    out = sde_step(x, v, sig[i], sig[i + 1], a, noise=noise)
    ref = sde_step_float64(x.numpy(), v.numpy(), float(sig[i]), float(sig[i + 1]), a, noise.numpy())
    assert out.sample.dtype == torch.float32 and out.log_prob.shape == (3,)
    np.testing.assert_allclose(out.sample.numpy(), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_prob.numpy(), ref[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.mean.numpy(), ref[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.std), ref[3], rtol=1e-6)


def test_sde_step_first_step_uses_next_sigma():
    """At sigma = 1 the std is a * sqrt(1 / (1 - sigma_next)), finite (Flow-GRPO's edge case)."""
    out = sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, 0.9, 0.7, noise=torch.zeros(1, 2))
    assert torch.isclose(out.std, torch.tensor(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1)))


def test_sde_step_per_sample_sigmas_match_scalar_calls():
    sig = sigma_schedule(10, 3.0)
    x, v, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    idx = torch.tensor([0, 4, 8])
    batched = sde_step(x, v, sig[idx], sig[idx + 1], 0.7, noise=noise)
    for b, i in enumerate(idx.tolist()):
        one = sde_step(x[b:b + 1], v[b:b + 1], sig[i], sig[i + 1], 0.7, noise=noise[b:b + 1])
        assert torch.allclose(batched.sample[b], one.sample[0], atol=1e-6)
        assert torch.allclose(batched.log_prob[b], one.log_prob[0], atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_step_matches_diffusers_scheduler(shift):
    n = 8
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    sig = sigma_schedule(n, shift)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 6, 6, generator=g)
        ref = sched.step(v, t, x, return_dict=False)[0]
        ours = sde_step(x, v, sig[i], sig[i + 1], 0.0)
        assert ours.log_prob is None
        assert torch.allclose(ours.sample, ref, atol=1e-6)
        x = ref


def test_ode_step_has_no_density():
    with pytest.raises(ValueError, match="no density"):
        sde_step(torch.zeros(1, 3), torch.zeros(1, 3), 0.5, 0.4, 0.0, prev_sample=torch.zeros(1, 3))


def test_log_prob_matches_torch_normal():
    sig = sigma_schedule(10, 3.0)
    x, v, prev = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = sde_step(x, v, sig[3], sig[4], 0.7, prev_sample=prev)
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, ref, atol=1e-5)
    assert torch.equal(out.sample, prev)


class GaussianData:
    """Exact velocity of rectified flow when x0 ~ N(mu, s^2) per dimension:
    x_t = (1 - t) x0 + t eps has variance V = (1 - t)^2 s^2 + t^2, and
    v*(x, t) = E[eps - x0 | x_t = x] = (t - (1 - t) s^2) / V * (x - (1 - t) mu) - mu."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def velocity(self, x, sigma, cond, guidance):
        t = float(sigma)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) / var * (x - (1 - t) * self.mu) - self.mu


def diffusers_dpm_solver_run(steps: int = 6):
    """The independent DPM-Solver++(2M) result for the samplers that use it (MixGRPO-Flash, DiffusionNFT):
    diffusers' DPMSolverMultistepScheduler (midpoint, first-order last step) on its flow sigmas (shift 3), driven by
    the exact velocity of a per-dimension Gaussian. Returns (data, x_1 in float64, the scheduler's sigmas, x_0)."""
    from diffusers import DPMSolverMultistepScheduler

    data = GaussianData(torch.tensor([1.5, -0.5, 0.0, 2.0]), torch.tensor([0.5, 1.0, 2.0, 0.2]))
    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                      solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                      lower_order_final=True, final_sigmas_type="zero")
    sch.set_timesteps(steps)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = x.clone()
    for i, t in enumerate(sch.timesteps):
        ref = sch.step(data.velocity(ref, sch.sigmas[i], None, 1.0), t, ref).prev_sample
    return data, x, sch.sigmas.double(), ref


def group_zscores(r: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Independent GRPO advantages: per group, (r - mean) / (population std + 1e-4), one group at a time."""
    out = torch.empty(len(r))
    for k in groups.unique().tolist():
        m = groups == k
        out[m] = (r[m] - r[m].mean()) / (r[m].std(unbiased=False) + 1e-4)
    return out


@pytest.mark.parametrize("a", [0.0, 0.7, 1.0])
def test_sde_preserves_marginals(a):
    """Sampling N(0, 1) noise with the exact velocity reproduces the data distribution at any noise level.
    Tolerance: 0.03 on the mean and 3% on the std (Monte-Carlo error with 40,000 draws is ~0.005)."""
    mu = torch.tensor([1.5, -0.5, 0.0, 2.0])
    s = torch.tensor([0.5, 1.0, 2.0, 0.2])
    data = GaussianData(mu, s)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40_000, 4, generator=g)
    out = rollout(data, None, x, sigma_schedule(200, 1.0), [a] * 200, 1.0, g)
    x0 = out.latents[:, -1]
    assert torch.allclose(x0.mean(0), mu, atol=0.03), x0.mean(0)
    assert torch.allclose(x0.std(0) / s, torch.ones(4), atol=0.03), x0.std(0)
    assert (out.log_probs == 0).all() if a == 0 else torch.isfinite(out.log_probs).all()


def test_on_policy_ratio_is_one(tiny_shapes_policy):
    """Recomputing the log-prob of stored transitions with unchanged weights gives ratio exactly 1."""
    policy = tiny_shapes_policy
    cond = policy.encode(["a red circle", "two squares"])
    sig = sigma_schedule(4, 3.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = rollout(policy, cond, policy.noise(2, g), sig, [0.7] * 4, 4.5, g)
        for j in range(4):
            x = out.latents[:, j]
            step = sde_step(x, policy.velocity(x, sig[j], cond, 4.5), sig[j], sig[j + 1], 0.7,
                            prev_sample=out.latents[:, j + 1])
            ratio = torch.exp(step.log_prob - out.log_probs[:, j])
            assert torch.allclose(ratio, torch.ones(2), atol=1e-5), ratio


def test_flow_matching_loss_per_sample():
    x0, eps, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    ref = torch.stack([torch.nn.functional.mse_loss(v[i], eps[i] - x0[i]) for i in range(3)])
    assert torch.allclose(flow_matching_loss(v, x0, eps), ref)


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(r, groups)
    for g in (0, 1):
        rg = r[groups == g]
        ref = (rg - rg.mean()) / (np.std(rg.numpy()) + 1e-4)
        assert torch.allclose(adv[groups == g], ref, atol=1e-6)
    glob = group_advantages(r, groups, global_std=True)
    assert torch.allclose(glob[:3], (r[:3] - 2.0) / (np.std(r.numpy()) + 1e-4), atol=1e-6)
    same = group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(same, torch.zeros(4))  # no signal in a group that all scored the same
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(3), torch.tensor([0, 0, 1]))


def test_off_policy_warning_fires_once(capsys):
    import common

    common._WARNED.discard("onpolicy")
    common.warn_off_policy({"train/onpolicy_ratio_err": 0.0})
    common.warn_off_policy({"loss/policy": 0.1})  # AWM logs no ratio
    assert capsys.readouterr().out == ""
    common.warn_off_policy({"train/onpolicy_ratio_err": 2e-3})
    common.warn_off_policy({"train/onpolicy_ratio_err": 5e-3})
    out = capsys.readouterr().out
    assert out.count("warning: train/onpolicy_ratio_err") == 1 and "2.00e-03" in out


def test_step_kl_is_the_reference_form():
    """common.step_kl against the reference's formula re-typed in float64, and against the exact KL of the two
    Gaussian steps (torch.distributions) times |dt|, on every step of a 10-step shift-3 schedule (t = 1 included)."""
    from common import sde_step, sigma_schedule, step_kl

    torch.manual_seed(0)
    sig, a = sigma_schedule(10, 3.0).double(), 0.7
    for j in range(9):
        x, v, v_ref = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
        t, t_next = sig[j].item(), sig[j + 1].item()
        mu = sde_step(x, v, t, t_next, a).mean
        mu_ref = sde_step(x, v_ref, t, t_next, a).mean
        std_t = a * math.sqrt(t / (1 - (t_next if t == 1 else t)))  # the reference's std_dev_t: no sqrt(-dt)
        expected = ((mu.double() - mu_ref.double()) ** 2).mean((1, 2, 3)) / (2 * std_t**2)
        got = step_kl(mu, mu_ref, t, t_next, a)
        assert torch.allclose(got.double(), expected, rtol=1e-5)
        step_std = std_t * math.sqrt(t - t_next)
        exact = torch.distributions.kl_divergence(torch.distributions.Normal(mu.double(), step_std),
                                                  torch.distributions.Normal(mu_ref.double(), step_std))
        assert torch.allclose(got.double(), exact.mean((1, 2, 3)) * (t - t_next), rtol=1e-5)
