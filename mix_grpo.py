"""MixGRPO (Li et al., 2025, arXiv 2507.21802): Flow-GRPO with the SDE only inside a sliding window.

Flow-GRPO samples every step with the SDE and trains on every step. MixGRPO samples with the SDE only
on a window W(l) = {l, ..., l + w - 1} of w consecutive steps and with the ODE elsewhere, and trains only
the window's steps, so an update costs w instead of T forward/backward passes per image. The window
moves with training ("progressive": l <- min(l + s, T - w) every tau iterations), from the high-noise
steps that shape the layout to the later ones. The ratio, the clip and the KL are Flow-GRPO's:

    L = mean_{i, t in W(l)} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps)) + beta KL

All G images of a prompt start from the same noise x_1, so their rewards differ only by the window's noise.
MixGRPO-Flash (--flash) replaces the Euler ODE after the window by DPM-Solver++(2M) on a sub-schedule
with a fraction r of the remaining steps; Flash* (--flash-frozen) freezes the window at l = 0 (r = 0.2).
See docs/mix_grpo.md for every implementation detail.

    python mix_grpo.py                        # the embedded shapes world, on the CPU in minutes
    python mix_grpo.py --flash-frozen         # MixGRPO-Flash*
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common import (EMA, Logger, all_gather_objects, close_distributed, evaluate, gather_scores, global_rows,
                    group_advantages, index_cond, init_distributed, load_checkpoint, load_policy, load_prompts,
                    local_minibatches, lora_config, lora_targets, new_run_dir, pick_device, print0, reduce_metrics,
                    rollout, save_checkpoint, save_grid, sde_step, seed_everything, step_kl, sync_gradients,
                    to_device, warn_off_policy, weight_memory)
from rewards import make_reward, parse_reward_spec


@dataclass
class Args:
    # ---- shared by every script (TRY NOT TO MODIFY: the same text in every script) ----
    model: str | None = None
    """diffusers SD3 or FLUX pipeline (hub id or local folder); unset: the embedded shapes world's tiny SD3 pipeline"""
    reward: str = "shapes"
    """reward name, or a weighted sum such as 'shapes:1.0,jpeg_compressibility:0.1'"""
    prompts: str | None = None
    """training prompts, one per line; unset: the shapes world's train split"""
    eval_prompts: str | None = None
    """held-out evaluation prompts, one per line; unset: the shapes world's eval split"""
    steps: int = 600
    """training iterations (sample, score, update)"""
    max_minutes: float = 0.0
    """budget of training minutes (sampling, reward, update; evaluations excluded): stop after the iteration that
    passes it, then evaluate and save (0: run every --steps)"""
    prompts_per_step: int = 8
    """distinct prompts sampled per iteration, over all processes (drawn without replacement from the training
    prompts); under torchrun each of N processes samples and trains prompts_per_step / N of them, whole groups"""
    group_size: int = 8
    """images per prompt (G); the group's rewards give each image its advantage"""
    num_steps: int = 10
    """sampling steps of training rollouts"""
    eval_num_steps: int = 20
    """ODE steps of evaluation (more than num_steps: the paper's denoising reduction)"""
    shift: float | None = None
    """time shift of the sigma schedule; unset: the model's own: 3.0 for SD3 and shapes, FLUX's
    resolution-dependent e^mu"""
    guidance: float = 1.0
    """guidance scale in sampling, training and evaluation; shapes / SD3: classifier-free (1: no CFG, half the
    cost); FLUX: the distilled guidance embedding (FLUX.1-dev: 3.5 typical), one pass either way"""
    resolution: int | None = None
    """image side in pixels (SD3 / FLUX default 512, or an SD3 pipeline's native size if smaller); shapes: 32"""
    lr: float = 1e-4
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    lora_rank: int | None = None
    """LoRA rank; 0 fine-tunes every weight of the denoiser (the reference is then a frozen copy); unset: 0 for
    a denoiser under 10M parameters (the shapes world's), else SD3 32, FLUX 64 (the reference trainers' LoRA)"""
    lora_alpha: float | None = None
    """LoRA alpha (scale alpha / rank); unset: 2 x rank (SD3 64, FLUX 128, as the reference trainers)"""
    ema_decay: float = 0.9
    """EMA of the trainable weights used for evaluation; 0 evaluates the live weights"""
    eval_every: int = 10
    """evaluate every this many iterations (and at the end)"""
    eval_per_prompt: int = 8
    """evaluation images per held-out prompt (fixed noise)"""
    save_every: int = 10
    """checkpoint every this many iterations (and at the end)"""
    seed: int = 0
    """seed of prompts, noise and initial adapter weights"""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu' or 'cuda'"""
    mixed_precision: str = "bf16"
    """weights' dtype on CUDA: bf16, fp16 or fp32 (log-probs are always float32)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    out: str | None = None
    """run folder; unset: runs/<script>-<date>"""
    resume: str | None = None
    """run folder (or checkpoint file) to continue from"""
    track: bool = False
    """also log to Weights & Biases"""
    gradient_checkpointing: bool = False
    """recompute the denoiser's activations in the backward pass (less memory, about one more forward pass per update)"""
    sample_batch: int = 0
    """images per sampling forward pass (the reference's per-GPU sample batch): rollouts run in chunks of this many;
    0: all of this process's images at once"""
    micro_batch: int = 0
    """denoiser inputs per forward/backward pass of the update, gradients accumulated (the same update in less
    memory; the branching methods count parent states); 0: the whole minibatch at once"""
    offload_text_encoders: bool = False
    """encode every training and evaluation prompt once at start-up, then move the text encoders to the CPU"""
    dry_run: bool = False
    """load the model, print the batch arithmetic and the weight-memory estimate, and exit"""
    # ---- MixGRPO ----
    noise_level: float = 0.7
    """a in sigma_t = a sqrt(t / (1 - t)): the SDE's noise level inside the window"""
    clip_range: float = 1e-3
    """PPO clip epsilon on the per-step ratio (the MixGRPO code: 1e-4)"""
    beta: float = 0.5
    """KL(pi_theta || pi_ref) coefficient on the window's steps, the reference code's KL form (paper: 0 on FLUX,
    0.001 on SD3.5-M; 0.5 on shapes, as flow_grpo.py)"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip]"""
    global_std: bool = False
    """normalise advantages by the std of the whole batch instead of each group's"""
    window_size: int = 4
    """w: consecutive SDE steps per rollout, the only steps trained"""
    window_strategy: Literal["progressive", "frozen", "random"] = "progressive"
    """how the window's first step l moves: by s every tau iterations, never (l = 0), or uniformly at random in
    [0, num_steps - 2 - w] (the reference's range)"""
    window_interval: int = 20
    """tau: iterations between two moves of the progressive window (paper: 25 on FLUX, 150 on SD3.5-M)"""
    window_stride: int = 1
    """s: steps the progressive window moves each time; l stops at num_steps - w"""
    same_noise: bool = True
    """one initial noise x_1 per group, as the paper does (--no-same-noise: one per image)"""
    reward_aggregation: Literal["sum", "mean"] = "sum"
    """several rewards: sum their per-reward group z-scores (paper, Alg. 1) or average them (the code)"""
    flash: bool = False
    """MixGRPO-Flash: DPM-Solver++(2M) after the window, on a compressed schedule"""
    flash_frozen: bool = False
    """MixGRPO-Flash*: Flash with the window frozen at l = 0"""
    flash_ratio: float | None = None
    """r: the solver takes round(r * steps after the window) steps (unset: 0.4 for Flash, 0.2 for Flash*)"""
    minibatches: int = 2
    """optimiser steps per iteration: the batch is split into this many minibatches"""

    def __post_init__(self):
        if not 1 <= self.window_size <= self.num_steps:
            raise SystemExit(f"--window-size {self.window_size}: it must be between 1 and --num-steps ({self.num_steps})")
        if self.window_strategy == "random" and self.window_size > self.num_steps - 2:
            raise SystemExit(f"--window-strategy random draws l in [0, num_steps - 2 - w]: --window-size "
                             f"{self.window_size} must be at most --num-steps - 2 ({self.num_steps - 2})")
        if self.window_interval < 1 or self.window_stride < 0:
            raise SystemExit("--window-interval must be >= 1 and --window-stride >= 0")
        if self.flash_ratio is not None and not 0 < self.flash_ratio <= 1:
            raise SystemExit(f"--flash-ratio {self.flash_ratio}: the fraction of steps kept must be in (0, 1]")


# ------------------------------------------------------------------------------------------------
# MixGRPO: the sliding window, the Flash solver, sampling, advantages, update
# ------------------------------------------------------------------------------------------------
def window_start(iteration: int, args: Args, gen: torch.Generator) -> int:
    """l of W(l) = {l, ..., l + w - 1} at this iteration; the paper clips l at T - w."""
    last = args.num_steps - args.window_size
    if args.window_strategy == "frozen" or args.flash_frozen:
        return 0
    if args.window_strategy == "random":  # the reference's range, [0, T - 2 - w]: its last two steps never train
        return int(torch.randint(0, last - 1, (1,), generator=gen, device=gen.device))
    return min(args.window_stride * (iteration // args.window_interval), last)


def flash_sigmas(sigmas: torch.Tensor, end: int, ratio: float, shift: float) -> torch.Tensor:
    """The compressed schedule after the window: from sigmas[end] to 0 in max(1, round(r * n)) steps,
    where n = len(sigmas) - 1 - end, spaced as the base schedule is (linear before the time shift)."""
    n = len(sigmas) - 1 - end
    if n == 0:
        return sigmas[end:]
    sig = sigmas[end].double()
    s = sig / (shift - (shift - 1) * sig)  # undo sigma = shift * s / (1 + (shift - 1) * s)
    s = torch.linspace(float(s), 0.0, max(1, round(ratio * n)) + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def dpm_solver_step(x, x0, x0_prev, sigma_prev, sigma, sigma_next) -> torch.Tensor:
    """One DPM-Solver++(2M) step for rectified flow (alpha = 1 - sigma, data prediction x0 = x - sigma v,
    lambda = log((1 - sigma) / sigma), h = lambda_next - lambda):

        x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) (D0 + D1 / 2),  D0 = x0,  D1 = (x0 - x0_prev) / r

    with r = (lambda - lambda_prev) / h (the "midpoint" second-order term). Without a previous x0 it is
    the first-order step (DDIM); the step to sigma = 0 (lambda = inf) returns x0, as diffusers does."""
    sigma, sigma_next = float(sigma), float(sigma_next)
    if sigma_next == 0:
        return x0
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    h = lam(sigma_next) - lam(sigma)
    d = x0
    if x0_prev is not None and float(sigma_prev) < 1:  # lambda(1) = -inf: no usable history at t = 1
        d = x0 + 0.5 * (x0 - x0_prev) * h / (lam(sigma) - lam(float(sigma_prev)))
    return sigma_next / sigma * x - (1 - sigma_next) * math.expm1(-h) * d


def flash_finish(policy, cond, x, sigmas, x0_prev, sigma_prev, guidance: float) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] = 0 with DPM-Solver++(2M); the multistep history starts
    with the x0-prediction of the window's last step."""
    for i in range(len(sigmas) - 1):
        x0 = x - sigmas[i] * policy.velocity(x, sigmas[i], cond, guidance).float()
        x = dpm_solver_step(x, x0, x0_prev, sigma_prev, sigmas[i], sigmas[i + 1])
        x0_prev, sigma_prev = x0, sigmas[i]
    return x


@torch.no_grad()
def window_rollout(policy, cond: dict, x: torch.Tensor, sigmas: torch.Tensor, levels: list[float], end: int,
                   args: Args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of images: ODE before the window, SDE in it, ODE (or Flash) after; (latents, log-probs, x0)."""
    if args.flash or args.flash_frozen:
        head = rollout(policy, cond, x, sigmas[:end], levels, args.guidance, gen)  # up to the window's last step
        x = head.latents[:, -1]
        v = policy.velocity(x, sigmas[end - 1], cond, args.guidance).float()
        last = sde_step(x, v, sigmas[end - 1], sigmas[end], args.noise_level, generator=gen)
        latents = torch.cat([head.latents, last.sample[:, None]], 1)
        log_probs = torch.cat([head.log_probs, last.log_prob[:, None]], 1)
        post = flash_sigmas(sigmas, end, flash_ratio(args), args.shift)
        return latents, log_probs, flash_finish(policy, cond, last.sample, post, x - sigmas[end - 1] * v,
                                                sigmas[end - 1], args.guidance)
    out = rollout(policy, cond, x, sigmas, levels, args.guidance, gen)
    return out.latents, out.log_probs, out.latents[:, -1]


def flash_ratio(args: Args) -> float:
    return args.flash_ratio or (0.2 if args.flash_frozen else 0.4)


@torch.no_grad()
def sample_batch(policy, prompts: list[str], state: dict, args: Args, gen: torch.Generator,
                 shared_gen: torch.Generator) -> dict:
    """G images per prompt from one shared x_1, in chunks of --sample-batch images; the window is the same on
    every rank."""
    l = window_start(state["iteration"], args, shared_gen)
    state["iteration"] += 1
    end = l + args.window_size
    all_prompts = [p for p in prompts for _ in range(args.group_size)]
    cond = policy.encode(all_prompts)
    sigmas = policy.sigmas(args.num_steps, args.shift)
    x = policy.noise(len(prompts), gen).repeat_interleave(args.group_size, 0) if args.same_noise \
        else policy.noise(len(all_prompts), gen)
    levels = [args.noise_level if l <= i < end else 0.0 for i in range(args.num_steps)]
    chunks = [window_rollout(policy, index_cond(cond, rows), x[rows], sigmas, levels, end, args, gen)
              for rows in torch.arange(len(x), device=x.device).split(args.sample_batch or len(x))]
    latents, log_probs, x0 = (torch.cat(parts) for parts in zip(*chunks))
    nfe = end + len(flash_sigmas(sigmas, end, flash_ratio(args), args.shift)) - 1 if args.flash or args.flash_frozen \
        else args.num_steps
    return {"prompts": all_prompts, "groups": torch.arange(len(prompts)).repeat_interleave(args.group_size),
            "cond": cond, "latents": latents, "log_probs": log_probs, "sigmas": sigmas, "window": range(l, end),
            "nfe": nfe, "images": policy.decode(x0)}


def compute_advantages(batch: dict, rewards: torch.Tensor, info: dict, args: Args) -> torch.Tensor:
    """GRPO per prompt, clipped. Several rewards: A_i = sum_k w_k (R_ik - mu_k) / sigma_k, one group
    z-score per reward model (paper, Alg. 1), divided by sum_k w_k with --reward-aggregation mean (the code)."""
    parts = parse_reward_spec(args.reward)
    if len(parts) == 1:
        adv = group_advantages(rewards, batch["groups"], global_std=args.global_std)
    else:
        adv = sum(w * group_advantages(info[name], batch["groups"], global_std=args.global_std) for name, w in parts)
        if args.reward_aggregation == "mean":
            adv = adv / sum(w for _, w in parts)
    return adv.clamp(-args.adv_clip, args.adv_clip)


def init_state(policy, args: Args) -> dict:
    """The iteration counter that moves the window (saved in checkpoints, so a resumed run keeps its window)."""
    return {"iteration": 0}


def ppo_terms(policy, batch: dict, rows: torch.Tensor, j: int, a: torch.Tensor, args: Args):
    """Per image of `rows` at step j: the clipped policy term max(-A r, -A clip(r)), the KL to the reference and the
    ratio r = pi_theta(x_{j+1} | x_j) / pi_old(x_{j+1} | x_j)."""
    sig, cond = batch["sigmas"], index_cond(batch["cond"], rows)
    x, x_next = batch["latents"][rows, j], batch["latents"][rows, j + 1]
    step = sde_step(x, policy.velocity(x, sig[j], cond, args.guidance), sig[j], sig[j + 1], args.noise_level,
                    prev_sample=x_next)
    ratio = torch.exp(step.log_prob - batch["log_probs"][rows, j])
    clipped = torch.clamp(ratio, 1 - args.clip_range, 1 + args.clip_range)
    kl = torch.zeros_like(ratio)
    if args.beta > 0:  # the reference's ||mu - mu_ref||^2 / (2 sigma_t^2): the exact KL of the two steps times |dt|
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, sig[j], cond, args.guidance)
        mean_ref = sde_step(x, v_ref, sig[j], sig[j + 1], args.noise_level, prev_sample=x_next).mean
        kl = step_kl(step.mean, mean_ref, sig[j], sig[j + 1], args.noise_level)
    return torch.maximum(-a * ratio, -a * clipped), kl, ratio


def train_on_batch(policy, opt, batch: dict, adv: torch.Tensor, state: dict, args: Args,
                   gen: torch.Generator) -> dict:
    """PPO-clipped policy gradient over the trained steps, one optimiser step per minibatch (of the global batch:
    this rank's rows of it, the gradient summed over the ranks)."""
    steps = batch["window"]  # only the window's steps: w forward/backward passes per image instead of T
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "train/clipfrac": 0.0, "train/ratio": 0.0, "train/skipped": 0}
    count, onpolicy_err = 0, 0.0  # (image, step) pairs trained; the statistics are sums over them
    for i, (mb, _, size) in enumerate(local_minibatches(global_rows(len(adv)), args.minibatches, gen)):
        opt.zero_grad(set_to_none=True)
        for j in steps:
            for rows in mb.split(args.micro_batch or max(len(mb), 1)):  # micro-batches: the same gradient, accumulated
                policy_loss, kl, ratio = ppo_terms(policy, batch, rows, j, adv[rows].to(policy.device), args)
                loss = (policy_loss + args.beta * kl).sum() / (size * len(steps))  # mean over minibatch, steps
                if not torch.isfinite(loss):
                    stats["train/skipped"] += 1
                    continue
                policy.backward(loss)
                stats["loss/policy"] += policy_loss.sum().item()
                stats["loss/kl"] += kl.sum().item()
                stats["train/clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item()
                stats["train/ratio"] += ratio.sum().item()
                count += len(rows)
                if i == 0:  # before the first optimiser step: the ratio must be exactly 1
                    onpolicy_err = max(onpolicy_err, (ratio.detach() - 1).abs().max().item())
        sync_gradients(policy.trainable_parameters())
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.max_grad_norm)
        opt.step()
    stats = {k: (v / max(count, 1) if k != "train/skipped" else v) for k, v in stats.items()}
    return {**stats, "train/onpolicy_ratio_err": onpolicy_err, "window/start": steps[0], "sample/nfe": batch["nfe"]}


# ------------------------------------------------------------------------------------------------
# The loop (TRY NOT TO MODIFY: the same text in every script)
# ------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    if args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size}: a group needs at least 2 images to have an advantage")
    if args.prompts_per_step < 1 or args.steps < 0:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} / --steps {args.steps}: use at least 1 prompt "
                         "per iteration and 0 or more iterations")
    if args.num_steps < 2:
        raise SystemExit(f"--num-steps {args.num_steps}: a rollout needs at least 2 sampling steps (the last one is "
                         "never trained)")
    if args.mixed_precision not in ("bf16", "fp16", "fp32"):
        raise SystemExit(f"--mixed-precision {args.mixed_precision!r}: choose bf16, fp16 or fp32")
    if args.minibatches < 1 or args.minibatches > args.prompts_per_step * args.group_size:
        raise SystemExit(f"--minibatches must be between 1 and the batch size ({args.prompts_per_step * args.group_size})")
    if args.micro_batch < 0:
        raise SystemExit(f"--micro-batch {args.micro_batch}: use a positive size, or 0 for the whole minibatch at once")


def main(args: Args) -> dict:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rank, world = init_distributed(device)  # under torchrun: one process per GPU; otherwise a world of size 1
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} counts every process's prompts: make it a "
                         f"multiple of the {world} processes")
    seed_everything(args.seed)  # the same on every rank: the same initial adapter weights
    try:
        reward_fn = make_reward(args.reward)
    except ValueError as e:
        raise SystemExit(f"--reward: {e}") from None
    train_prompts = load_prompts(args.prompts, "train")
    eval_prompts = load_prompts(args.eval_prompts, "eval")
    if args.prompts_per_step > len(train_prompts):
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step}: an iteration draws distinct prompts, and the "
                         f"training prompts hold {len(train_prompts)}")
    ckpt, run_dir = load_checkpoint(args.resume, asdict(args)) if args.resume else ({}, None)  # checked before loading
    if ckpt:  # the run keeps the LoRA it was saved with (flags that were set match it: load_checkpoint checked)
        args.lora_rank, args.lora_alpha = ckpt["args"]["lora_rank"], ckpt["args"]["lora_alpha"]
    policy = load_policy(args.model, device, args.mixed_precision, args.resolution, args.gradient_checkpointing)
    if args.shift is None:
        args.shift = policy.default_shift  # the model's own (FLUX: e^mu of its resolution); logged and saved resolved
    args.lora_rank, args.lora_alpha = lora_config(policy, args.lora_rank, args.lora_alpha)  # resolved, as the shift
    policy.add_lora(args.lora_rank, args.lora_alpha, lora_targets(policy))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print0(f"{policy.backend} on {device}{f' (rank 0 of {world} processes)' if world > 1 else ''}: "
           f"{sum(p.numel() for p in policy.trainable_parameters()) / 1e6:.2f}M trainable parameters; shift "
           f"{args.shift:.3f}; per iteration {args.prompts_per_step} prompts x {args.group_size} images = "
           f"{args.prompts_per_step * args.group_size} rollouts (the branching methods score more images), "
           f"{args.minibatches} minibatches = up to {args.minibatches} optimiser steps"
           f"{f' in micro-batches of {args.micro_batch}' if args.micro_batch else ''}; "
           f"{args.steps} iterations = up to {args.steps * args.minibatches} optimiser steps")
    print0(weight_memory(policy))
    if args.dry_run:
        print0("--dry-run: exiting before training")
        return {}
    if args.offload_text_encoders:
        policy.offload_text_encoders(train_prompts + eval_prompts)
    ema = EMA(policy.trainable_parameters(), args.ema_decay)
    state = init_state(policy, args)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1_000_003 * rank)  # this rank's sampling noise
    cpu_gen = torch.Generator().manual_seed(args.seed)  # the same on every rank: minibatches, timesteps, windows
    prompt_rng = random.Random(args.seed)  # the same on every rank: the global draw of prompts
    start, wall_offset, samples, train_time = 0, 0.0, 0, 0.0
    run_dir = run_dir or Path(all_gather_objects(new_run_dir(args.out, Path(__file__).stem) if rank == 0 else None)[0])
    if ckpt:
        policy.load_trainable_state(ckpt["trainable"])
        opt.load_state_dict(ckpt["optimizer"])  # moves its state to the parameters' device
        ema.shadow = to_device(ckpt["ema"], device)
        state = to_device(ckpt["state"], device)
        gen.set_state(ckpt["gen"][rank])
        cpu_gen.set_state(ckpt["cpu_gen"])
        prompt_rng.setstate(ckpt["prompt_rng"])
        start, wall_offset, samples, train_time = ckpt["step"], ckpt["wall_time"], ckpt["samples"], ckpt["train_time"]
        print0(f"resumed {run_dir} at iteration {start}")
    logger = Logger(run_dir, asdict(args), args.track, enabled=rank == 0)
    t_start = time.time()

    def wall() -> float:
        return time.time() - t_start + wall_offset

    def run_eval(step: int) -> dict:
        t0 = time.time()
        with ema.swapped_in():  # decay 0: the shadow is the live weights
            metrics, images = evaluate(policy, eval_prompts, reward_fn, args.eval_per_prompt, args.eval_num_steps,
                                       args.shift, args.guidance, seed=args.seed + 10_000)  # split over the ranks
        if rank == 0:
            save_grid(images, run_dir / f"eval_{step:05d}.png", nrow=8)
        metrics["time/eval"] = time.time() - t0
        logger.log(step, metrics, wall_offset)
        return metrics

    def checkpoint(step: int) -> None:
        gens = all_gather_objects(gen.get_state())  # every rank's sampling generator; the rest is the same everywhere
        if rank == 0:
            save_checkpoint(run_dir / "checkpoint.pt", {
                "trainable": policy.trainable_state(), "optimizer": opt.state_dict(), "ema": ema.shadow, "state": state,
                "gen": gens, "cpu_gen": cpu_gen.get_state(), "prompt_rng": prompt_rng.getstate(), "step": step,
                "wall_time": wall(), "samples": samples, "train_time": train_time, "args": asdict(args)})

    last_eval, done = (run_eval(start) if start == 0 else {}), start
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=Path(__file__).stem, disable=rank > 0)
    for step in bar:
        policy.clock.update(forward=0.0, backward=0.0)
        t0 = time.time()
        prompts = prompt_rng.sample(train_prompts, k=args.prompts_per_step)  # distinct, the same on every rank
        mine = prompts[rank * len(prompts) // world:(rank + 1) * len(prompts) // world]  # this rank's groups
        batch = sample_batch(policy, mine, state, args, gen, cpu_gen)
        t1 = time.time()
        rewards, info = reward_fn(batch["images"], batch["prompts"])
        adv = compute_advantages(batch, rewards, info, args)  # batch-wide statistics over every rank
        t2 = time.time()
        stats = train_on_batch(policy, opt, batch, adv, state, args, cpu_gen)  # gradients summed over the ranks
        warn_off_policy(stats)  # the first minibatch is on-policy: its ratio must be 1
        ema.update()
        t3 = time.time()
        rewards, info, adv = gather_scores(rewards, info, adv)  # every rank's, for the log
        samples += len(rewards)  # images scored so far (more than prompts x group for the branching methods)
        train_time += t3 - t0  # seconds of sampling, scoring and training so far (no evaluations)
        metrics = reduce_metrics({  # averaged over the ranks, so every rank sees the same numbers and stops together
            "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item(),
            **{f"reward/{k}": v.nanmean().item() for k, v in info.items() if not v.isnan().all()},
            "adv/abs_mean": adv.abs().mean().item(), **stats, "time/sample": t1 - t0, "time/reward": t2 - t1,
            "time/train": t3 - t2, "time/forward": policy.clock["forward"], "time/backward": policy.clock["backward"],
            "samples": samples, "train_time": train_time})
        train_time = metrics["train_time"]
        logger.log(step + 1, metrics, wall_offset)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", eval=f"{last_eval.get('eval/score', float('nan')):.3f}")
        done = step + 1
        out_of_time = args.max_minutes > 0 and train_time > args.max_minutes * 60
        if done % args.eval_every == 0 or done == args.steps or out_of_time:
            last_eval = run_eval(done)
        if done % args.save_every == 0 or done == args.steps or out_of_time:
            checkpoint(done)
        if out_of_time:
            break
    logger.close()
    scores = ", ".join(f"{k} {last_eval[k]:.3f}" for k in ("eval/score", "eval/strict") if k in last_eval)
    print0(f"done: {done} iterations in {wall() / 60:.1f} min; {scores}; run folder {run_dir}")
    close_distributed()
    return last_eval


if __name__ == "__main__":
    main(tyro.cli(Args))
