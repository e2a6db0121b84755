"""DiffusionNFT: the loss against an independent float64 computation, its gradient where the answer is known
(r = 1: flow matching on the samples; r = 0: away from the target), the old policy (its decay, the rollouts it
makes, the live weights restored), the deterministic solvers, and runs on shapes, tiny SD3 and tiny FLUX."""

import contextlib
import json
import math

import pytest
import torch

import diffusion_nft as nft
from common import flow_matching_loss, load_policy, sigma_schedule
from test_flow_grpo import TINY, records, run
from test_sampler import diffusers_dpm_solver_run


class LinearPolicy:
    """A float64 stand-in for the policy: v = x W^T + t c, the trainable weights W, the base W0."""

    def __init__(self, dim=6):
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.W0 = self.W.detach() + 0.1 * torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.c = torch.randn(dim, generator=g, dtype=torch.float64)
        self.base = False

    def trainable_parameters(self):
        return [self.W]

    @contextlib.contextmanager
    def reference(self):
        self.base = True
        try:
            yield
        finally:
            self.base = False

    def velocity(self, x, t, cond, guidance):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return x @ (self.W0 if self.base else self.W).T + t * self.c


def test_loss_matches_an_independent_float64_computation():
    policy, g = LinearPolicy(), torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.45, 0.1], dtype=torch.float64)
    adv = torch.tensor([1.0, 0.3, -0.6, -1.0], dtype=torch.float64)
    w_old = policy.W.detach() + 0.05 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    for b in (1.0, 0.1):
        args = nft.Args(nft_beta=b, beta=0.3, adv_clip=5.0)
        pol, kl, dev = nft.nft_terms(policy, None, x0, adv, t, eps, {"old": [w_old]}, args)
        (grad,) = torch.autograd.grad((pol + args.beta * kl).sum(), policy.W)
        # the reference's formulas, re-typed: implicit policies, x0 predictions, self-normalising weights
        W = policy.W.detach().clone().requires_grad_(True)
        tt = t[:, None]
        x_t = (1 - tt) * x0 + tt * eps
        v, v_old, v_ref = x_t @ W.T + tt * policy.c, x_t @ w_old.T + tt * policy.c, x_t @ policy.W0.T + tt * policy.c
        v_pos, v_neg = b * v + (1 - b) * v_old, (1 + b) * v_old - b * v
        r = torch.clamp((adv * 5).clamp(-5, 5) / 5 / 2 + 0.5, 0, 1)
        pos_err, neg_err = x_t - tt * v_pos - x0, x_t - tt * v_neg - x0
        pos = (pos_err**2).mean(1) / pos_err.abs().mean(1).detach().clamp(min=1e-5)
        neg = (neg_err**2).mean(1) / neg_err.abs().mean(1).detach().clamp(min=1e-5)
        ref_pol = (r * pos / b + (1 - r) * neg / b) * 5
        ref_kl = ((v - v_ref) ** 2).mean(1)
        (ref_grad,) = torch.autograd.grad((ref_pol + 0.3 * ref_kl).sum(), W)
        assert pol.dtype == torch.float64
        assert torch.allclose(pol, ref_pol.detach(), rtol=1e-10) and torch.allclose(kl, ref_kl.detach(), rtol=1e-10)
        assert torch.allclose(dev, ((v - v_old) ** 2).mean(1).detach(), rtol=1e-10)
        assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


def shapes_case(policy, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    cond = policy.encode(["a red circle", "two blue squares", "a green triangle above a red circle"][:n])
    return cond, x0, eps, torch.tensor([1.0, 0.7, 0.3])[:n]


def grads(policy, loss):
    params = policy.trainable_parameters()
    out = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


def test_unit_rewards_give_the_flow_matching_loss_scaled(trainable_policy):
    """r = 1 and v_old = v_theta: the loss is 5 t ||v - (eps - x0)||^2 / sg(mean |v - (eps - x0)|) / b per sample,
    the flow-matching loss times a per-sample constant; its gradient is the same for every b."""
    policy = trainable_policy
    cond, x0, eps, t = shapes_case(policy)
    state = nft.init_state(policy, nft.Args())  # old = theta
    # independently: pretrain.py's denoiser call and common's flow-matching loss
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = policy.denoiser(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond["hidden"],
                        pooled_projections=cond["pooled"]).sample
    scale = 5 * t / (v - (eps - x0)).abs().mean(dim=(1, 2, 3)).detach()
    ref = scale * flow_matching_loss(v, x0, eps)
    ref_grads = grads(policy, ref.sum())
    for b in (1.0, 0.3):
        loss = nft.nft_terms(policy, cond, x0, torch.ones(3), t, eps, state, nft.Args(nft_beta=b, beta=0.0))[0]
        assert torch.allclose(loss * b, ref.detach(), rtol=1e-4), (b, loss, ref)
        for a, r in zip(grads(policy, loss.sum()), ref_grads):
            assert torch.allclose(a, r, rtol=1e-3, atol=1e-6 * r.abs().max()), b


def test_zero_rewards_push_v_theta_away_from_the_target(trainable_policy):
    """On-policy (v_old = v_theta) the r = 0 gradient is exactly minus the r = 1 one; one SGD step lowers the
    flow-matching error of the r = 1 sample and raises that of the r = 0 sample."""
    policy = trainable_policy
    cond, x0, eps, t = shapes_case(policy, n=2)
    args = nft.Args(beta=0.0)
    state = nft.init_state(policy, args)
    pos = grads(policy, nft.nft_terms(policy, cond, x0, torch.ones(2), t, eps, state, args)[0].sum())
    neg = grads(policy, nft.nft_terms(policy, cond, x0, -torch.ones(2), t, eps, state, args)[0].sum())
    assert all(torch.allclose(n, -p, atol=1e-6 * p.abs().max()) for n, p in zip(neg, pos))

    def fm_error():
        with torch.no_grad():
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
            return flow_matching_loss(policy.velocity(x_t, t, cond, 1.0), x0, eps)

    before = fm_error()
    loss = nft.nft_terms(policy, cond, x0, torch.tensor([1.0, -1.0]), t, eps, state, args)[0].sum()
    with torch.no_grad():
        for p, gr in zip(policy.trainable_parameters(), grads(policy, loss)):
            p -= 1e-3 * gr
    after = fm_error()
    assert after[0] < before[0] and after[1] > before[1], (before, after)


def test_old_policy_decay_schedule():
    geneval = nft.Args()  # min(0.001 k, 0.5)
    ocr = nft.Args(old_decay_rate=0.0075, old_decay_max=0.999, old_decay_delay=75)
    assert [nft.old_decay(k, geneval) for k in (0, 1, 300, 500, 2000)] == pytest.approx([0, 0.001, 0.3, 0.5, 0.5])
    assert [nft.old_decay(k, ocr) for k in (0, 74, 75, 100, 1000)] == pytest.approx([0, 0, 0, 0.1875, 0.999])


def test_rollouts_use_the_old_weights_and_the_old_weights_follow_by_ema(trainable_policy):
    policy = trainable_policy
    args = nft.Args(group_size=2, num_steps=3, minibatches=2, timestep_fraction=0.5, beta=0.1, shift=3.0,
                    old_decay_rate=0.15)
    params = policy.trainable_parameters()
    state = nft.init_state(policy, args)
    with torch.no_grad():  # the old policy and the live weights differ
        state["old"] = [p + 0.02 * torch.randn_like(p) for p in params]
    live = [p.detach().clone() for p in params]
    batch = nft.sample_batch(policy, ["a red circle", "two blue squares"], state, args,
                             torch.Generator().manual_seed(0), torch.Generator())
    assert all(torch.equal(p, q) for p, q in zip(params, live))  # the live weights are back
    sigmas = sigma_schedule(3, 3.0)
    noise = policy.noise(4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p, o in zip(params, state["old"]):
            p.copy_(o)
        by_old = nft.ode_sample(policy, batch["cond"], noise, sigmas, 1.0, True)
        for p, q in zip(params, live):
            p.copy_(q)
        by_live = nft.ode_sample(policy, batch["cond"], noise, sigmas, 1.0, True)
    assert torch.allclose(batch["x0"], by_old, atol=1e-6) and not torch.allclose(batch["x0"], by_live, atol=1e-3)
    # after the update: old <- d old + (1 - d) theta, d from the optimiser steps taken (2 -> d = 0.3)
    old = [o.clone() for o in state["old"]]
    opt = torch.optim.SGD(params, lr=1e-3)
    adv = nft.compute_advantages(batch, torch.tensor([0.0, 1.0, 0.5, 0.2]), {}, args)
    nft.train_on_batch(policy, opt, batch, adv, state, args, torch.Generator().manual_seed(0))
    assert state["updates"] == 2 and not all(torch.equal(p, q) for p, q in zip(params, live))
    for o, o_before, p in zip(state["old"], old, params):
        assert torch.allclose(o, 0.3 * o_before + 0.7 * p.detach(), atol=1e-7)


def test_advantages_are_clipped_and_map_to_r_in_the_unit_interval():
    """One success among 8 groups of 8 images: A = (1 - 1/8) / batch std = 7.05 is clipped to 5, so r = 1 exactly;
    its group's failures get A = -(1/8) / std / 5, and the groups that all failed r = 1/2."""
    batch = {"groups": torch.arange(8).repeat_interleave(8)}
    rewards = torch.zeros(64)
    rewards[3] = 1.0
    adv = nft.compute_advantages(batch, rewards, {}, nft.Args())
    r = (1 + adv) / 2
    std = rewards.double().std(unbiased=False).item()
    assert adv[3] == 1.0 and torch.allclose(adv[[0, 1, 2, 4, 5, 6, 7]], torch.tensor(-1 / 8 / (std + 1e-4) / 5))
    assert ((r >= 0) & (r <= 1)).all() and (r[8:] == 0.5).all()


def test_dpm2_matches_diffusers_and_beats_euler():
    """The second-order sampler equals diffusers' DPMSolverMultistepScheduler (2M, midpoint, first-order last step)
    on its flow sigmas, with the exact Gaussian velocity as the model; on a 10-step grid from t = 1 it is closer to
    the exact ODE solution than Euler; Euler is x + (t_next - t) v step by step."""
    data, x, sigmas, ref = diffusers_dpm_solver_run()
    assert torch.allclose(nft.ode_sample(data, None, x, sigmas, 1.0, True), ref, atol=1e-6)
    # FLUX's grid: on SD3's (last sigma 0.009) the 2M extrapolation over the step 0.28 -> 0.009, whose lambda-interval
    # is 5.5x the previous one, overshoots on this Gaussian (docs/diffusion_nft.md, D1)
    sig = sigma_schedule(10, 3.0, "flux").double()
    exact = data.mu + data.s * x  # the ODE maps x1 = z to mu + s z for Gaussian data
    err2 = (nft.ode_sample(data, None, x, sig, 1.0, True) - exact).abs().mean()
    err1 = (nft.ode_sample(data, None, x, sig, 1.0, False) - exact).abs().mean()
    assert err2 < err1 / 2, (err2, err1)
    y = x.clone()
    for i in range(10):
        y = y + (sig[i + 1] - sig[i]) * data.velocity(y, sig[i], None, 1.0)
    assert torch.allclose(nft.ode_sample(data, None, x, sig, 1.0, False), y, atol=1e-12)


def test_runs_on_shapes_trains_and_resumes(tmp_path):
    out = tmp_path / "run"
    run("diffusion_nft.py", *TINY, "--out", str(out))
    run("diffusion_nft.py", *TINY[2:], "--steps", "3", "--resume", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss/policy"]) and r["loss/kl"] >= 0 and r["train/old_dev"] >= 0 for r in train)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    base = load_policy(None, torch.device("cpu")).denoiser.state_dict()
    moved = max((w - base[n]).abs().max().item() for n, w in ckpt["trainable"].items())
    assert moved > 1e-5 and ckpt["state"]["updates"] == 6  # 3 iterations x 2 minibatches


@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_runs_on_tiny_sd3_and_flux(backend, tmp_path, tiny_sd3_dir, tiny_flux_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a dog\n")
    extra = {"guidance": 3.5, "gradient_checkpointing": True} if backend == "flux" else {"sample_batch": 3}
    args = nft.Args(model=str(tiny_flux_dir if backend == "flux" else tiny_sd3_dir), resolution=64,
                    reward="jpeg_compressibility", prompts=str(prompts), eval_prompts=str(prompts), steps=1,
                    prompts_per_step=2, group_size=2, num_steps=3, eval_num_steps=2, eval_per_prompt=1, eval_every=1,
                    save_every=1, minibatches=1, lora_rank=4, lora_alpha=4.0, threads=1, device="cpu",
                    out=str(tmp_path / "run"), **extra)
    nft.main(args)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward/mean" in r]
    assert len(train) == 1 and math.isfinite(train[0]["loss/policy"]) and train[0]["time/backward"] > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    lora_b = [w for n, w in ckpt["trainable"].items() if "lora_B" in n]
    assert lora_b and max(w.abs().max().item() for w in lora_b) > 0  # B starts at zero: the adapter trained
