"""DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117): online RL on the forward process.

An "old" policy v_old (a slowly moving copy of the trainable weights) samples clean images x0 with any
deterministic solver; each reward becomes an optimality probability r in [0, 1]; the policy is then trained
with flow matching on the re-noised x_t = (1 - t) x0 + t eps through two implicit policies:

    v+ = (1 - b) v_old + b v_theta        (positive: the policy that makes the good images likelier)
    v- = (1 + b) v_old - b v_theta        (negative: v+ mirrored through v_old)
    loss = mean_{i,t} [ r_i ||v+ - (eps - x0)||^2 + (1 - r_i) ||v- - (eps - x0)||^2 ] + beta ||v_theta - v_ref||^2

Its minimiser is v_theta = v_old + (2 / b) alpha (v_pos - v_old), alpha = E[r | x_t], v_pos the velocity of the
reward-tilted images: the old policy moved towards the good images, without likelihoods, SDEs or CFG. With every
r = 1 and v_old = v_theta it is pre-training on the model's own samples up to a per-sample weight (AWM's loss with
A = 1); with r = 0 it pushes v_theta away from the target. The reference measures each term in x0 space with a
self-normalising weight (see nft_terms).
See docs/diffusion_nft.md for every implementation detail.

    python diffusion_nft.py                   # the embedded shapes world, on the CPU in minutes
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

from common import (EMA, Logger, all_gather_objects, close_distributed, ema_update, evaluate, gather_scores,
                    global_rows, group_advantages, index_cond, init_distributed, load_checkpoint, load_policy,
                    load_prompts, local_minibatches, lora_config, lora_targets, new_run_dir, pick_device, print0,
                    reduce_metrics, save_checkpoint, save_grid, seed_everything, swapped_params, sync_gradients,
                    to_device, warn_off_policy, weight_memory)
from rewards import make_reward


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
    # ---- DiffusionNFT ----
    solver: Literal["dpm2", "euler"] = "dpm2"
    """deterministic solver of the rollouts: 'dpm2' (the reference: DPM-Solver++(2M)) or 'euler'"""
    nft_beta: float = 1.0
    """b of the implicit policies v+ = (1 - b) v_old + b v_theta, v- = (1 + b) v_old - b v_theta (the paper's beta;
    the reference: 1.0, 0.1 on OCR)"""
    beta: float = 1e-4
    """coefficient of ||v_theta - v_ref||^2 to the base (the reference's 1e-4)"""
    timestep_fraction: float = 0.99
    """each sample trains on int(num_steps * fraction) of the sampler's timesteps, its own random subset"""
    old_decay_rate: float = 0.001
    """the old policy follows the weights after each iteration, old <- d old + (1 - d) theta, with
    d = min(old_decay_rate * (updates - old_decay_delay), old_decay_max) (updates: optimiser steps so far)"""
    old_decay_max: float = 0.5
    """cap of the old policy's decay d"""
    old_decay_delay: int = 0
    """d = 0 (the old policy is a copy of the weights) for this many optimiser steps"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip] and divided by it, then r = (1 + A) / 2"""
    global_std: bool = True
    """normalise advantages by the std of the whole batch (the reference) instead of each group's"""
    minibatches: int = 2
    """optimiser steps per iteration: the batch is split into this many minibatches"""

# ------------------------------------------------------------------------------------------------
# DiffusionNFT: sampling, advantages, update
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def ode_sample(policy, cond, x, sigmas: torch.Tensor, guidance: float, second_order: bool) -> torch.Tensor:
    """x0 from the noise x with a deterministic solver: Euler, or the reference's DPM-Solver++(2M) in data
    prediction D = x - t v. With lambda(t) = log((1 - t) / t) and h = lambda(t_next) - lambda(t), its first-order
    step (t_next / t) x - (1 - t_next)(e^-h - 1) D is exactly the Euler step x + (t_next - t) v; the second order
    adds -(1 - t_next)(e^-h - 1)(D - D_prev) h / (2 h_prev) from the previous step's D. First order, as the
    reference, where no usable history exists: the first step, the step after t = 1 (lambda = -inf there, so
    h_prev = inf) and the last step (t_next = 0, lambda = inf)."""
    s = sigmas.double().tolist()
    lam = [math.log((1 - u) / u) if 0 < u < 1 else None for u in s]
    d_prev = None
    for i in range(len(s) - 1):
        v = policy.velocity(x, sigmas[i], cond, guidance)
        d, x_next = x - s[i] * v, x + (s[i + 1] - s[i]) * v
        if second_order and i > 0 and None not in (lam[i - 1], lam[i + 1]):
            h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            x_next = x_next - (1 - s[i + 1]) * math.expm1(-h) * (d - d_prev) * h / (2 * h_prev)
        x, d_prev = x_next, d
    return x


@torch.no_grad()
def sample_batch(policy, prompts: list[str], state: dict, args: Args, gen: torch.Generator,
                 shared_gen: torch.Generator) -> dict:
    """G images per prompt from the old policy (its weights swapped in, the live ones restored after) with the
    deterministic solver; only the final x0 is kept."""
    all_prompts = [p for p in prompts for _ in range(args.group_size)]
    cond = policy.encode(all_prompts)
    sigmas = policy.sigmas(args.num_steps, args.shift)
    noise = policy.noise(len(all_prompts), gen)
    chunks = torch.arange(len(all_prompts), device=noise.device).split(args.sample_batch or len(all_prompts))
    with swapped_params(policy.trainable_parameters(), state["old"]):
        x0 = torch.cat([ode_sample(policy, index_cond(cond, rows), noise[rows], sigmas, args.guidance,
                                   args.solver == "dpm2") for rows in chunks])
    return {"prompts": all_prompts, "groups": torch.arange(len(prompts)).repeat_interleave(args.group_size),
            "cond": cond, "x0": x0, "sigmas": sigmas, "images": policy.decode(x0)}


def compute_advantages(batch: dict, rewards: torch.Tensor, info: dict, args: Args) -> torch.Tensor:
    """Per-prompt mean, batch std (the reference), clipped to +-adv_clip and scaled into [-1, 1]."""
    adv = group_advantages(rewards, batch["groups"], global_std=args.global_std)
    return adv.clamp(-args.adv_clip, args.adv_clip) / args.adv_clip


def init_state(policy, args: Args) -> dict:
    """The old policy (a copy of the trainable weights, the sampler) and the update count."""
    return {"old": [p.detach().clone() for p in policy.trainable_parameters()], "updates": 0}


def old_decay(updates: int, args: Args) -> float:
    """d of old <- d old + (1 - d) theta after `updates` optimiser steps (the reference's decay schedule)."""
    if updates < args.old_decay_delay:
        return 0.0
    return min(args.old_decay_rate * (updates - args.old_decay_delay), args.old_decay_max)


def train_timesteps(sigmas: torch.Tensor, size: int, args: Args, gen: torch.Generator) -> torch.Tensor:
    """(size, K) sigmas: for each sample its own K = int(num_steps * fraction) of the sampler's num_steps sigmas
    (t = 1 included, t = 0 never), a random subset in random order."""
    k = max(1, int(args.num_steps * args.timestep_fraction))
    order = torch.stack([torch.randperm(args.num_steps, generator=gen)[:k] for _ in range(size)])
    return sigmas[order]


def nft_terms(policy, cond: dict, x0: torch.Tensor, adv: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              state: dict, args: Args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample on x_t = (1 - t) x0 + t eps (one t per sample), with r = (1 + A) / 2:

        adv_clip / b * [ r ||x0+ - x0||^2 / sg(mean |x0+ - x0|) + (1 - r) ||x0- - x0||^2 / sg(mean |x0- - x0|) ]

    x0+- = x_t - t v+- are the implicit policies' x0 predictions, and x0+- - x0 = t (v+- - (eps - x0)), so each term
    is t ||v+- - (eps - x0)||^2 / mean |v+- - (eps - x0)|: flow matching, each sample's error normalised by itself
    (the reference's adaptive weighting; sg: no gradient). Dividing by b makes the gradient through v+- = .. + b v
    independent of b; the factor adv_clip is the reference's. Also ||v_theta - v_ref||^2 to the base and, logged
    only, ||v_theta - v_old||^2."""
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tb) * x0 + tb * noise
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():  # the same x_t for v_old, v_ref and v_theta (before any graph is built)
        with swapped_params(policy.trainable_parameters(), state["old"]):
            v_old = policy.velocity(x_t, t, cond, args.guidance)
        if args.beta > 0:
            with policy.reference():
                v_ref = policy.velocity(x_t, t, cond, args.guidance)
    v = policy.velocity(x_t, t, cond, args.guidance)
    b, r = args.nft_beta, (1 + adv) / 2
    terms = []
    for v_implicit in ((1 - b) * v_old + b * v, (1 + b) * v_old - b * v):  # v+, v-
        err = x_t - tb * v_implicit - x0  # x0 prediction error
        weight = err.detach().double().abs().mean(dims).clamp(min=1e-5)
        terms.append((err**2).mean(dims) / weight.to(err.dtype))
    policy_loss = args.adv_clip * (r * terms[0] + (1 - r) * terms[1]) / b
    kl = ((v - v_ref) ** 2).mean(dims) if args.beta > 0 else torch.zeros(len(x0), device=x0.device)
    return policy_loss, kl, ((v - v_old) ** 2).mean(dims).detach()


def train_on_batch(policy, opt, batch: dict, adv: torch.Tensor, state: dict, args: Args,
                   gen: torch.Generator) -> dict:
    """NFT update, each sample on its own K timesteps, one optimiser step per minibatch (of the global batch: this
    rank's rows of it, the gradient summed over the ranks); then the old policy follows the weights."""
    params = policy.trainable_parameters()
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "train/old_dev": 0.0, "train/skipped": 0}
    count = 0
    for mb, pos, size in local_minibatches(global_rows(len(adv)), args.minibatches, gen):
        cond, a, x0 = index_cond(batch["cond"], mb), adv[mb].to(policy.device), batch["x0"][mb]
        ts = train_timesteps(batch["sigmas"], size, args, gen)[pos].to(x0.device)  # drawn for the whole minibatch
        opt.zero_grad(set_to_none=True)
        for j in range(ts.shape[1]):
            # fresh eps per (sample, t), drawn for the whole minibatch so that it does not depend on the ranks
            noise = torch.randn((size, *x0.shape[1:]), generator=gen)[pos].to(x0.device)
            for rows in torch.arange(len(mb)).split(args.micro_batch or max(len(mb), 1)):  # micro-batches
                policy_loss, kl, old_dev = nft_terms(policy, index_cond(cond, rows), x0[rows], a[rows], ts[rows, j],
                                                     noise[rows], state, args)
                loss = (policy_loss + args.beta * kl).sum() / (size * ts.shape[1])
                if not torch.isfinite(loss):
                    stats["train/skipped"] += 1
                    continue
                policy.backward(loss)
                stats["loss/policy"] += policy_loss.sum().item()
                stats["loss/kl"] += kl.sum().item()
                stats["train/old_dev"] += old_dev.sum().item()
                count += len(rows)
        sync_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        state["updates"] += 1
    ema_update(state["old"], params, old_decay(state["updates"], args))  # once per iteration, as the reference
    return {k: (v / max(count, 1) if k != "train/skipped" else v) for k, v in stats.items()}


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
