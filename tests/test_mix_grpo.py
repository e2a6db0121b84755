"""mix_grpo.py: the sliding window, the Flash schedule and solver (against diffusers' DPM-Solver++ and a
fine Euler solution), multi-reward advantages, window-only training, and the script end to end."""

import pytest
import torch
from test_flow_grpo import TINY, records, run
from test_sampler import GaussianData, diffusers_dpm_solver_run, group_zscores

import mix_grpo
from common import sigma_schedule


def starts(args, n):
    return [mix_grpo.window_start(m, args, torch.Generator().manual_seed(m)) for m in range(n)]


def test_progressive_window_moves_by_stride_every_interval_and_stops_at_t_minus_w():
    args = mix_grpo.Args(num_steps=10, window_size=4, window_interval=3, window_stride=1)
    assert starts(args, 24) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3 + [5] * 3 + [6] * 6
    args = mix_grpo.Args(num_steps=10, window_size=4, window_interval=2, window_stride=4)
    assert starts(args, 6) == [0, 0, 4, 4, 6, 6]


def test_frozen_random_and_flash_frozen_windows():
    assert set(starts(mix_grpo.Args(window_strategy="frozen"), 50)) == {0}
    assert set(starts(mix_grpo.Args(flash_frozen=True, window_interval=1), 50)) == {0}
    seen = starts(mix_grpo.Args(num_steps=10, window_size=4, window_strategy="random"), 200)
    assert set(seen) == set(range(5))  # every l in [0, T - 2 - w] (the reference's range), nothing outside
    with pytest.raises(SystemExit, match="at most --num-steps - 2"):
        mix_grpo.Args(num_steps=5, window_size=4, window_strategy="random")


@pytest.mark.parametrize("end,ratio,n_steps", [(4, 0.4, 2), (4, 0.2, 1), (2, 0.5, 4), (9, 0.4, 1), (10, 0.4, 0)])
def test_flash_schedule(end, ratio, n_steps):
    sigmas = sigma_schedule(10, 3.0)
    post = mix_grpo.flash_sigmas(sigmas, end, ratio, 3.0)
    assert len(post) == n_steps + 1 and post[0] == pytest.approx(float(sigmas[end]), abs=1e-6) and post[-1] == 0
    assert (post[1:] < post[:-1]).all()
    s = post.double() / (3.0 - 2.0 * post.double())  # unshifted: evenly spaced
    if n_steps > 1:
        assert torch.allclose(s[1:] - s[:-1], (s[1] - s[0]).expand(n_steps), atol=1e-6)


def test_dpm_solver_matches_diffusers_dpmsolver_multistep():
    """Our DPM-Solver++(2M) loop on diffusers' flow sigmas equals DPMSolverMultistepScheduler (midpoint,
    first-order first and last steps), with the exact Gaussian velocity as the model."""
    data, x, sigmas, ref = diffusers_dpm_solver_run()
    ours = mix_grpo.flash_finish(data, None, x, sigmas, None, None, 1.0)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_dpm_first_order_step_is_euler():
    x, v = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = mix_grpo.dpm_solver_step(x, x - 0.7 * v, None, None, 0.7, 0.4)
    assert torch.allclose(out, x + (0.4 - 0.7) * v)


@pytest.mark.parametrize("n,history", [(3, False), (5, False), (2, True), (4, True)])
def test_dpm_solver_beats_euler_with_the_same_steps(n, history):
    """From sigma = 0.75 to 0, against a 4,000-step Euler solution of the same ODE. With `history`, the
    multistep history holds the x0-prediction at sigma = 0.9, as the window's last step gives Flash."""
    data = GaussianData(torch.tensor([1.5, -0.5, 0.0, 2.0]), torch.tensor([0.5, 1.0, 2.0, 0.2]))
    start = torch.randn(256, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def euler(y, hi, lo, k):
        sig = torch.linspace(hi, lo, k + 1, dtype=torch.float64)
        for i in range(k):
            y = y + (sig[i + 1] - sig[i]) * data.velocity(y, sig[i], None, 1.0)
        return y

    x = euler(start, 0.9, 0.75, 200) if history else start
    x0_prev = start - 0.9 * data.velocity(start, 0.9, None, 1.0) if history else None
    truth, coarse = euler(x, 0.75, 0.0, 4000), euler(x, 0.75, 0.0, n)
    dpm = mix_grpo.flash_finish(data, None, x, torch.linspace(0.75, 0.0, n + 1, dtype=torch.float64), x0_prev,
                                0.9 if history else None, 1.0)
    assert (dpm - truth).abs().mean() < 0.7 * (coarse - truth).abs().mean()


def test_multi_reward_advantages_sum_or_mean_of_per_reward_zscores():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    a, b = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 8.0]), torch.tensor([10.0, 0.0, 20.0, -1.0, 1.0, 0.0])

    def z(r):
        return group_zscores(r, groups)

    batch, total = {"groups": groups}, a + 0.5 * b
    info = {"shapes": a, "jpeg_compressibility": b}
    args = mix_grpo.Args(reward="shapes:1,jpeg_compressibility:0.5")
    assert torch.allclose(mix_grpo.compute_advantages(batch, total, info, args), z(a) + 0.5 * z(b), atol=1e-5)
    args.reward_aggregation = "mean"
    assert torch.allclose(mix_grpo.compute_advantages(batch, total, info, args), (z(a) + 0.5 * z(b)) / 1.5, atol=1e-5)
    args = mix_grpo.Args(reward="shapes")  # one reward: plain GRPO, clipped
    assert torch.allclose(mix_grpo.compute_advantages(batch, 100 * a, {}, args), z(100 * a).clamp(-5, 5), atol=1e-5)


@pytest.mark.parametrize("flash", [False, True])
def test_sampling_shares_the_noise_and_trains_only_the_window(trainable_policy, flash):
    policy = trainable_policy
    args = mix_grpo.Args(shift=3.0, group_size=3, num_steps=6, window_size=2, window_interval=1, flash=flash, minibatches=1,
                         beta=0.0)
    state = {"iteration": 2}  # progressive, tau = 1: the window is {2, 3}
    gen = torch.Generator().manual_seed(0)
    batch = mix_grpo.sample_batch(policy, ["a circle", "two squares"], state, args, gen,
                                  torch.Generator().manual_seed(1))
    lat = batch["latents"]
    assert list(batch["window"]) == [2, 3] and state["iteration"] == 3
    assert torch.equal(lat[0, :3], lat[2, :3]) and not torch.equal(lat[0, 0], lat[3, 0])  # ODE up to the window
    assert not torch.equal(lat[0, 4], lat[1, 4])  # the window's noise differs
    assert (batch["log_probs"][:, :2] == 0).all() and (batch["log_probs"][:, 2:4] != 0).all()
    assert batch["nfe"] == (4 + 1 if flash else 6)  # Flash: 2 steps after the window -> round(0.4 * 2) = 1
    seen = []
    velocity = policy.velocity
    policy.velocity = lambda x, s, c, g: seen.append(round(float(s), 6)) or velocity(x, s, c, g)
    try:
        opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)
        stats = mix_grpo.train_on_batch(policy, opt, batch, torch.randn(6), {}, args, gen)
    finally:
        policy.velocity = velocity
    sig = batch["sigmas"]
    assert seen == [round(float(sig[2]), 6), round(float(sig[3]), 6)]  # one pass per window step, nothing else
    assert stats["train/ratio"] == pytest.approx(1.0, abs=1e-4) and stats["window/start"] == 2


def test_runs_with_flash_and_resumes_the_window(tmp_path):
    out = tmp_path / "run"
    common = ["--num-steps", "4", "--window-size", "2", "--window-interval", "1"]
    run("mix_grpo.py", *TINY, *common, "--flash", "--out", str(out))
    run("mix_grpo.py", *TINY[2:], *common, "--flash", "--steps", "3", "--resume", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["window/start"] for r in train] == [0, 1, 2]  # l = min(iteration, T - w), continued after resume
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["sample/nfe"] <= 4 for r in train)


def test_bad_window_is_a_clear_error(tmp_path):
    proc = run("mix_grpo.py", *TINY, "--window-size", "5", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "--window-size 5" in proc.stderr + proc.stdout
