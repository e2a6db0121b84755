"""The update layer pinned against independent computations (issue 18): the PPO-clipped surrogate of the four
GRPO scripts (value and gradient, both signs of A, ratios on both sides of the clip), their KL to the reference
(the reference code's form = the exact KL of the two Gaussian steps times |dt|), Policy.reference() on both
paths, the EMA, CLIP preprocessing against transformers' image processor, and group advantages.

Every expected value here is re-typed from the formula (float64 where possible), never taken from the helper
under test. docs/testing.md lists the mutations each test catches."""

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

import common
import flow_grpo
import g2rpo
import mix_grpo
import tempflow_grpo

NUM_STEPS, SHIFT, NOISE, EPS = 4, 3.0, 0.7, 0.2
RATIOS = [0.5, 0.95, 1.0, 1.05, 1.5]  # 0.5 and 1.5 lie outside [1 - EPS, 1 + EPS], the others inside
ADVS = [1.3, -0.7]  # one positive, one negative advantage; each meets every ratio
SHAPE = (3, 4, 4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on this shared 2-core machine a UNet call took 2.4 s with two threads, 0.06 s with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Independent re-typing of one SDE step (float64) and of the clipped objective
# ----------------------------------------------------------------------------------------------
def sigma_t(t: float, t_next: float) -> float:
    """a sqrt(t / (1 - t)), 1 - t replaced by 1 - t_next at t = 1."""
    return NOISE * math.sqrt(t / (1 - (t_next if t == 1.0 else t)))


def step_mean(x, v, t: float, t_next: float):
    s, dt = sigma_t(t, t_next), t_next - t
    return x + (v + s**2 / (2 * t) * (x + (1 - t) * v)) * dt


def step_std(t: float, t_next: float) -> float:
    return sigma_t(t, t_next) * math.sqrt(t - t_next)


def mean_dims(z):
    return z.mean(dim=tuple(range(1, z.ndim)))


def clipped_objective(a, r, eps):
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)), re-typed."""
    return torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))


class FakePolicy:
    """A policy whose velocity is a given tensor: the live one, or the reference's inside reference()."""

    device = torch.device("cpu")

    def __init__(self, v_live, v_ref=None):
        self.v_live, self.v_ref, self.in_reference = v_live, v_ref, False

    def velocity(self, x, sigma, cond, guidance, *rest, **kw):
        v = self.v_ref if self.in_reference else self.v_live
        assert v is not None and v.shape == x.shape, "the fake velocity was asked for another batch"
        return v

    @contextlib.contextmanager
    def reference(self):
        self.in_reference = True
        try:
            yield
        finally:
            self.in_reference = False


def _grid():
    """Rows of (advantage, target ratio): every ratio with every advantage sign."""
    a = torch.tensor([a for a in ADVS for _ in RATIOS], dtype=torch.float64)
    r = torch.tensor([r for _ in ADVS for r in RATIOS], dtype=torch.float64)
    return a, r


def _sigmas():
    sig = common.sigma_schedule(NUM_STEPS, SHIFT)
    assert float(sig[0]) == 1.0
    return sig


def _flat_case(j: int, seed: int = 0):
    """flow_grpo / mix_grpo: a batch of 10 images at step j whose stored (old) log-probs give the target ratios.
    Returns the batch, advantages, target ratios, the live velocity (a leaf), x, x_next and the new log-prob (f64)."""
    g = torch.Generator().manual_seed(seed)
    a, r = _grid()
    n, sig = len(a), _sigmas()
    t, t_next = float(sig[j]), float(sig[j + 1])
    latents = torch.randn(n, NUM_STEPS + 1, *SHAPE, generator=g)
    v = torch.randn(n, *SHAPE, generator=g)
    x = latents[:, j].double()
    mean = step_mean(x, v.double(), t, t_next)
    x_next = mean + step_std(t, t_next) * torch.randn(n, *SHAPE, generator=g).double()
    latents[:, j + 1] = x_next.float()
    x_next = latents[:, j + 1].double()  # what the script sees
    lp = mean_dims(Normal(mean, step_std(t, t_next)).log_prob(x_next))
    log_probs = torch.zeros(n, NUM_STEPS)
    log_probs[:, j] = (lp - torch.log(r)).float()  # pi_old chosen so that pi_theta / pi_old = r
    batch = {"sigmas": sig, "cond": {"hidden": torch.zeros(n, 2)}, "latents": latents, "log_probs": log_probs,
             "prompts": ["p"] * n}
    return batch, a, r, v, x, x_next


def _child_case(k: int, seed: int = 0):
    """g2rpo / tempflow: 2 parent states at step k with 5 children each; advantages (parents, children)."""
    g = torch.Generator().manual_seed(seed)
    a, r = _grid()
    p, c, sig = len(ADVS), len(RATIOS), _sigmas()
    t, t_next = float(sig[k]), float(sig[k + 1])
    states = torch.randn(p, *SHAPE, generator=g)
    v = torch.randn(p, *SHAPE, generator=g)
    x = states.double().repeat_interleave(c, 0)
    mean = step_mean(x, v.double().repeat_interleave(c, 0), t, t_next)
    nxt = (mean + step_std(t, t_next) * torch.randn(p * c, *SHAPE, generator=g).double()).float()
    x_next = nxt.double()
    lp = mean_dims(Normal(mean, step_std(t, t_next)).log_prob(x_next))
    batch = {"sigmas": sig, "cond": {"hidden": torch.zeros(p, 2)}, "prompt": torch.arange(p), "states": states,
             "next": nxt.view(p, c, *SHAPE), "log_probs": (lp - torch.log(r)).float().view(p, c),
             "steps": torch.full((p,), k)}
    return batch, a, r, v, x, x_next


def _expected(a, r_target, v_leaf, x, x_next, old, t, t_next, parents_of=None):
    """The clipped objective per row and its gradient with respect to the velocity, in float64."""
    v64 = v_leaf.detach().double().requires_grad_(True)
    vv = v64 if parents_of is None else v64.repeat_interleave(parents_of, 0)
    mean = step_mean(x, vv, t, t_next)
    lp = mean_dims(Normal(mean, step_std(t, t_next)).log_prob(x_next))
    ratio = torch.exp(lp - old)
    value = clipped_objective(a, ratio, EPS)
    value.sum().backward()
    return value.detach(), v64.grad, ratio.detach()


TERMS = {
    "flow_grpo": lambda pol, b, a, j, args: flow_grpo.ppo_terms(pol, b, torch.arange(len(a)), j, a, args),
    "mix_grpo": lambda pol, b, a, j, args: mix_grpo.ppo_terms(pol, b, torch.arange(len(a)), j, a, args),
    "g2rpo": lambda pol, b, a, k, args: g2rpo.child_terms(pol, b, torch.arange(len(ADVS)), a, k, args),
    "tempflow_grpo": lambda pol, b, a, k, args: tempflow_grpo.child_terms(pol, b, torch.arange(len(ADVS)), a, k,
                                                                          0.6, args),
}
MODULES = {"flow_grpo": flow_grpo, "mix_grpo": mix_grpo, "g2rpo": g2rpo, "tempflow_grpo": tempflow_grpo}


def _call(name, j, beta, v_ref_shift=None, seed=0):
    """Run the script's per-step term function on a hand-built case; return what it gives and the case."""
    args = MODULES[name].Args(clip_range=EPS, beta=beta, noise_level=NOISE, num_steps=NUM_STEPS, shift=SHIFT,
                              guidance=1.0)
    branching = name in ("g2rpo", "tempflow_grpo")
    batch, a, r, v, x, x_next = (_child_case if branching else _flat_case)(j, seed)
    leaf = v.clone().requires_grad_(True)
    v_ref = None if v_ref_shift is None else v + v_ref_shift(v)
    adv = a.float().view(len(ADVS), len(RATIOS)) if branching else a.float()
    out = TERMS[name](FakePolicy(leaf, v_ref), batch, adv, j, args)
    old = batch["log_probs"].flatten().double() if branching else batch["log_probs"][:, j].double()
    return out, leaf, (a, r, v, x, x_next, old, batch["sigmas"], branching)


@pytest.mark.parametrize("name", list(TERMS))
@pytest.mark.parametrize("j", [0, 2])  # t = 1 (its own sigma_t) and an inner step
def test_clipped_surrogate_value_and_gradient(name, j):
    """The per-step policy term equals max(-A r, -A clip(r, 1 - eps, 1 + eps)) re-typed here, in value and in its
    gradient with respect to the velocity, for A > 0 and A < 0 and ratios below, inside and above the clip;
    where the clip binds (A > 0, r > 1 + eps; A < 0, r < 1 - eps) the gradient is exactly 0."""
    (term, _, ratio), leaf, (a, r, v, x, x_next, old, sig, branching) = _call(name, j, beta=0.0)
    t, t_next = float(sig[j]), float(sig[j + 1])
    value, grad, ratio64 = _expected(a, r, leaf, x, x_next, old, t, t_next, len(RATIOS) if branching else None)
    w = 0.6 if name == "tempflow_grpo" else 1.0  # TempFlow weights each step's term by Norm(sigma_t sqrt(dt))
    assert torch.allclose(ratio64, r, rtol=1e-5), "the hand-set old log-probs give the target ratios"
    assert torch.allclose(ratio.double(), ratio64, rtol=1e-5, atol=0)
    assert torch.allclose(term.double(), w * value, rtol=1e-5, atol=1e-6), (term, w * value)
    term.sum().backward()
    assert torch.allclose(leaf.grad.double(), w * grad, rtol=1e-4, atol=1e-7 * grad.abs().max())
    # rows where the clip binds contribute no gradient; rows where it does not, do
    binds = ((a > 0) & (r > 1 + EPS)) | ((a < 0) & (r < 1 - EPS))
    if branching:  # the gradient is per parent: each parent mixes bound and unbound children, so check the value
        assert torch.allclose(term.double()[binds], w * (-a * r.clamp(1 - EPS, 1 + EPS))[binds], rtol=1e-6)
        assert binds.any() and not torch.allclose(term.double()[binds], w * (-a * r)[binds], rtol=1e-3)
    else:
        g = leaf.grad.flatten(1).abs().sum(1)
        assert torch.all(g[binds] == 0) and torch.all(g[~binds] > 0), g


@pytest.mark.parametrize("name", ["g2rpo", "tempflow_grpo"])
def test_clipped_children_give_no_gradient(name):
    """Branching scripts: a parent whose children all sit where the clip binds gets exactly zero gradient."""
    args = MODULES[name].Args(clip_range=EPS, beta=0.0, noise_level=NOISE, num_steps=NUM_STEPS, shift=SHIFT)
    batch, a, r, v, x, x_next = _child_case(1)
    old = batch["log_probs"].flatten().double() + torch.log(r)  # the new log-prob (ratio 1) ...
    r_bound = torch.tensor([1.5] * 5 + [0.5] * 5, dtype=torch.float64)  # A > 0 above, A < 0 below the clip
    batch["log_probs"] = (old - torch.log(r_bound)).float().view(2, 5)
    leaf = v.clone().requires_grad_(True)
    adv = a.float().view(2, 5)
    out = TERMS[name](FakePolicy(leaf), batch, adv, 1, args)
    out[0].sum().backward()
    assert torch.all(leaf.grad == 0), "the clip must stop the gradient of ratios beyond 1 +- eps"


# How each script scales the KL of one step, as its reference code does: Flow-GRPO's trainers (and MixGRPO, G2RPO
# after them) divide ||mu - mu_ref||^2 by 2 sigma_t^2, the exact KL times |dt|; TempFlow-GRPO's sde step returns
# the transition std sigma_t sqrt(-dt) and divides by its square, the exact KL (factor 1).
KL_FORM = {"flow_grpo": "reference", "mix_grpo": "reference", "g2rpo": "reference", "tempflow_grpo": "exact"}


@pytest.mark.parametrize("name", list(TERMS))
def test_kl_is_the_reference_form(name):
    """KL(pi_theta || pi_ref) of one step as the script's reference code computes it: the exact KL of the two
    Gaussian steps N(mu, (sigma_t sqrt(-dt))^2), taken per element with torch.distributions (mean over elements),
    times |dt| (Flow-GRPO's form; TempFlow: times 1), at every step including t = 1 and the last one (to 0)."""
    for j in range(NUM_STEPS):
        (_, kl, _), leaf, (a, r, v, x, x_next, old, sig, branching) = _call(
            name, j, beta=0.04, v_ref_shift=lambda v: 0.3 * torch.sin(3 * v) + 0.1, seed=j)
        t, t_next = float(sig[j]), float(sig[j + 1])
        c = len(RATIOS) if branching else 1
        v64 = v.double().repeat_interleave(c, 0)
        v_ref = (v + 0.3 * torch.sin(3 * v) + 0.1).double().repeat_interleave(c, 0)
        std = step_std(t, t_next)
        exact = mean_dims(kl_divergence(Normal(step_mean(x, v64, t, t_next), std),
                                        Normal(step_mean(x, v_ref, t, t_next), std)))
        expected = exact * (t - t_next) if KL_FORM[name] == "reference" else exact
        assert kl.shape == expected.shape
        assert torch.all(expected > 0)
        assert torch.allclose(kl.double(), expected, rtol=1e-4, atol=0), (j, kl, expected, exact)


@pytest.mark.parametrize("name", list(TERMS))
def test_kl_is_zero_when_the_policy_is_the_reference(name):
    (_, kl, _), *_ = _call(name, 0, beta=0.04, v_ref_shift=lambda v: torch.zeros_like(v))
    assert torch.all(kl == 0)


def test_step_kl_helper_matches_kl_divergence_if_present():
    """common.step_kl (if the scripts share one) against kl_divergence * |dt| on per-sample sigmas."""
    if not hasattr(common, "step_kl"):
        pytest.skip("no shared step_kl helper")
    sig = _sigmas()
    g = torch.Generator().manual_seed(3)
    mu, mu_ref = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    i = torch.tensor([0, 1, 2, 3])  # one step per sample, t = 1 first
    got = common.step_kl(mu, mu_ref, sig[i], sig[i + 1], NOISE)
    for b in range(4):
        t, t_next = float(sig[b]), float(sig[b + 1])
        std = step_std(t, t_next)
        want = kl_divergence(Normal(mu[b].double(), std), Normal(mu_ref[b].double(), std)).mean() * (t - t_next)
        assert math.isclose(float(got[b]), float(want), rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# Policy.reference(): the base policy after the trainable weights moved
# ----------------------------------------------------------------------------------------------
def _shapes_policy():
    return common.load_policy(None, torch.device("cpu"))


@pytest.mark.parametrize("rank", [0, 4])  # 0: full fine-tuning with a frozen copy; 4: LoRA (adapters disabled)
def test_reference_is_the_base_after_training(rank):
    policy = _shapes_policy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    cond = policy.encode(["a red circle", "two squares", "a blue triangle"])
    sigma = torch.tensor([1.0, 0.6, 0.2])
    with torch.no_grad():
        v_base = {w: policy.velocity(x, sigma, cond, w) for w in (1.0, 2.0)}  # before any adapter or training
    policy.add_lora(rank, 2.0 * rank, common.SD3_LORA_TARGETS if rank else [])
    params = policy.trainable_parameters()
    assert params and not any(p.requires_grad for n, p in policy.denoiser.named_parameters()
                              if rank and "lora" not in n)
    with torch.no_grad():  # the trainable weights move (LoRA's B starts at 0: the adapter then does something)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for w in (1.0, 2.0):
        with torch.no_grad():
            v_live = policy.velocity(x, sigma, cond, w)
            with policy.reference():
                v_ref = policy.velocity(x, sigma, cond, w)
            v_after = policy.velocity(x, sigma, cond, w)
        assert (v_live - v_base[w]).abs().max() > 1e-2, "the trainable weights must change the velocity"
        assert torch.allclose(v_ref, v_base[w], atol=1e-5, rtol=0), "reference() must be the base policy"
        assert torch.equal(v_after, v_live), "the live policy must be back after reference()"
    # gradients: nothing computed inside reference() may reach the trainable weights
    with policy.reference():
        out = policy.velocity(x, sigma, cond, 1.0)
    assert not out.requires_grad
    assert policy.trainable_parameters() == params


def test_reference_restores_the_live_policy_on_error():
    policy = _shapes_policy()
    policy.add_lora(0, 0.0, [])
    live = policy.denoiser
    with pytest.raises(RuntimeError):
        with policy.reference():
            raise RuntimeError("boom")
    assert policy.denoiser is live


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------
def test_ema_is_the_hand_computed_average_and_is_swapped_in_for_evaluation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    params = list(lin.parameters())
    d = 0.8
    ema = common.EMA(params, d)
    shadow = [p.detach().double().clone() for p in params]
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        shadow = [d * s + (1 - d) * p.detach().double() for s, p in zip(shadow, params)]
    for s, want in zip(ema.shadow, shadow):
        assert torch.allclose(s.double(), want, atol=1e-6, rtol=0)
    assert not torch.allclose(ema.shadow[0].double(), params[0].double(), atol=1e-2)
    live = [p.detach().clone() for p in params]
    x = torch.randn(7, 5)
    with torch.no_grad(), ema.swapped_in():
        y = lin(x)
    assert torch.allclose(y.double(), x.double() @ shadow[0].T + shadow[1], atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(params, live)), "the live weights are restored"
    with pytest.raises(RuntimeError), ema.swapped_in():
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, q) for p, q in zip(params, live)), "restored after an error too"


def test_ema_decay_zero_is_the_live_weights():
    lin = torch.nn.Linear(3, 2)
    ema = common.EMA(list(lin.parameters()), 0.0)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    assert torch.equal(ema.shadow[0], lin.weight)


# ----------------------------------------------------------------------------------------------
# CLIP preprocessing against transformers' image processor
# ----------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _smooth_image(h, w, seed):
    """A smooth but asymmetric RGB image (a few low-frequency waves per channel), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(3):
            fy, fx, ph = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph) / 3
    return np.round(255 * (0.5 + 0.45 * img)).astype(np.uint8)


def _transformers_processor():
    try:
        from transformers import CLIPImageProcessorPil as Proc  # transformers 5: the PIL / numpy backend
    except ImportError:
        from transformers import CLIPImageProcessor as Proc  # transformers 4: the slow processor is the default
    return Proc(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_resize=True,
                do_center_crop=True, do_rescale=True, do_normalize=True, resample=3, image_mean=CLIP_MEAN,
                image_std=CLIP_STD)


def _both(tmp_path, h, w):
    """(ours, transformers', the input as a float tensor) for a smooth h x w image."""
    from PIL import Image

    import rewards

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "image_mean": CLIP_MEAN,
         "image_std": CLIP_STD, "resample": 3}))
    arr = _smooth_image(h, w, seed=h + w)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    ours = rewards._Pre(str(tmp_path))(x)[0]
    theirs = torch.from_numpy(np.asarray(_transformers_processor()(images=Image.fromarray(arr),
                                                                   return_tensors="np")["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 224, 224)
    return ours, theirs, x


SIZES = [(512, 384), (384, 512), (300, 700)]


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_clip_preprocessing_matches_transformers(tmp_path, hw):
    """rewards._Pre "clip" (torch: bicubic antialiased resize of the short side, centre crop, normalise) against
    CLIPImageProcessor (PIL bicubic resize of uint8 pixels, centre crop) on a smooth image. Both resize kernels
    are Keys bicubic (a = -0.5) widened by the scale (antialiasing), so they differ by PIL's rounding to uint8
    (one level = 1 / 255 / std = 0.015 in normalised units) plus, today, up to half a pixel of scale (the long
    side: see the next test): mean error below 0.015, max below 0.08. A crop off the centre (the top-left
    corner) is off by more than 0.5 on average."""
    h, w = hw
    ours, theirs, x = _both(tmp_path, h, w)
    err = (ours - theirs).abs()
    assert err.mean() < 0.015 and err.max() < 0.08, (err.mean(), err.max())
    # the test tells crops apart: the top-left crop of the same resize is far from the processor's output
    s = 224 / min(h, w)
    big = torch.nn.functional.interpolate(x, size=(max(round(h * s), 224), max(round(w * s), 224)), mode="bicubic",
                                          antialias=True, align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    corner = (big[0, :, :224, :224].clamp(0, 1) - mean) / std
    assert (corner - theirs).abs().mean() > 0.3


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_clip_resize_keeps_the_long_side_as_transformers(tmp_path, hw):
    """The long side after resizing is int(224 * long / short), as CLIPImageProcessor and torchvision's Resize
    (OpenAI CLIP) compute it, not round(): 512x384 -> 298x224, not 299x224. Then the only difference left is PIL's
    uint8 rounding: at most about one level (0.015) anywhere."""
    ours, theirs, _ = _both(tmp_path, *hw)
    err = (ours - theirs).abs()
    assert err.max() < 0.02 and err.mean() < 0.005, (err.mean(), err.max())


# ----------------------------------------------------------------------------------------------
# Group advantages
# ----------------------------------------------------------------------------------------------
def _advantages64(rewards, groups, global_std, eps=1e-4):
    r = rewards.double()
    out = torch.empty_like(r)
    for g in groups.unique():
        m = groups == g
        std = r.std(unbiased=False) if global_std else r[m].std(unbiased=False)
        out[m] = (r[m] - r[m].mean()) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [False, True])
def test_equal_rewards_give_exactly_zero_advantages(global_std):
    rewards = torch.tensor([0.9] * 8 + [1 / 3] * 8 + [0.7] * 8 + [0.1, 0.5, 0.9, 0.2, 0.0, 1.0, 0.3, 0.6])
    groups = torch.arange(4).repeat_interleave(8)
    adv = common.group_advantages(rewards, groups, global_std=global_std)
    assert torch.all(adv[:24] == 0), adv[:24].abs().max()
    assert torch.allclose(adv.double(), _advantages64(rewards, groups, global_std), atol=1e-6, rtol=0)


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_against_float64(global_std):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6 * 5, generator=g)
    groups = torch.arange(6).repeat_interleave(5)[torch.randperm(30, generator=g)]  # groups need not be contiguous
    adv = common.group_advantages(rewards, groups, global_std=global_std)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert torch.allclose(adv.double(), _advantages64(rewards, groups, global_std), atol=1e-6, rtol=0)
    for k in range(6):  # per group, mean 0
        assert abs(float(adv[groups == k].double().sum())) < 1e-5
