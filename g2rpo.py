"""G²RPO (Zhou et al., 2025, arXiv 2510.01982): Granular GRPO, step-aligned and multi-granularity advantages.

Flow-GRPO injects noise on every step and credits the whole trajectory's reward to each of them. G²RPO
samples one anchor ODE trajectory per prompt and, at each branching step k (the first half of denoising),
lets G children take one SDE step from the shared anchor state x_k ("singular stochastic sampling"), so a
child's reward measures step k alone. Each child is finished with the ODE at several granularities lambda
(strides over the schedule) and the group-normalised advantages of all granularities are summed ("multi-
granularity advantage integration"), so one advantage does not hinge on one solver's discretisation:

    A_k^i = sum_lambda (R_k^{i,lambda} - mean_i R_k^lambda) / std_i R_k^lambda       over the G children of x_k
    L     = mean_{i,k} max(-A_k^i rho_k^i, -A_k^i clip(rho_k^i, 1 - eps, 1 + eps))
    rho_k^i = pi_theta(x_{k+1}^i | x_k, c) / pi_old(x_{k+1}^i | x_k, c)

See docs/g2rpo.md for every implementation detail.

    python g2rpo.py                           # the embedded shapes world, on the CPU in minutes
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from common import (EMA, Logger, all_gather_objects, all_reduce, close_distributed, evaluate, gather_scores,
                    index_cond, init_distributed, load_checkpoint, load_policy, load_prompts, lora_config,
                    lora_targets, new_run_dir, pick_device, print0, reduce_metrics, rollout,
                    save_checkpoint, save_grid, sde_step, seed_everything, step_kl, sync_gradients, to_device,
                    warn_off_policy, weight_memory)
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
    # ---- G²RPO ----
    noise_level: float = 0.7
    """a in sigma_t = a sqrt(t / (1 - t)): the noise of the one SDE step each child takes"""
    clip_range: float = 1e-3
    """PPO clip epsilon on the per-step ratio (the reference: 1e-4 on FLUX)"""
    beta: float = 0.0
    """KL(pi_theta || pi_ref) coefficient (the paper and the reference: none)"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip]"""
    branch_steps: tuple[int, ...] = ()
    """the steps k that branch, 0 = the first (from noise); empty: the first half, 0 ... num_steps // 2 - 1 (paper)"""
    granularities: tuple[int, ...] = (1, 2, 3)
    """strides lambda of the children's ODE completions, one advantage each, summed (paper: {1, 2, 3}; code: {1, 2})"""
    minibatches: int = 2
    """optimiser steps per iteration: the branching steps, in order, are split into this many minibatches
    (as many as branching steps: the reference's one step per k; 1: the paper's single objective)"""

    def __post_init__(self):
        ks, lams = self.branch_steps, self.granularities
        if sorted(set(ks)) != list(ks) or any(not 0 <= k <= self.num_steps - 2 for k in ks):
            raise SystemExit(f"--branch-steps {' '.join(map(str, ks))}: distinct increasing steps between 0 and "
                             f"num_steps - 2 = {self.num_steps - 2} are required (the last step never branches)")
        if not lams or len(set(lams)) != len(lams) or min(lams) < 1:
            raise SystemExit(f"--granularities {' '.join(map(str, lams))}: distinct strides >= 1 are required")


# ------------------------------------------------------------------------------------------------
# G²RPO: sampling, advantages, update
# ------------------------------------------------------------------------------------------------
def noise_levels(k: int, args: Args) -> list[float]:
    """A child's noise level per step: the SDE (a) on its branching step k, the ODE (0) everywhere else."""
    return [args.noise_level if i == k else 0.0 for i in range(args.num_steps)]


def branch_steps(args: Args) -> list[int]:
    """The steps k that branch: --branch-steps, or the first half of denoising (the paper's M = {T, ..., T/2 + 1})."""
    return list(args.branch_steps) or list(range(args.num_steps // 2))


def granular_schedule(sigmas: torch.Tensor, k: int, lam: int) -> torch.Tensor:
    """sigma[0 .. k+1] ++ sigma[k+2 :: lam], its last entry set to 0: after the SDE step k -> k+1, one base step
    k+1 -> k+2, then strides of lam. The reference ends with the x0-prediction x - s v at the last point s it
    evaluates, which is the Euler step from s to 0, so a stride that misses sigma = 0 jumps there from s."""
    sched = torch.cat([sigmas[:k + 2], sigmas[k + 2::lam]])
    sched[-1] = 0.0
    return sched


@torch.no_grad()
def sample_batch(policy, prompts: list[str], state: dict, args: Args, gen: torch.Generator,
                 shared_gen: torch.Generator) -> dict:
    """One anchor ODE trajectory per prompt from one initial noise x_1. At each branching step k its state x_k is
    the shared parent of G children that take one SDE step there; each child is finished with the ODE at every
    granularity lambda, one image each, all scoring step k alone.
    Parents are ordered (k, prompt); children (parent, i); images (parent, i, lambda). Rollouts run in chunks of
    --sample-batch rows."""
    G, T = args.group_size, args.num_steps
    sigmas = policy.sigmas(T, args.shift)
    ks = branch_steps(args)
    cond = policy.encode(prompts)
    n = len(prompts)
    main = rollout(policy, cond, policy.noise(n, gen), sigmas, [0.0] * T, args.guidance, gen, chunk=args.sample_batch)
    kid = torch.arange(n).repeat_interleave(G)
    nexts, log_probs, images = [], [], []
    for k in ks:  # x_k shared by G children: SDE on step k, then the ODE at each granularity
        out = rollout(policy, index_cond(cond, kid), main.latents[kid, k], sigmas[:k + 2], noise_levels(k, args),
                      args.guidance, gen, start=k, chunk=args.sample_batch)
        nexts.append(out.latents[:, 1].unflatten(0, (n, G)))
        log_probs.append(out.log_probs[:, 0].view(n, G))
        finals = [rollout(policy, index_cond(cond, kid), out.latents[:, 1], granular_schedule(sigmas, k, lam),
                          [0.0] * T, args.guidance, start=k + 1, chunk=args.sample_batch).latents[:, -1]
                  for lam in args.granularities]
        images.append(policy.decode(torch.stack(finals, 1).flatten(0, 1)))
    parent = torch.arange(n).repeat(len(ks))
    image_prompt = kid.repeat_interleave(len(args.granularities)).repeat(len(ks))
    return {"prompts": [prompts[i] for i in image_prompt.tolist()], "images": torch.cat(images), "cond": cond,
            "prompt": parent, "steps": torch.tensor(ks).repeat_interleave(n),
            "states": main.latents[:, ks].transpose(0, 1).flatten(0, 1), "next": torch.cat(nexts),
            "log_probs": torch.cat(log_probs), "sigmas": sigmas}


def compute_advantages(batch: dict, rewards: torch.Tensor, info: dict, args: Args) -> torch.Tensor:
    """Multi-granularity advantage integration: per parent x_k and granularity lambda, the z-score of its G
    children's rewards (unbiased std + 1e-8, as the reference), summed over lambda, clipped. In float64, so that
    a granularity whose children scored alike adds exactly 0 (float32's mean of equal values can be off by a
    rounding error, which + 1e-8 would blow up). Several rewards (e.g. hpsv2:1,clipscore:1): each is z-scored on
    its own and the z-scores are added with the weights, as the reference does. (parents, children)."""
    parts = parse_reward_spec(args.reward)
    scores = [(rewards, 1.0)] if len(parts) == 1 else [(info[name], w) for name, w in parts]
    adv = 0
    for s, w in scores:
        r = s.double().view(*batch["log_probs"].shape, len(args.granularities))
        adv = adv + w * ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).sum(2)
    return adv.float().clamp(-args.adv_clip, args.adv_clip)


def init_state(policy, args: Args) -> dict:
    """Algorithm state carried across iterations and saved in checkpoints: G²RPO needs none."""
    return {}


def child_terms(policy, batch: dict, nodes: torch.Tensor, adv: torch.Tensor, k: int, args: Args):
    """Per child of the parent states `nodes` (all at step k): the clipped policy term max(-A r, -A clip(r)), the
    KL to the reference and the ratio r of its one SDE transition. One velocity pass per parent serves its children."""
    sig, c = batch["sigmas"], adv.shape[1]
    x, x_next = batch["states"][nodes], batch["next"][nodes].flatten(0, 1)
    cond, xs = index_cond(batch["cond"], batch["prompt"][nodes]), x.repeat_interleave(c, 0)
    v = policy.velocity(x, sig[k], cond, args.guidance)  # once per shared x_k, broadcast to its c children
    step = sde_step(xs, v.repeat_interleave(c, 0), sig[k], sig[k + 1], args.noise_level, prev_sample=x_next)
    ratio = torch.exp(step.log_prob - batch["log_probs"][nodes].flatten())
    a = adv[nodes].flatten().to(policy.device)
    clipped = torch.clamp(ratio, 1 - args.clip_range, 1 + args.clip_range)
    kl = torch.zeros_like(ratio)
    if args.beta > 0:  # the reference's ||mu - mu_ref||^2 / (2 sigma_t^2): the exact KL of the two steps times |dt|
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, sig[k], cond, args.guidance).repeat_interleave(c, 0)
        mean_ref = sde_step(xs, v_ref, sig[k], sig[k + 1], args.noise_level, prev_sample=x_next).mean
        kl = step_kl(step.mean, mean_ref, sig[k], sig[k + 1], args.noise_level)
    return torch.maximum(-a * ratio, -a * clipped), kl, ratio


def train_on_batch(policy, opt, batch: dict, adv: torch.Tensor, state: dict, args: Args,
                   gen: torch.Generator) -> dict:
    """PPO-clipped update of each child's one stochastic transition; one velocity evaluation per shared parent
    state serves all its children. With beta = 0, parents whose children all have advantage 0 are skipped. One
    optimiser step per minibatch of consecutive branching steps, in order of k (one per k: the reference); every
    rank trains its own prompts' parents at those steps, the gradient summed over the ranks."""
    c = adv.shape[1]
    # parents with some signal; with beta > 0 every parent, since its KL term has a gradient (as the reference)
    keep = torch.arange(len(adv)) if args.beta > 0 else adv.ne(0).any(1).nonzero().flatten()
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "train/clipfrac": 0.0, "train/ratio": 0.0}  # sums over children
    count, skipped, onpolicy_err = 0, 0, 0.0
    for i, ks in enumerate(batch["steps"].unique().chunk(args.minibatches)):  # consecutive branching steps, by k
        mb = keep[torch.isin(batch["steps"][keep], ks)]
        size = int(all_reduce(torch.tensor([len(mb)]))[0])  # the minibatch's parents over every rank
        opt.zero_grad(set_to_none=True)
        for k in batch["steps"][mb].unique().tolist():
            for nodes in mb[batch["steps"][mb] == k].split(args.micro_batch or len(mb)):  # micro-batches of parents
                policy_loss, kl, ratio = child_terms(policy, batch, nodes, adv, k, args)
                loss = (policy_loss + args.beta * kl).sum() / (size * c)  # the mean over the minibatch's children
                if not torch.isfinite(loss):
                    skipped += 1
                    continue
                policy.backward(loss)
                stats["loss/policy"] += policy_loss.sum().item()
                stats["loss/kl"] += kl.sum().item()
                stats["train/clipfrac"] += ((ratio - 1).abs() > args.clip_range).float().sum().item()
                stats["train/ratio"] += ratio.sum().item()
                count += len(ratio)
                if i == 0:  # before the first optimiser step: the ratio must be exactly 1
                    onpolicy_err = max(onpolicy_err, (ratio.detach() - 1).abs().max().item())
        sync_gradients(policy.trainable_parameters())
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.max_grad_norm)
        opt.step()
    return {**{k: v / max(count, 1) for k, v in stats.items()}, "train/skipped": skipped,
            "train/zero_adv": 1 - adv.ne(0).any(1).float().mean().item(), "train/onpolicy_ratio_err": onpolicy_err}


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
