"""dance_grpo.py: its SDE step against the reference's formula re-typed in float64, its marginals on Gaussian data,
the shared initial noise, the random subset of trained steps, the on-policy ratio, multi-reward advantages, and the
script end to end on shapes, a tiny SD3 and a tiny FLUX pipeline."""

import json
import math

import numpy as np
import pytest
import torch
from test_flow_grpo import TINY, records, run
from test_sampler import GaussianData, group_zscores

import dance_grpo
from common import sde_step, sigma_schedule


def reference_step_float64(x, v, s, s_next, eta, noise):
    """The reference's step as it writes it (x0-prediction, score, drift correction), in numpy float64."""
    x, v, noise = (np.asarray(t, dtype=np.float64) for t in (x, v, noise))
    dsigma = s_next - s
    x0 = x - s * v
    score = -(x - x0 * (1 - s)) / s**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = eta * math.sqrt(s - s_next)
    sample = mean + noise * std
    logp = -((sample - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return sample, logp.reshape(len(x), -1).mean(1), mean, std


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("i", [0, 4, 8])  # sigma = 1 (the first step), a middle one, the last stochastic one
def test_step_matches_the_reference_formula(eta, i):
    g = torch.Generator().manual_seed(i)
    sig = sigma_schedule(10, 3.0, "flux")
    x, v, noise = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    out = dance_grpo.dance_step(x, v, sig[i], sig[i + 1], eta, noise=noise)
    ref = reference_step_float64(x.numpy(), v.numpy(), float(sig[i]), float(sig[i + 1]), eta, noise.numpy())
    assert out.sample.dtype == torch.float32 and out.log_prob.shape == (3,)
    np.testing.assert_allclose(out.sample.numpy(), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_prob.numpy(), ref[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.mean.numpy(), ref[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(out.std), ref[3], rtol=1e-6)
    # the transition density, against torch.distributions, for a given x_{t-1}
    prev = torch.randn(3, 4, 5, 5, generator=g)
    again = dance_grpo.dance_step(x, v, sig[i], sig[i + 1], eta, prev_sample=prev)
    normal = torch.distributions.Normal(out.mean.double(), ref[3]).log_prob(prev.double()).mean(dim=(1, 2, 3))
    assert torch.equal(again.sample, prev) and torch.allclose(again.log_prob.double(), normal, atol=1e-5)


def test_std_does_not_depend_on_sigma_and_the_mean_is_flow_grpos_with_sigma_t_eta():
    """Flow-GRPO's std is a sqrt(t / (1 - t)) sqrt(-dt); DanceGRPO's is eta sqrt(-dt) at every t. With
    a = eta / sqrt(t / (1 - t)) the two steps coincide (the drifts are the same family)."""
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert float(dance_grpo.dance_step(x, v, 0.9, 0.8, 0.3).std) == pytest.approx(
        float(dance_grpo.dance_step(x, v, 0.2, 0.1, 0.3).std), rel=1e-6)
    for t, t_next in [(0.9, 0.8), (0.5, 0.3), (0.2, 0.05)]:
        ours = dance_grpo.dance_step(x, v, t, t_next, 0.3, noise=torch.zeros_like(x))
        flow = sde_step(x, v, t, t_next, 0.3 / math.sqrt(t / (1 - t)), noise=torch.zeros_like(x))
        assert torch.allclose(ours.mean, flow.mean, atol=1e-6) and float(ours.std) == pytest.approx(float(flow.std))


def test_per_sample_sigmas_and_eta_zero():
    sig = sigma_schedule(10, 3.0, "flux")
    x, v, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    idx = torch.tensor([0, 4, 8])
    batched = dance_grpo.dance_step(x, v, sig[idx], sig[idx + 1], 0.7, noise=noise)
    for b, i in enumerate(idx.tolist()):
        one = dance_grpo.dance_step(x[b:b + 1], v[b:b + 1], sig[i], sig[i + 1], 0.7, noise=noise[b:b + 1])
        assert torch.allclose(batched.sample[b], one.sample[0], atol=1e-6)
        assert torch.allclose(batched.log_prob[b], one.log_prob[0], atol=1e-5)
    ode = dance_grpo.dance_step(x, v, 0.6, 0.4, 0.0)
    assert ode.log_prob is None and torch.allclose(ode.sample, x - 0.2 * v)
    with pytest.raises(ValueError, match="no density"):
        dance_grpo.dance_step(x, v, 0.6, 0.4, 0.0, prev_sample=x)


MU, S = torch.tensor([1.5, -0.5, 0.0, 2.0]), torch.tensor([0.5, 1.0, 2.0, 0.2])


def final_samples(eta, sigmas, n=40_000):
    g = torch.Generator().manual_seed(1)
    latents, log_probs = dance_grpo.dance_rollout(GaussianData(MU, S), None, torch.randn(n, 4, generator=g), sigmas,
                                                  eta, 1.0, g)
    return latents[:, -1], log_probs


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_sde_preserves_marginals(eta):
    """As test_sampler checks Flow-GRPO's SDE: from N(0, 1) noise with the exact velocity of Gaussian data, 200 steps
    of the rollout (the SDE, then the final Euler jump) give the data's mean within 0.03 and its std within 3%."""
    x0, log_probs = final_samples(eta, sigma_schedule(200, 1.0, "flux"))
    assert torch.allclose(x0.mean(0), MU, atol=0.03), x0.mean(0)
    assert torch.allclose(x0.std(0) / S, torch.ones(4), atol=0.03), x0.std(0)
    assert torch.isfinite(log_probs).all() and (log_probs[:, -1] == 0).all() and (log_probs[:, :-1] != 0).all()


def test_coarse_schedules_where_the_discretisation_shows():
    """With 10 steps the Euler ODE itself shrinks the data's std (most in the narrow dimension, s = 0.2). On the
    reference's spacing shift(linspace(1, 0, T + 1)) the SDE at eta 0.7 adds no error beyond the ODE's own. On the SD3
    spacing, whose last stochastic step lands on sigma = 0.009, the constant-eta noise is not removed by the
    discretised drift: the narrow dimension's std comes out more than 1.5x too large (1.9x). That is why the
    rollouts use the reference's spacing on every backend."""
    ref_spacing = sigma_schedule(10, 3.0, "flux")
    ode_err = (final_samples(0.0, ref_spacing)[0].std(0) / S - 1).abs()
    sde_err = (final_samples(0.7, ref_spacing)[0].std(0) / S - 1).abs()
    assert (sde_err <= ode_err + 0.02).all(), (sde_err, ode_err)
    assert final_samples(0.7, sigma_schedule(10, 3.0, "sd3"))[0].std(0)[3] / S[3] > 1.5


def test_group_shares_the_initial_noise_and_uses_the_reference_spacing(tiny_shapes_policy):
    args = dance_grpo.Args(shift=3.0, group_size=3, num_steps=4, eta=0.7)
    batch = dance_grpo.sample_batch(tiny_shapes_policy, ["a circle", "two squares"], {}, args,
                                    torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    lat = batch["latents"]
    assert lat.shape == (6, 5, 4, 8, 8) and batch["groups"].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(lat[0, 0], lat[2, 0]) and not torch.equal(lat[0, 0], lat[3, 0])  # one x_1 per group
    assert not torch.equal(lat[0, 1], lat[1, 1])  # the SDE's noise differs from the first step on
    assert (batch["log_probs"][:, :3] != 0).all() and (batch["log_probs"][:, 3] == 0).all()  # last step: Euler jump
    assert torch.equal(batch["sigmas"], sigma_schedule(4, 3.0, "flux"))
    args.same_noise = False
    lat = dance_grpo.sample_batch(tiny_shapes_policy, ["a circle"], {}, args, torch.Generator().manual_seed(0),
                                  torch.Generator())["latents"]
    assert not torch.equal(lat[0, 0], lat[1, 0])


def test_random_subset_of_steps_per_image():
    args = dance_grpo.Args(num_steps=25, timestep_fraction=0.6)  # the reference's FLUX setting: 14 of the 24
    steps = dance_grpo.trained_steps(500, args, torch.Generator().manual_seed(0))
    assert steps.shape == (500, 14)
    assert all(len(set(row)) == 14 for row in steps.tolist())  # distinct steps within an image
    assert steps.min() == 0 and steps.max() == 23  # never the last step (24, the deterministic jump)
    counts = torch.bincount(steps.flatten(), minlength=24)
    assert counts.min() > 0.8 * 500 * 14 / 24 and counts.max() < 1.2 * 500 * 14 / 24  # uniform over the 24
    assert len({tuple(r) for r in steps[:, :3].tolist()}) > 400  # each image draws its own
    assert torch.equal(steps, dance_grpo.trained_steps(500, args, torch.Generator().manual_seed(0)))
    assert dance_grpo.trained_steps(4, dance_grpo.Args(num_steps=2, timestep_fraction=0.1), torch.Generator()).shape \
        == (4, 1)


def test_update_trains_each_images_own_steps_and_starts_on_policy(trainable_policy):
    policy = trainable_policy
    args = dance_grpo.Args(shift=3.0, group_size=3, num_steps=6, timestep_fraction=0.4, minibatches=2, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = dance_grpo.sample_batch(policy, ["a circle", "two squares"], {}, args, gen, torch.Generator())
    expected = dance_grpo.trained_steps(6, args, torch.Generator().manual_seed(5))  # K = int(5 * 0.4) = 2
    seen = []
    velocity = policy.velocity
    policy.velocity = lambda x, s, c, g: seen.append(torch.as_tensor(s).clone()) or velocity(x, s, c, g)
    try:
        stats = dance_grpo.train_on_batch(policy, torch.optim.SGD(policy.trainable_parameters(), lr=args.lr), batch,
                                          torch.randn(6), {}, args, torch.Generator().manual_seed(5))
    finally:
        policy.velocity = velocity
    assert len(seen) == 2 * 2  # two minibatches x K slots, one forward pass each (beta 0: no reference pass)
    got = sorted(round(v, 6) for s in seen for v in s.tolist())
    assert got == sorted(round(float(batch["sigmas"][j]), 6) for j in expected.flatten().tolist())
    assert stats["train/onpolicy_ratio_err"] < 1e-5  # the first minibatch is on-policy: its ratio is 1


def test_micro_batches_give_the_same_update(trainable_policy):
    """--micro-batch 1 splits each slot's forward/backward (images at different sigmas) and accumulates: the same step."""
    from test_micro_batch import one_update

    args = dance_grpo.Args(shift=3.0, group_size=3, num_steps=5, timestep_fraction=0.5, minibatches=1, beta=0.04,
                           clip_range=0.2, max_grad_norm=1e9)
    whole, split = one_update(dance_grpo, trainable_policy, args, 0), one_update(dance_grpo, trainable_policy, args, 1)
    scale = max(d.abs().max().item() for d in whole)
    assert scale > 1e-6
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale)


def test_advantages_single_and_several_rewards():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    a, b = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 8.0]), torch.tensor([10.0, 0.0, 20.0, -1.0, 1.0, 0.0])

    def z(r):
        return group_zscores(r, groups)

    batch = {"groups": groups}
    args = dance_grpo.Args(reward="shapes:1,jpeg_compressibility:0.5", adv_clip=1.2)
    got = dance_grpo.compute_advantages(batch, a + 0.5 * b, {"shapes": a, "jpeg_compressibility": b}, args)
    assert torch.allclose(got, (z(a) + 0.5 * z(b)).clamp(-1.2, 1.2), atol=1e-5)
    assert not torch.allclose(got, z(a + 0.5 * b).clamp(-1.2, 1.2), atol=1e-2)  # not the z-score of the sum
    args = dance_grpo.Args(reward="shapes")
    assert torch.allclose(dance_grpo.compute_advantages(batch, 100 * a, {}, args), z(100 * a).clamp(-5, 5), atol=1e-5)


def test_update_raises_the_log_prob_of_rewarded_images(trainable_policy):
    policy = trainable_policy
    args = dance_grpo.Args(shift=3.0, group_size=2, num_steps=3, minibatches=1, clip_range=10.0, lr=1e-3,
                           timestep_fraction=1.0)
    gen = torch.Generator().manual_seed(0)
    batch = dance_grpo.sample_batch(policy, ["a circle", "a square"], {}, args, gen, torch.Generator())
    adv = dance_grpo.compute_advantages(batch, torch.tensor([1.0, 0.0, 0.0, 1.0]), {}, args)

    def surrogate():  # sum over images and both stochastic steps of A_i log pi(x_{j+1} | x_j)
        with torch.no_grad():
            sig, lat = batch["sigmas"], batch["latents"]
            return sum((adv * dance_grpo.dance_step(lat[:, j], policy.velocity(lat[:, j], sig[j], batch["cond"], 1.0),
                                                    sig[j], sig[j + 1], args.eta, prev_sample=lat[:, j + 1]).log_prob)
                       .sum().item() for j in range(2))

    before = surrogate()
    dance_grpo.train_on_batch(policy, torch.optim.SGD(policy.trainable_parameters(), lr=args.lr), batch, adv, {}, args,
                              gen)
    assert surrogate() > before


def test_runs_on_shapes_with_a_kl(tmp_path):
    out = tmp_path / "run"
    proc = run("dance_grpo.py", *TINY, "--beta", "0.04", "--out", str(out))
    assert "done: 2 iterations" in proc.stdout
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["train/onpolicy_ratio_err"] < 1e-5 for r in train)
    moved = [r for r in train if r["adv/abs_mean"] > 0]  # a group whose images tie gives no update
    assert moved and all(r["loss/kl"] > 0 for r in moved)  # the second minibatch has moved away from the base
    assert [r["step"] for r in records(out) if "eval/score" in r] == [0, 1, 2]


@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_runs_on_tiny_pipelines(backend, tmp_path, tiny_sd3_dir, tiny_flux_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a dog\n")
    flux = backend == "flux"
    dance_grpo.main(dance_grpo.Args(
        model=str(tiny_flux_dir if flux else tiny_sd3_dir), resolution=64, reward="jpeg_compressibility",
        prompts=str(prompts), eval_prompts=str(prompts), steps=1, prompts_per_step=2, group_size=2, num_steps=3,
        eval_num_steps=2, eval_per_prompt=1, eval_every=1, save_every=1, minibatches=1, lora_rank=4, lora_alpha=4.0,
        threads=1, device="cpu", out=str(tmp_path / "run"), guidance=3.5 if flux else 1.0, shift=3.0 if flux else None,
        **({"gradient_checkpointing": True} if flux else {"offload_text_encoders": True, "sample_batch": 3})))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward/mean" in r]
    assert len(train) == 1 and math.isfinite(train[0]["reward/mean"]) and train[0]["time/backward"] > 0
    assert train[0]["train/onpolicy_ratio_err"] < 1e-5


@pytest.mark.parametrize("bad", [{"eta": 0.0}, {"timestep_fraction": 0.0}, {"timestep_fraction": 1.5}])
def test_bad_arguments_fail_clearly(bad):
    with pytest.raises(SystemExit, match="eta must be > 0 and the fraction of steps trained in"):
        dance_grpo.Args(**bad)
