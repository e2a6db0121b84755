"""TempFlow-GRPO (He et al., 2025, arXiv 2508.04324): GRPO whose credit and weight follow the denoising step.

Flow-GRPO gives every step of a trajectory the same terminal advantage and weights every step alike.
TempFlow-GRPO samples a deterministic main ODE trajectory x_1 ... x_0 and, at a branching step k, lets K
children take one SDE step from the shared state x_k and finish with the ODE. The only randomness of child j
is its step k, so its reward R_k^j credits step k alone (a process reward); the K children of one
(prompt, seed, step) form the group. Each step's clipped term is weighted by its transition std, normalised
to mean 1 ("noise-aware weighting"), because the unweighted gradient is dominated by the low-noise steps:

    A_k^j = (R_k^j - mean_j R_k) / (std_j R_k + 1e-4)          seed group: one (prompt, seed, step k)
    L     = mean_{j,k} Norm(sigma_k sqrt(dt_k)) max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta KL
    rho_k^j = pi_theta(x_{k+1}^j | x_k, c) / pi_old(x_{k+1}^j | x_k, c)

See docs/tempflow_grpo.md for every implementation detail.

    python tempflow_grpo.py                   # the embedded shapes world, on the CPU in minutes
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tqdm import tqdm

from common import (EMA, Logger, all_gather_objects, close_distributed, evaluate, gather_scores, global_rows,
                    index_cond, init_distributed, load_checkpoint, load_policy, load_prompts, local_minibatches,
                    lora_config, lora_targets, new_run_dir, pick_device, print0, reduce_metrics, rollout,
                    save_checkpoint, save_grid, sde_step, seed_everything, sync_gradients, to_device, warn_off_policy,
                    weight_memory, world_size)
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
    # ---- TempFlow-GRPO ----
    noise_level: float = 0.7
    """a in sigma_t = a sqrt(t / (1 - t)): the noise of the one SDE step each child takes"""
    clip_range: float = 1e-3
    """PPO clip epsilon on the per-step ratio (the reference: 1e-4 on SD3.5-M)"""
    beta: float = 0.004
    """KL(pi_theta || pi_ref) coefficient, on the exact KL of the two Gaussian steps as TempFlow's reference computes
    it (unlike Flow-GRPO's, which is |dt| times smaller); the reference: 0.004 GenEval and FLUX, 0.001 PickScore"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip]"""
    seeds: int = 1
    """initial noises x_1 per prompt, each with its own main trajectory (the paper: 4)"""
    branch_steps: int = 0
    """branch at this many steps, drawn anew each iteration from 0 ... num_steps - 2; 0: at all of them (the paper)"""
    prompt_group: bool = False
    """normalise advantages over all seeds of a prompt at a step ("prompt group") instead of per seed ("seed group")"""
    noise_weighting: bool = True
    """weight each step's clipped term by Norm(sigma_t sqrt(dt)), mean 1 over steps 0 ... num_steps - 2"""
    branching: bool = True
    """branch from a main ODE trajectory; --no-branching: group_size SDE trajectories per seed, each trained at the
    same steps with the trajectory's reward (Flow-GRPO with the seed group and the weighting: the ablation)"""
    minibatches: int = 2
    """optimiser steps per iteration: the branching states (parents) are split into this many minibatches"""

    def __post_init__(self):
        if self.seeds < 1 or not 0 <= self.branch_steps <= self.num_steps - 1:
            raise SystemExit(f"--seeds >= 1 and --branch-steps between 0 (all) and num_steps - 1 = "
                             f"{self.num_steps - 1} are required (got {self.seeds}, {self.branch_steps})")


# ------------------------------------------------------------------------------------------------
# TempFlow-GRPO: sampling, advantages, update
# ------------------------------------------------------------------------------------------------
def noise_levels(k: int, args: Args) -> list[float]:
    """A child's noise level per step: the SDE (a) on its branching step k, the ODE (0) everywhere else."""
    return [args.noise_level if i == k else 0.0 for i in range(args.num_steps)]


def branch_steps(args: Args, gen: torch.Generator) -> list[int]:
    """The steps k that branch this iteration: every step but the last (which is never trained), or
    --branch-steps of them drawn at random, in denoising order."""
    if not args.branch_steps:
        return list(range(args.num_steps - 1))
    return sorted(torch.randperm(args.num_steps - 1, generator=gen, device=gen.device)[:args.branch_steps].tolist())


def step_weights(sigmas: torch.Tensor, args: Args) -> torch.Tensor:
    """Norm(sigma_t sqrt(dt)): each step's transition std (sde_step's) over its mean on the branchable steps
    0 ... T-2, so the trained steps' weights average 1 (the reference hard-codes 1/mean = 2.25 for SD3.5-M's
    10-step schedule); all ones with --no-noise-weighting."""
    if not args.noise_weighting:
        return torch.ones(len(sigmas) - 1)
    z = torch.zeros(1)
    std = torch.stack([sde_step(z, z, sigmas[i], sigmas[i + 1], args.noise_level, noise=z).std
                       for i in range(len(sigmas) - 1)])
    return std / std[:-1].mean()


@torch.no_grad()
def sample_batch(policy, prompts: list[str], state: dict, args: Args, gen: torch.Generator,
                 shared_gen: torch.Generator) -> dict:
    """Trajectories from `seeds` initial noises per prompt. Branching: one main ODE trajectory per seed; at each
    branching step k its state x_k is the shared parent of K children that take one SDE step there and finish
    with the ODE, and each child's image scores step k alone. --no-branching: K SDE trajectories per seed (x_1
    shared); each (trajectory, k) is a parent with one child, scored by the trajectory's image.
    Parents are ordered (k, trajectory); children (parent, j). Rollouts run in chunks of --sample-batch rows."""
    S, K, T = args.seeds, args.group_size, args.num_steps
    sigmas = policy.sigmas(T, args.shift)
    ks = branch_steps(args, shared_gen)  # the same on every rank
    cond = policy.encode(prompts)
    seed = torch.arange(len(prompts) * S)  # trajectory i starts from seed[i], an x_1 of prompt seed[i] // S
    if not args.branching:
        seed = seed.repeat_interleave(K)  # K SDE trajectories per seed
    main = rollout(policy, index_cond(cond, seed // S), policy.noise(len(prompts) * S, gen)[seed], sigmas,
                   [0.0 if args.branching else args.noise_level] * T, args.guidance, gen, chunk=args.sample_batch)
    n = len(seed)
    if args.branching:
        kid = torch.arange(n).repeat_interleave(K)
        nexts, log_probs, images = [], [], []
        for k in ks:  # x_k shared by K children: SDE on step k, then the ODE to x_0
            out = rollout(policy, index_cond(cond, seed[kid] // S), main.latents[kid, k], sigmas, noise_levels(k, args),
                          args.guidance, gen, start=k, chunk=args.sample_batch)
            nexts.append(out.latents[:, 1].unflatten(0, (n, K)))
            log_probs.append(out.log_probs[:, 0].view(n, K))
            images.append(policy.decode(out.latents[:, -1]))
        images, image_traj = torch.cat(images), kid.repeat(len(ks))
        next_states, log_probs = torch.cat(nexts), torch.cat(log_probs)
        image = torch.arange(len(images)).view(-1, K)
    else:  # every trained transition of every trajectory, one child each
        images, image_traj = policy.decode(main.latents[:, -1]), torch.arange(n)
        next_states = main.latents[:, [k + 1 for k in ks]].transpose(0, 1).flatten(0, 1).unsqueeze(1)
        log_probs = main.log_probs[:, ks].T.flatten().unsqueeze(1)
        image = torch.arange(n).repeat(len(ks)).unsqueeze(1)
    parent = torch.arange(n).repeat(len(ks))  # the trajectory of each parent
    return {"prompts": [prompts[i] for i in (seed[image_traj] // S).tolist()], "images": images, "cond": cond,
            "prompt": seed[parent] // S, "seed": seed[parent], "steps": torch.tensor(ks).repeat_interleave(n),
            "states": main.latents[:, ks].transpose(0, 1).flatten(0, 1), "next": next_states, "log_probs": log_probs,
            "image": image, "sigmas": sigmas}


def compute_advantages(batch: dict, rewards: torch.Tensor, info: dict, args: Args) -> torch.Tensor:
    """Seed group: the z-score (population std + 1e-4) of the children of one (prompt, seed, step); with
    --prompt-group of all seeds of a prompt at a step. In float64, so that a group whose children scored alike
    gets exactly 0 (float32's mean of equal values can be off by a rounding error). Clipped. (parents, children)."""
    key = batch["prompt"] if args.prompt_group else batch["seed"]
    groups = torch.unique(torch.stack([batch["steps"], key], 1), dim=0, return_inverse=True)[1]
    r = rewards[batch["image"]].double()
    adv = torch.zeros_like(r)
    for g in groups.unique():
        m = groups == g
        adv[m] = (r[m] - r[m].mean()) / (r[m].std(unbiased=False) + 1e-4)
    return adv.float().clamp(-args.adv_clip, args.adv_clip)


def init_state(policy, args: Args) -> dict:
    """Algorithm state carried across iterations and saved in checkpoints: TempFlow-GRPO needs none."""
    return {}


def child_terms(policy, batch: dict, nodes: torch.Tensor, adv: torch.Tensor, k: int, w_k: float, args: Args):
    """Per child of the parent states `nodes` (all at step k): the clipped policy term w_k max(-A r, -A clip(r)), the
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
    if args.beta > 0:  # the exact KL of the two Gaussian steps, ||mu - mu_ref||^2 / (2 std^2), as TempFlow's reference
        with torch.no_grad(), policy.reference():
            v_ref = policy.velocity(x, sig[k], cond, args.guidance).repeat_interleave(c, 0)
        mean_ref = sde_step(xs, v_ref, sig[k], sig[k + 1], args.noise_level, prev_sample=x_next).mean
        kl = ((step.mean - mean_ref) ** 2).mean(dim=tuple(range(1, x.ndim))) / (2 * step.std.flatten() ** 2)
    return w_k * torch.maximum(-a * ratio, -a * clipped), kl, ratio


def train_on_batch(policy, opt, batch: dict, adv: torch.Tensor, state: dict, args: Args,
                   gen: torch.Generator) -> dict:
    """PPO-clipped update of each child's one stochastic transition, weighted by its step's Norm(sigma_t sqrt(dt));
    one velocity evaluation per shared parent state serves all its children. Parents whose children all have
    advantage 0 are skipped when beta = 0. One optimiser step per minibatch of parents."""
    w, c = step_weights(batch["sigmas"], args), adv.shape[1]
    # parents with some signal; with beta > 0 every parent, since its KL term has a gradient (as the reference)
    keep = torch.arange(len(adv)) if args.beta > 0 else adv.ne(0).any(1).nonzero().flatten()
    # parent (step index s, trajectory t) of this rank is parent (s, rank * n + t) of the global batch
    n = len(adv) // len(batch["steps"].unique())
    ids = (keep // n) * n * world_size() + global_rows(n)[keep % n]
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "train/clipfrac": 0.0, "train/ratio": 0.0}  # sums over children
    count, skipped, onpolicy_err = 0, 0, 0.0
    for i, (rows, _, size) in enumerate(local_minibatches(ids, args.minibatches, gen)):
        mb = keep[rows]
        opt.zero_grad(set_to_none=True)
        for k in batch["steps"][mb].unique().tolist():
            for nodes in mb[batch["steps"][mb] == k].split(args.micro_batch or len(mb)):  # micro-batches of parents
                policy_loss, kl, ratio = child_terms(policy, batch, nodes, adv, k, w[k], args)
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
