"""G²RPO: the granularity schedules (hand-computed) and the reference's x0-prediction ending, the multi-
granularity advantage against an independent computation, one forward pass per branching state, the script."""

import numpy as np
import pytest
import torch

import g2rpo
from common import rollout, sigma_schedule
from test_flow_grpo import TINY, records, run


@pytest.mark.parametrize("k,lam,indices", [
    (0, 1, [0, 1, 2, 3, 4, 5, 6]),
    (0, 2, [0, 1, 2, 4, 6]),      # lands on sigma_6 = 0
    (1, 2, [0, 1, 2, 3, 6]),      # sigma[3::2] = 3, 5: the last evaluated point is 3, then the jump to 0
    (0, 3, [0, 1, 2, 6]),         # sigma[2::3] = 2, 5: evaluated at 1 (one base step) and 2, jump to 0
    (2, 3, [0, 1, 2, 3, 6]),      # sigma[4::3] = 4: the base step 3 -> 4 is the last pair, so 3 jumps to 0
    (4, 2, [0, 1, 2, 3, 4, 5, 6]),
])
def test_granular_schedules_for_six_steps(k, lam, indices):
    sig = sigma_schedule(6, 3.0)
    assert torch.equal(g2rpo.granular_schedule(sig, k, lam), sig[indices])


@pytest.mark.parametrize("k,lam", [(1, 2), (0, 3), (0, 2)])
def test_completion_ends_with_the_references_x0_prediction(tiny_shapes_policy, k, lam):
    """The reference runs the ODE on sigma[:k+2] ++ sigma[k+2::lam] from k+1 and returns x - s v at the last point
    it evaluates; rollout on granular_schedule must give the same image."""
    policy, sig = tiny_shapes_policy, sigma_schedule(6, 3.0)
    cond = policy.encode(["a circle", "two squares"])
    y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref_sched = torch.cat([sig[:k + 2], sig[k + 2::lam]])
    with torch.no_grad():
        z = y
        for i in range(k + 1, len(ref_sched) - 1):  # every pair but the last is an Euler step
            v = policy.velocity(z, ref_sched[i], cond, 1.0)
            x0 = z - ref_sched[i] * v
            z = z + v * (ref_sched[i + 1] - ref_sched[i])
        out = rollout(policy, cond, y, g2rpo.granular_schedule(sig, k, lam), [0.0] * 6, 1.0, start=k + 1)
    assert torch.allclose(out.latents[:, -1], x0, atol=1e-5)


def test_multi_granularity_advantages_match_an_independent_computation():
    P, G, J, n_k = 2, 4, 3, 2  # prompts, children, granularities, branching steps
    batch = {"log_probs": torch.zeros(n_k * P, G)}
    rewards = torch.rand(n_k * P * G * J, generator=torch.Generator().manual_seed(0))
    r = rewards.numpy().astype(np.float64).reshape(n_k * P, G, J)  # images ordered (parent, child, lambda)
    r[1, :, 0] = 0.25  # one granularity where every child scored alike: it adds nothing
    rewards = torch.tensor(r.flatten(), dtype=torch.float32)
    ref = np.zeros((n_k * P, G))
    for parent in range(n_k * P):
        for j in range(J):
            x = r[parent, :, j]
            ref[parent] += (x - x.mean()) / (x.std(ddof=1) + 1e-8)
    adv = g2rpo.compute_advantages(batch, rewards, {}, g2rpo.Args(granularities=(1, 2, 3)))
    assert np.allclose(adv.numpy(), np.clip(ref, -5, 5), atol=1e-4)
    adv = g2rpo.compute_advantages(batch, rewards, {}, g2rpo.Args(granularities=(1, 2, 3), adv_clip=1.0))
    assert np.allclose(adv.numpy(), np.clip(ref, -1, 1), atol=1e-4) and (np.abs(ref) > 1).any()


def test_several_rewards_are_z_scored_each_then_added():
    """hpsv2:1,clipscore:0.5 as the reference (train_g2rpo_hps_clip.py): each reward's group z-score on its own,
    then the weighted sum, not one z-score of the weighted reward sum."""
    P, G, J = 2, 4, 2
    batch = {"log_probs": torch.zeros(P, G)}
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(P * G * J, generator=gen), 100 * torch.rand(P * G * J, generator=gen)  # b on a larger scale

    def z(x):
        x = x.double().view(P, G, J)
        return ((x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-8)).sum(2)

    args = g2rpo.Args(granularities=(1, 2), reward="hpsv2:1,clipscore:0.5", adv_clip=100.0)
    adv = g2rpo.compute_advantages(batch, a + 0.5 * b, {"hpsv2": a, "clipscore": b}, args)
    assert torch.allclose(adv.double(), z(a) + 0.5 * z(b), atol=1e-5)
    assert not torch.allclose(adv.double(), z(a + 0.5 * b), atol=1e-2)


def test_branching_layout_and_bad_arguments(tiny_shapes_policy):
    args = g2rpo.Args(shift=3.0, group_size=3, num_steps=6, granularities=(1, 2), guidance=1.0)
    assert g2rpo.branch_steps(args) == [0, 1, 2] and g2rpo.branch_steps(g2rpo.Args(branch_steps=(2, 5))) == [2, 5]
    batch = g2rpo.sample_batch(tiny_shapes_policy, ["a circle", "a square"], {}, args,
                               torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert batch["steps"].tolist() == [0, 0, 1, 1, 2, 2] and batch["prompt"].tolist() == [0, 1] * 3
    assert batch["next"].shape[:2] == (6, 3) and len(batch["images"]) == 6 * 3 * 2
    assert batch["prompts"][:6] == ["a circle"] * 6 and batch["prompts"][6:12] == ["a square"] * 6
    x, sig = batch["states"], batch["sigmas"]
    with torch.no_grad():  # the anchor is the ODE: x_1 = x_0 + v dt
        v = tiny_shapes_policy.velocity(x[:2], sig[0], tiny_shapes_policy.encode(["a circle", "a square"]), 1.0)
    assert torch.allclose(x[2:4], x[:2] + v * (sig[1] - sig[0]), atol=1e-5)
    assert not torch.equal(batch["next"][0, 0], batch["next"][0, 1])  # children differ by their SDE noise
    with pytest.raises(SystemExit, match="branch-steps"):
        g2rpo.Args(num_steps=6, branch_steps=(5,))
    with pytest.raises(SystemExit, match="granularities"):
        g2rpo.Args(granularities=(0, 1))


def test_one_forward_per_branching_state_one_step_per_k_and_on_policy_ratio(trainable_policy):
    policy = trainable_policy
    args = g2rpo.Args(shift=3.0, group_size=3, num_steps=4, branch_steps=(0, 1), granularities=(1, 2), minibatches=2,
                      guidance=1.0)
    gen = torch.Generator().manual_seed(1)
    batch = g2rpo.sample_batch(policy, ["a circle", "three triangles"], {}, args, gen,
                               torch.Generator().manual_seed(1))
    adv = torch.ones_like(batch["log_probs"])
    events = []
    velocity = policy.velocity
    policy.velocity = lambda x, sigma, *a: events.append((len(x), round(float(sigma), 4))) or velocity(x, sigma, *a)
    try:
        opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
        opt.step = lambda: events.append("step")
        stats = g2rpo.train_on_batch(policy, opt, batch, adv, {}, args, gen)
    finally:
        del policy.velocity
    sig = [round(float(s), 4) for s in batch["sigmas"]]
    # per k: one pass over the 2 parent states (not 2 x 3 children), then the optimiser step; k in order
    assert events == [(2, sig[0]), "step", (2, sig[1]), "step"]
    assert abs(stats["train/ratio"] - 1) < 1e-4 and stats["train/clipfrac"] == 0
    assert abs(stats["loss/policy"] + 1) < 1e-4  # A = 1, rho = 1


def test_g2rpo_runs_on_shapes_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = run("g2rpo.py", *TINY, "--granularities", "1", "2", "--beta", "0.01", "--out", str(out))
    assert "done: 2 iterations" in proc.stdout
    run("g2rpo.py", *TINY[2:], "--granularities", "1", "2", "--steps", "3", "--resume", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # 2 prompts x 2 children x 2 granularities at the one branching step (k = 0) of a 3-step schedule
    assert [r["samples"] for r in train] == [8, 16, 24]
    assert all(r["loss/kl"] >= 0 for r in train)  # the KL path ran (beta 0.01 for the first 2)
    for key in ("loss/policy", "train/ratio", "train/clipfrac", "train/zero_adv", "adv/abs_mean"):
        assert key in train[-1], key


@pytest.mark.parametrize("args,message", [
    (["--branch-steps", "0", "2"], "num_steps - 2 = 1"),
    (["--granularities", "0"], "distinct strides >= 1"),
])
def test_bad_arguments_fail_clearly(tmp_path, args, message):
    proc = run("g2rpo.py", *TINY, *args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_update_raises_the_rewarded_childs_log_prob(trainable_policy):
    """Two children of one anchor state, advantages +1 and -1: one step of the update widens their log-prob gap."""
    from common import sde_step

    policy = trainable_policy
    args = g2rpo.Args(shift=3.0, group_size=2, num_steps=3, granularities=(1,), minibatches=1, clip_range=10.0, guidance=1.0)
    gen = torch.Generator().manual_seed(2)
    batch = g2rpo.sample_batch(policy, ["two circles"], {}, args, gen, torch.Generator().manual_seed(1))
    x, sig = batch["states"][:1].expand(2, -1, -1, -1), batch["sigmas"]  # k = 0, the one branching step

    def gap():
        with torch.no_grad():
            v = policy.velocity(x, sig[0], policy.encode(["two circles"] * 2), 1.0)
            lp = sde_step(x, v, sig[0], sig[1], 0.7, prev_sample=batch["next"][0]).log_prob
        return (lp[0] - lp[1]).item()

    before = gap()
    g2rpo.train_on_batch(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1e-3), batch,
                         torch.tensor([[1.0, -1.0]]), {}, args, gen)
    assert gap() > before


def test_equal_rewards_give_zero_advantage_despite_rounding():
    """12 equal rewards of 1/3: float32's mean is off by ~6e-8, which std + 1e-8 would turn into advantages of
    ~0.8; in float64 they are exactly 0, so a group that scored alike teaches nothing (and is skipped)."""
    rewards = torch.full((12,), 1 / 3)
    adv = g2rpo.compute_advantages({"log_probs": torch.zeros(1, 12)}, rewards, {}, g2rpo.Args(granularities=(1,)))
    assert (adv == 0).all()
