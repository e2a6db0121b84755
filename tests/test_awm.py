"""AWM: the loss is the pre-training loss re-weighted, its pieces match the reference, the script runs."""

import math

import torch

import awm
from common import sigma_schedule
from test_flow_grpo import TINY, records, run


def test_awm_loss_with_unit_advantages_is_the_pretraining_loss(tiny_shapes_policy):
    policy = tiny_shapes_policy
    args = awm.Args(weighting="mse", beta=0.0, ema_kl_beta=0.0, guidance=1.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    cond = policy.encode(["a circle", "two squares", "a red square", "a circle left of a square"])
    t = torch.tensor(0.7)
    with torch.no_grad():
        loss = awm.awm_terms(policy, cond, x0, torch.ones(4), t, noise, {}, args)[0].mean()
        # pretrain.py's objective, written out: v = transformer(x_t, 1000 t | c), ||v - (eps - x0)||^2
        x_t = (1 - t) * x0 + t * noise
        v = policy.denoiser(hidden_states=x_t, timestep=(t * 1000).expand(4), encoder_hidden_states=cond["hidden"],
                            pooled_projections=cond["pooled"]).sample
        ref = ((v - (noise - x0)) ** 2).mean()
    assert torch.allclose(loss, ref, rtol=1e-5)


def test_awm_gradient_moves_away_from_low_advantage_samples(trainable_policy):
    policy = trainable_policy
    args = awm.Args(weighting="mse", beta=0.0, ema_kl_beta=0.0, guidance=1.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = policy.encode(["a circle", "a circle"])
    adv, t = torch.tensor([1.0, -1.0]), torch.tensor(0.6)

    def per_sample():
        with torch.no_grad():
            v = policy.velocity((1 - t) * x0 + t * noise, t, cond, 1.0)
            return ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))

    before = per_sample()
    loss = awm.awm_terms(policy, cond, x0, adv, t, noise, {}, args)[0].mean()
    loss.backward()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p -= 1e-3 * p.grad
    after = per_sample()
    assert after[0] < before[0] and after[1] > before[1], (before, after)


def test_ghuber_weighting_matches_formula():
    args = awm.Args(weighting="ghuber", ghuber_power=0.25)
    mse, t = torch.tensor([0.01, 0.5, 2.0], dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    ref = [0.4 * ((m + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25 for m in mse.tolist()]
    assert torch.allclose(awm.weighted_error(mse, t, args), torch.tensor(ref, dtype=torch.float64))
    assert torch.equal(awm.weighted_error(mse, t, awm.Args(weighting="mse")), mse)


def test_stratified_timesteps_match_the_reference_grid():
    """14 steps, fraction 0.9, K = 6: strata [1,2) [2,4) [4,6) [6,8) [8,10) [10,12), t = 1 never drawn."""
    args = awm.Args(num_steps=14, timestep_fraction=0.9, train_timesteps=6)
    sig = sigma_schedule(14, 3.0)
    strata = [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ts = awm.train_timesteps(sig, args, g)
        idx = [int((sig - t).abs().argmin()) for t in ts]
        assert all(a <= i < b for i, (a, b) in zip(idx, strata)), idx
        seen.update(idx)
    assert seen == set(range(1, 12))


def test_sde_window_and_advantage_scaling():
    args = awm.Args(noise_level=0.4, num_steps=14)
    sig = sigma_schedule(14, 3.0)
    levels = awm.noise_levels(sig, args)
    assert [lv > 0 for lv in levels] == [0.3 <= float(s) <= 0.9 for s in sig[:-1]]
    assert sum(lv > 0 for lv in levels) > 0 and levels[0] == 0
    batch = {"groups": torch.tensor([0, 0, 1, 1])}
    adv = awm.compute_advantages(batch, torch.tensor([0.0, 1.0, 0.0, 100.0]), {}, args)
    assert adv.abs().max() <= 1 and math.isclose(float(adv[3]), -float(adv[2]), rel_tol=1e-5)


def test_awm_runs_on_shapes_resumes_and_on_tiny_sd3(tmp_path, tiny_sd3_dir):
    out = tmp_path / "run"
    run("awm.py", *TINY, "--train-timesteps", "2", "--out", str(out))
    run("awm.py", *TINY[2:], "--train-timesteps", "2", "--steps", "3", "--resume", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and train[-1]["loss/kl_ema"] >= 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na photo of a dog\n")
    run("awm.py", *TINY, "--model", str(tiny_sd3_dir), "--resolution", "64", "--reward", "jpeg_compressibility",
        "--prompts", str(prompts), "--eval-prompts", str(prompts), "--lora-rank", "4", "--lora-alpha", "4",
        "--train-timesteps", "2", "--noise-level", "0.4", "--out", str(tmp_path / "sd3"))
