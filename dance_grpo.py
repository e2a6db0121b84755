"""DanceGRPO (Xue et al., 2025, arXiv 2505.07818): GRPO for rectified flows with a constant-noise SDE.

Like Flow-GRPO, DanceGRPO samples with a reverse SDE that has the flow's marginals, so that every step is a
Gaussian policy with a log-probability. Its diffusion coefficient is a constant eta instead of Flow-GRPO's
a sqrt(t/(1-t)), and its drift is written with the score estimated from the x0-prediction:

    dx = [v - eta^2/2 * score(x, t)] dt + eta dw,   score = -(x - (1-t) x0_hat) / t^2,   x0_hat = x - t v

so a step's std is eta sqrt(sigma - sigma_next) whatever the noise level. All G images of a prompt start from
the same noise x_1, each image trains a random subset of the sampled steps (a fraction, 60% in the reference),
there is no KL term, and several rewards are z-scored within the group one by one before they are added:

    A_i = sum_k w_k (R_ik - mean_k) / std_k,   clipped to [-5, 5]
    L   = mean_{i, t in S_i} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps)),   S_i random per image

See docs/dance_grpo.md for every implementation detail.

    python dance_grpo.py                      # the embedded shapes world, on the CPU in minutes
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from common import (EMA, Logger, Step, all_gather_objects, close_distributed, evaluate, gather_scores, global_rows,
                    group_advantages, index_cond, init_distributed, load_checkpoint, load_policy, load_prompts,
                    local_minibatches, lora_config, lora_targets, new_run_dir, pick_device, print0, reduce_metrics,
                    save_checkpoint, save_grid, sde_step, seed_everything, sigma_schedule, sync_gradients, to_device,
                    warn_off_policy, weight_memory, world_size)
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
    # ---- DanceGRPO ----
    eta: float = 0.7
    """eta: the SDE's diffusion coefficient, the same at every noise level; a step's std is eta sqrt(sigma -
    sigma_next) (the reference: 0.3 on FLUX)"""
    clip_range: float = 1e-3
    """PPO clip epsilon on the per-step ratio (the reference: 1e-4)"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip]"""
    timestep_fraction: float = 0.6
    """each image trains int((num_steps - 1) * fraction) of its num_steps - 1 stochastic steps, drawn at random
    per image (the last step, the jump to sigma = 0, is deterministic and never trained)"""
    same_noise: bool = True
    """one initial noise x_1 per group, as the reference does (--no-same-noise: one per image)"""
    beta: float = 0.0
    """KL(pi_theta || pi_ref) coefficient in Flow-GRPO's form ||mu - mu_ref||^2 / (2 eta^2); the reference has none"""
    minibatches: int = 2
    """optimiser steps per iteration: the batch is split into this many minibatches"""

    def __post_init__(self):
        if self.eta <= 0 or not 0 < self.timestep_fraction <= 1:
            raise SystemExit(f"--eta {self.eta} / --timestep-fraction {self.timestep_fraction}: eta must be > 0 "
                             "and the fraction of steps trained in (0, 1]")


# ------------------------------------------------------------------------------------------------
# DanceGRPO: the SDE step, sampling, advantages, update
# ------------------------------------------------------------------------------------------------
def dance_step(x, v, sigma, sigma_next, eta: float, noise=None, prev_sample=None, generator=None) -> Step:
    """One Euler-Maruyama step of DanceGRPO's reverse SDE, dx = [v - eta^2/2 score] dt + eta dw, with
    t = sigma, dt = sigma_next - sigma < 0. The reference estimates the score from the x0-prediction,
    score = -(x - (1 - t) x0_hat) / t^2 with x0_hat = x - t v; since x - (1 - t) x0_hat = t (x + (1 - t) v):

        mean = x + [v + eta^2 / (2 t) * (x + (1 - t) v)] dt,     std = eta * sqrt(-dt)

    (Flow-GRPO's step with sigma_t = eta at every t). eta = 0 is the Euler ODE step x + v dt, which has no density.
    Float32; sigma and sigma_next are floats or (B,) tensors. Returns what common.sde_step returns."""
    return sde_step(x, v, sigma, sigma_next, eta, noise, prev_sample, generator, constant=True)


@torch.no_grad()
def dance_rollout(policy, cond: dict, x: torch.Tensor, sigmas: torch.Tensor, eta: float, guidance: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDE on every step but the last; the last one, to sigma = 0, is the Euler step x - sigma v, i.e. the
    x0-prediction, which is the image the reference decodes. (latents (B, T + 1, ...), log-probs (B, T), 0 on the
    last step)."""
    latents, log_probs = [x.float()], []
    for i in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[i], cond, guidance)
        step = dance_step(x, v, sigmas[i], sigmas[i + 1], eta if i < len(sigmas) - 2 else 0.0, generator=gen)
        x = step.sample
        latents.append(x)
        log_probs.append(step.log_prob if step.log_prob is not None else torch.zeros(len(x), device=x.device))
    return torch.stack(latents, 1), torch.stack(log_probs, 1)


@torch.no_grad()
def sample_batch(policy, prompts: list[str], state: dict, args: Args, gen: torch.Generator,
                 shared_gen: torch.Generator) -> dict:
    """G images per prompt from one shared x_1 (--same-noise), in chunks of --sample-batch images. The sigmas are
    spaced as the reference spaces them for every model, shift(linspace(1, 0, T + 1)): common's "flux" spacing."""
    all_prompts = [p for p in prompts for _ in range(args.group_size)]
    cond = policy.encode(all_prompts)
    sigmas = sigma_schedule(args.num_steps, args.shift, "flux")
    x = policy.noise(len(prompts), gen).repeat_interleave(args.group_size, 0) if args.same_noise \
        else policy.noise(len(all_prompts), gen)
    chunks = [dance_rollout(policy, index_cond(cond, rows), x[rows], sigmas, args.eta, args.guidance, gen)
              for rows in torch.arange(len(x), device=x.device).split(args.sample_batch or len(x))]
    latents, log_probs = (torch.cat(parts) for parts in zip(*chunks))
    return {"prompts": all_prompts, "groups": torch.arange(len(prompts)).repeat_interleave(args.group_size),
            "cond": cond, "latents": latents, "log_probs": log_probs, "sigmas": sigmas,
            "images": policy.decode(latents[:, -1])}


def compute_advantages(batch: dict, rewards: torch.Tensor, info: dict, args: Args) -> torch.Tensor:
    """GRPO per prompt, clipped. Several rewards: A_i = sum_k w_k (R_ik - mu_k) / sigma_k, one group z-score per
    reward model, then the weighted sum (the reference's multi-reward trainer sums per-reward losses, see the docs)."""
    parts = parse_reward_spec(args.reward)
    if len(parts) == 1:
        adv = group_advantages(rewards, batch["groups"])
    else:
        adv = sum(w * group_advantages(info[name], batch["groups"]) for name, w in parts)
    return adv.clamp(-args.adv_clip, args.adv_clip)


def init_state(policy, args: Args) -> dict:
    """Algorithm state carried across iterations and saved in checkpoints: DanceGRPO needs none."""
    return {}


def trained_steps(n_local: int, args: Args, gen: torch.Generator) -> torch.Tensor:
    """(n_local, K): the steps each of this rank's images trains, in the order it trains them: the first
    K = int((T - 1) * fraction) of a random permutation of the T - 1 stochastic steps, one per image of the global
    batch, drawn by the generator every rank shares (so the draw does not depend on the number of processes)."""
    n = args.num_steps - 1
    k = max(1, int(n * args.timestep_fraction))
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(world_size() * n_local)])
    return perms[global_rows(n_local), :k]


def ppo_terms(policy, batch: dict, rows: torch.Tensor, j: torch.Tensor, a: torch.Tensor, args: Args):
    """Per image of `rows` at its own step j (a tensor, one step per image): the clipped policy term
    max(-A r, -A clip(r)), the KL to the reference and the ratio r = pi_theta(x_{j+1} | x_j) / pi_old(x_{j+1} | x_j)."""
    sig, cond = batch["sigmas"], index_cond(batch["cond"], rows)
    x, x_next, s, s_next = batch["latents"][rows, j], batch["latents"][rows, j + 1], sig[j], sig[j + 1]
    step = dance_step(x, policy.velocity(x, s, cond, args.guidance), s, s_next, args.eta, prev_sample=x_next)
    ratio = torch.exp(step.log_prob - batch["log_probs"][rows, j])
    clipped = torch.clamp(ratio, 1 - args.clip_range, 1 + args.clip_range)
    kl = torch.zeros_like(ratio)
    if args.beta > 0:  # ||mu - mu_ref||^2 / (2 eta^2): the exact KL of the two steps times |dt|, as Flow-GRPO's form
        with torch.no_grad(), policy.reference():
            mean_ref = dance_step(x, policy.velocity(x, s, cond, args.guidance), s, s_next, args.eta,
                                  prev_sample=x_next).mean
        kl = ((step.mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.ndim))) / (2 * args.eta**2)
    return torch.maximum(-a * ratio, -a * clipped), kl, ratio


def train_on_batch(policy, opt, batch: dict, adv: torch.Tensor, state: dict, args: Args,
                   gen: torch.Generator) -> dict:
    """PPO-clipped policy gradient over each image's random steps, one optimiser step per minibatch (of the global
    batch: this rank's rows of it, the gradient summed over the ranks)."""
    steps = trained_steps(len(adv), args, gen)  # K forward/backward passes per image instead of T - 1
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "train/clipfrac": 0.0, "train/ratio": 0.0, "train/skipped": 0}
    count, onpolicy_err = 0, 0.0  # (image, step) pairs trained; the statistics are sums over them
    for i, (mb, _, size) in enumerate(local_minibatches(global_rows(len(adv)), args.minibatches, gen)):
        opt.zero_grad(set_to_none=True)
        for slot in range(steps.shape[1]):
            for rows in mb.split(args.micro_batch or max(len(mb), 1)):  # micro-batches: the same gradient, accumulated
                policy_loss, kl, ratio = ppo_terms(policy, batch, rows, steps[rows, slot], adv[rows].to(policy.device),
                                                   args)
                loss = (policy_loss + args.beta * kl).sum() / (size * steps.shape[1])  # mean over minibatch, steps
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
    return {**{k: (v / max(count, 1) if k != "train/skipped" else v) for k, v in stats.items()},
            "train/onpolicy_ratio_err": onpolicy_err}


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
