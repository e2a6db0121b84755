"""TempFlow-GRPO: the noise-aware weights against the reference's SD3.5-M values, the branching layout, the seed
group, on-policy ratios, and the script end to end."""

import numpy as np
import pytest
import torch

import tempflow_grpo as tf
from common import sde_step, sigma_schedule
from test_flow_grpo import TINY, records, run


def sd35_stds(T=10, shift=3.0, a=0.7):
    """sigma_t sqrt(dt) of SD3.5-M's schedule in float64, written out independently of common.py."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sig = np.append(shifted(np.linspace(1.0, shifted(1 / 1000), T)), 0.0)
    denom = [1 - (sig[i + 1] if sig[i] == 1 else sig[i]) for i in range(T)]
    return np.array([a * np.sqrt(sig[i] / denom[i]) * np.sqrt(sig[i] - sig[i + 1]) for i in range(T)])


def test_noise_aware_weights_match_the_sd35_values():
    args = tf.Args(num_steps=10, shift=3.0, noise_level=0.7)
    w = tf.step_weights(sigma_schedule(10, 3.0), args)[:9]
    raw = sd35_stds()[:9]  # the 9 trained steps
    assert abs(1 / raw.mean() - 2.253) < 1e-3  # the reference's hard-coded 2.25
    notes = [1.58, 1.67, 1.21, 1.00, 0.88, 0.79, 0.72, 0.63, 0.50]
    assert np.allclose(w.numpy(), notes, atol=0.01), w
    assert np.allclose(w.numpy(), raw / raw.mean(), atol=1e-5)
    assert torch.equal(tf.step_weights(sigma_schedule(10, 3.0), tf.Args(noise_weighting=False)), torch.ones(10))


def test_branch_steps_and_bad_arguments():
    g = torch.Generator().manual_seed(0)
    assert tf.branch_steps(tf.Args(num_steps=10), g) == list(range(9))
    draws = [tf.branch_steps(tf.Args(num_steps=10, branch_steps=3), g) for _ in range(50)]
    assert all(len(d) == 3 and d == sorted(set(d)) and max(d) <= 8 for d in draws)
    assert len({k for d in draws for k in d}) == 9
    with pytest.raises(SystemExit, match="branch-steps"):
        tf.Args(num_steps=4, branch_steps=4)
    with pytest.raises(SystemExit, match="seeds"):
        tf.Args(seeds=0)


def test_branching_children_share_the_main_ode_state(tiny_shapes_policy):
    policy = tiny_shapes_policy
    args = tf.Args(shift=3.0, group_size=3, seeds=2, num_steps=4, guidance=1.0)
    prompts = ["a circle", "two squares"]
    batch = tf.sample_batch(policy, prompts, {}, args, torch.Generator().manual_seed(0),
                               torch.Generator().manual_seed(1))
    n, K, ks = 4, 3, [0, 1, 2]  # trajectories (2 prompts x 2 seeds), children, branching steps
    assert batch["steps"].tolist() == [k for k in ks for _ in range(n)]
    assert batch["next"].shape[:2] == (12, K) and batch["log_probs"].shape == (12, K) and len(batch["images"]) == 36
    assert batch["seed"].tolist() == [0, 1, 2, 3] * 3 and batch["prompt"].tolist() == [0, 0, 1, 1] * 3
    assert batch["prompts"][:K] == ["a circle"] * K and batch["prompts"][2 * K:3 * K] == ["two squares"] * K
    sig, x = batch["sigmas"], batch["states"]
    with torch.no_grad():
        for k in ks[:-1]:  # the main trajectory is the ODE: x_{k+1} = x_k + v dt
            xk, cond = x[k * n:(k + 1) * n], policy.encode(["a circle", "a circle", "two squares", "two squares"])
            v = policy.velocity(xk, sig[k], cond, 1.0)
            assert torch.allclose(x[(k + 1) * n:(k + 2) * n], xk + v * (sig[k + 1] - sig[k]), atol=1e-5)
        # the children of a parent: one SDE step from its state, x_{k+1} = mean + std * eps, distinct eps
        k, p = 1, 5  # parent 5: step 1, trajectory 1 (prompt 0, seed 1)
        step = sde_step(x[p:p + 1], policy.velocity(x[p:p + 1], sig[k], policy.encode(["a circle"]), 1.0),
                        sig[k], sig[k + 1], 0.7)
        eps = (batch["next"][p] - step.mean) / step.std
        assert 0.9 < eps.std() < 1.1 and not torch.allclose(eps[0], eps[1])


def test_seed_and_prompt_group_advantages():
    # 2 steps x 4 trajectories (2 prompts x 2 seeds) as parents, 3 children each
    steps = torch.tensor([0] * 4 + [2] * 4)
    seed = torch.tensor([0, 1, 2, 3] * 2)
    batch = {"steps": steps, "seed": seed, "prompt": seed // 2, "image": torch.arange(24).view(8, 3)}
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0))
    rewards[:3] = 0.5  # one group whose children all scored alike
    r = rewards.numpy().reshape(8, 3).astype(np.float64)
    ref = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)  # one group per parent
    adv = tf.compute_advantages(batch, rewards, {}, tf.Args())
    assert np.allclose(adv.numpy(), ref, atol=1e-4) and (adv[0] == 0).all()
    adv = tf.compute_advantages(batch, rewards, {}, tf.Args(prompt_group=True))
    for first in (0, 2, 4, 6):  # a prompt's 2 seeds at one step form one group of 6
        g = r[first:first + 2].flatten()
        assert np.allclose(adv[first:first + 2].flatten().numpy(), (g - g.mean()) / (g.std() + 1e-4), atol=1e-4)
    tied = torch.full((24,), 0.9)  # float32: the mean of 3 equal 0.9s is off by a rounding error; float64: exact
    assert (tf.compute_advantages(batch, tied, {}, tf.Args()) == 0).all()
    big = rewards.clone()
    big[3:6] = torch.tensor([0.0, 0.0, 1e-3])
    assert tf.compute_advantages(batch, big, {}, tf.Args(adv_clip=1.0)).abs().max() <= 1.0


def test_no_branching_is_flow_grpo_with_a_shared_seed(tiny_shapes_policy):
    args = tf.Args(shift=3.0, group_size=3, seeds=1, num_steps=3, branching=False, guidance=1.0)
    batch = tf.sample_batch(tiny_shapes_policy, ["a circle", "a square"], {}, args, torch.Generator().manual_seed(0),
                               torch.Generator().manual_seed(1))
    assert len(batch["images"]) == 6 and batch["next"].shape[:2] == (12, 1)  # 2 steps x 6 trajectories, 1 child
    x1 = batch["states"][:6]
    assert torch.equal(x1[0], x1[2]) and not torch.equal(x1[0], x1[3])  # x_1 shared by a seed's 3 trajectories
    assert torch.equal(batch["next"][:6, 0], batch["states"][6:])  # a trajectory's step 0 leads to its step 1
    assert batch["image"].flatten().tolist() == list(range(6)) * 2 and (batch["log_probs"] != 0).all()
    assert batch["seed"].tolist() == [0, 0, 0, 1, 1, 1] * 2


@pytest.mark.parametrize("branching", [True, False])
def test_on_policy_ratio_is_one_and_weights_scale_the_policy_term(trainable_policy, branching):
    policy = trainable_policy
    args = tf.Args(shift=3.0, group_size=2, num_steps=4, branch_steps=1, minibatches=1, beta=0.004, guidance=1.0,
                   branching=branching)
    gen = torch.Generator().manual_seed(1)
    batch = tf.sample_batch(policy, ["a circle", "three triangles"], {}, args, gen, torch.Generator().manual_seed(1))
    adv = torch.ones_like(batch["log_probs"])  # A = 1: the policy term is -w_k * rho
    stats = tf.train_on_batch(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.0), batch, adv, {}, args, gen)
    k = int(batch["steps"][0])
    w = tf.step_weights(batch["sigmas"], args)[k]
    assert abs(stats["train/ratio"] - 1) < 1e-4 and stats["train/clipfrac"] == 0, stats
    assert abs(stats["loss/policy"] + w) < 1e-4 and abs(stats["loss/kl"]) < 1e-6 and stats["train/zero_adv"] == 0


def test_tempflow_runs_on_shapes_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = run("tempflow_grpo.py", *TINY, "--out", str(out))
    assert "done: 2 iterations" in proc.stdout
    run("tempflow_grpo.py", *TINY[2:], "--steps", "3", "--resume", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # 2 prompts x 1 seed x 2 children at each of the 2 branching steps of a 3-step schedule
    assert [r["samples"] for r in train] == [8, 16, 24]
    for key in ("loss/policy", "loss/kl", "train/ratio", "train/clipfrac", "train/zero_adv", "adv/abs_mean"):
        assert key in train[-1], key
    assert (out / "eval_00003.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--branch-steps", "3"], "--branch-steps between 0 (all) and num_steps - 1 = 2 are required"),
    (["--group-size", "1"], "at least 2 images"),
])
def test_bad_arguments_fail_clearly(tmp_path, args, message):
    proc = run("tempflow_grpo.py", *TINY, *args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_update_raises_the_rewarded_childs_log_prob(trainable_policy):
    """Two children of one state, advantages +1 and -1: one step of the update widens their log-prob gap."""
    policy = trainable_policy
    args = tf.Args(shift=3.0, group_size=2, num_steps=3, branch_steps=1, minibatches=1, clip_range=10.0, beta=0.0, guidance=1.0)
    gen = torch.Generator().manual_seed(2)
    batch = tf.sample_batch(policy, ["two circles"], {}, args, gen, torch.Generator().manual_seed(1))
    k, x, sig = int(batch["steps"][0]), batch["states"][:1].expand(2, -1, -1, -1), batch["sigmas"]

    def gap():
        with torch.no_grad():
            v = policy.velocity(x, sig[k], policy.encode(["two circles"] * 2), 1.0)
            lp = sde_step(x, v, sig[k], sig[k + 1], 0.7, prev_sample=batch["next"][0]).log_prob
        return (lp[0] - lp[1]).item()

    before = gap()
    tf.train_on_batch(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-3), batch,
                      torch.tensor([[1.0, -1.0]]), {}, args, gen)
    assert gap() > before
