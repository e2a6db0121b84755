"""Pre-training of the shapes world's base model: the tiny StableDiffusion3Pipeline shipped in assets/shapes_base.

One seeded command, two stages:

1. The VAE, a tiny diffusers AutoencoderKL (32x32x3 renders <-> 8x8x4 latents), learns rendered shapes. Its loss
   is L1 + L2 on pixels, plus a cross-entropy of every pixel's palette label (logits -||x_hat - colour_k||^2 / tau),
   which penalises exactly the blended edges and soft corners the shapes scorer misreads, plus a small KL to
   N(0, I). The latents' mean and std over renders become the VAE's shift_factor and 1 / scaling_factor, so
   decoding is SD3's z / scaling_factor + shift_factor. Its decoded ground truth is then scored (the bar: strict
   >= 0.97; below it RL could score by exploiting the decoder).
2. The pipeline's SD3 transformer and its two CLIP text encoders (shapes.build_sd3_pipeline; no T5) learn the
   VAE's latents of rendered ground truth with SD3's rectified-flow loss:

       x_t = (1 - t) x0 + t eps,   t ~ logit-normal(0, 1),   L = || v_theta(x_t, t | c) - (eps - x0) ||^2

   Prompts are encoded by the pipeline's own encode_prompt, as the `sd3` backend encodes them after loading.
   The same per-sample loss, weighted by advantages, is what AWM trains with. 10% of captions are dropped to
   the empty prompt so that classifier-free guidance works. The EMA weights are saved.

    python pretrain.py                         # both stages, writes assets/shapes_base
    python pretrain.py --vae DIR --out OUT     # stage 2 only, on the VAE saved in DIR (e.g. OUT_OLD/vae)
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from diffusers import AutoencoderKL
from tqdm import tqdm

import shapes
from common import SHAPES_BASE, evaluate, flow_matching_loss, load_policy, pick_device, save_grid, seed_everything
from rewards import make_reward


@dataclass
class Args:
    out: Path = SHAPES_BASE
    """where the pipeline is written (model_index.json, one folder per component, samples.png)"""
    seed: int = 0
    """seed of the renders, the noise and the initial weights of both stages"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    # ---- stage 1: the VAE ----
    vae: Path | None = None
    """a trained shapes VAE folder (e.g. a base's vae/): skip stage 1 and pre-train the transformer on its latents"""
    vae_steps: int = 2000
    """optimiser steps of the VAE"""
    vae_batch_size: int = 64
    """renders per VAE step"""
    vae_lr: float = 1e-3
    """the VAE's Adam learning rate (the same warm-up and cosine decay as stage 2)"""
    palette_weight: float = 0.1
    """weight of the per-pixel palette cross-entropy"""
    tau: float = 0.02
    """temperature of the palette logits (squared RGB distances; the closest two colours are 0.42 apart)"""
    kl_weight: float = 1e-6
    """weight of the KL of the posterior to N(0, I)"""
    factor: int = 4
    """the VAE's spatial downsampling: 4 (8x8x4 latents) or 2 (16x16x4)"""
    vae_eval_images: int = 1000
    """fresh renders whose decoded ground truth is scored after stage 1"""
    # ---- stage 2: the transformer and text encoders ----
    steps: int = 3000
    """optimiser steps"""
    batch_size: int = 128
    """images per step"""
    lr: float = 1e-3
    """AdamW learning rate (linear warm-up over 100 steps, then cosine decay to 10%)"""
    ema: float = 0.995
    """EMA decay of the saved weights"""
    cfg_drop: float = 0.1
    """fraction of captions replaced by the empty prompt (enables classifier-free guidance)"""
    pool: int = 65536
    """render and encode this many images once, then draw every batch from them (0: fresh renders every step;
    the VAE's encoder then costs about half of each step)"""
    eval_steps: int = 20
    """ODE steps of the final evaluation"""
    eval_guidance: float = 4.5
    """CFG scale of the final evaluation"""


def lr_at(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def ground_truth(captions: list[str], rng: random.Random) -> torch.Tensor:
    """One ground-truth render of each caption, pixels in [-1, 1] (the VAE's input range)."""
    return torch.stack([shapes.render_prompt(c, rng) for c in captions]) * 2 - 1


def renders(n: int, rng: random.Random) -> tuple[list[str], torch.Tensor]:
    """n random captions over the six categories and one ground-truth render of each, pixels in [-1, 1]."""
    captions = [shapes.random_caption(rng) for _ in range(n)]
    return captions, ground_truth(captions, rng)


# ----------------------------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, args: Args) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample
    labels = shapes.palette_labels((x + 1) / 2)
    logits = -shapes.palette_distances((y + 1) / 2) / args.tau  # B K H W
    ce = F.cross_entropy(logits, labels)
    rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
    kl = post.kl().mean()
    return rec + args.palette_weight * ce + args.kl_weight * kl, {"rec": rec.item(), "ce": ce.item()}


def train_vae(args: Args):
    vae = shapes.build_vae(args.factor).train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.vae_steps))
    rng = random.Random(args.seed)
    print(f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params")
    bar = tqdm(range(args.vae_steps), desc="vae")
    for _ in bar:
        loss, parts = vae_loss(vae, renders(args.vae_batch_size, rng)[1], args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{parts['rec']:.4f}", ce=f"{parts['ce']:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # the latents' statistics: decoding is z / scaling_factor + shift_factor
        z = torch.cat([vae.encode(x).latent_dist.mode() for x in renders(2048, rng)[1].split(256)])
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return vae


@torch.no_grad()
def decoded_scores(vae, n: int, seed: int) -> dict:
    """The shapes scorer on the decoded ground truth (posterior mean) of n fresh prompts: score, strict, per
    category."""
    captions, x = renders(n, random.Random(seed))
    y = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(250)])
    partial, strict, cats = shapes.score((y + 1) / 2, captions)
    out = {"score": partial.mean().item(), "strict": strict.mean().item()}
    for c in shapes.CATEGORIES:
        out[f"strict/{c}"] = strict[torch.tensor([k == c for k in cats])].mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# Stage 2: the transformer and its text encoders on the VAE's latents
# ----------------------------------------------------------------------------------------------
def rectified_flow_loss(velocity, x0: torch.Tensor) -> torch.Tensor:
    """The pre-training loss on a batch of clean latents x0: t ~ logit-normal(0, 1), x_t = (1 - t) x0 + t eps,
    mean over the batch of ||velocity(x_t, 1000 t) - (eps - x0)||^2."""
    t = torch.sigmoid(torch.randn(len(x0)))
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    return flow_matching_loss(velocity(x_t, t * 1000), x0, eps).mean()


@torch.no_grad()
def to_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE's normalised latents (posterior mean), the inverse of the policy's decode."""
    z = vae.encode(x).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def render_batch(n: int, rng: random.Random, vae) -> tuple[list[str], torch.Tensor]:
    """n random captions and the VAE's latents of one ground-truth render of each."""
    captions, x0 = renders(n, rng)
    return captions, to_latents(vae, x0)


def batches(args: Args, vae, rng: random.Random):
    """The training stream: fresh renders every step, or (--pool) random batches of a pool encoded once."""
    if not args.pool:
        while True:
            yield render_batch(args.batch_size, rng, vae)
    parts = [render_batch(min(256, args.pool - i), rng, vae) for i in tqdm(range(0, args.pool, 256), desc="pool")]
    captions, x0 = [c for p in parts for c in p[0]], torch.cat([p[1] for p in parts])
    while True:
        idx = rng.sample(range(args.pool), args.batch_size)
        yield [captions[i] for i in idx], x0[idx]


def build_base(vae, tokenizer, device):
    """The pipeline, the models to pre-train (its transformer and two CLIP encoders) and velocity(x_t, timestep,
    captions), prompts encoded as the pipeline encodes them (so the `sd3` backend sees what pre-training saw)."""
    pipe = shapes.build_sd3_pipeline(vae, tokenizer)

    def velocity(x_t, timestep, captions):
        pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                              device=device, max_sequence_length=pipe.tokenizer_max_length)
        return pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=pe,
                                pooled_projections=pooled).sample

    return pipe, [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2], velocity


def train_base(args: Args, vae, device):
    seed_everything(args.seed)
    pipe, models, velocity = build_base(vae, shapes.build_tokenizer(), device)
    for m in models:
        m.train()
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps))
    emas = [copy.deepcopy(m).eval() for m in models]
    rng = random.Random(args.seed)
    print(f"transformer {sum(p.numel() for p in models[0].parameters()) / 1e6:.2f}M params, text encoders "
          f"{sum(p.numel() for m in models[1:] for p in m.parameters()) / 1e6:.2f}M")
    bar = tqdm(range(args.steps), desc="pretrain")
    for _, (captions, x0) in zip(bar, batches(args, vae, rng)):
        captions = ["" if rng.random() < args.cfg_drop else c for c in captions]
        loss = rectified_flow_loss(lambda x_t, timestep: velocity(x_t, timestep, captions), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema_m, m in zip(emas, models):
                for pe, p in zip(ema_m.parameters(), m.parameters()):
                    pe.lerp_(p, 1 - args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    for ema_m, m in zip(emas, models):
        m.load_state_dict(ema_m.state_dict())  # the EMA weights are the ones saved
    return pipe


def main(args: Args) -> dict:
    if args.vae is not None and not (args.vae / "config.json").is_file():
        raise SystemExit(f"--vae {args.vae}: no VAE there; pass a folder written by a VAE's save_pretrained "
                         f"(a shapes base's vae/), or leave --vae unset to train one")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("cpu")
    t0 = time.time()
    if args.vae is None:
        torch.manual_seed(args.seed)
        vae = train_vae(args)
        report = decoded_scores(vae, args.vae_eval_images, args.seed + 1)
        print(f"stage 1: the VAE in {(time.time() - t0) / 60:.1f} min; decoded ground truth of {args.vae_eval_images} "
              f"renders: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    else:
        vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    t1 = time.time()
    pipe = train_base(args, vae, device)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out)
    policy = load_policy(str(args.out), device)
    prompts = shapes.prompt_split("eval")
    metrics, images = evaluate(policy, prompts, make_reward("shapes"), per_prompt=4, num_steps=args.eval_steps,
                               shift=3.0, guidance=args.eval_guidance, seed=1234)
    save_grid(images, args.out / "samples.png", nrow=8)
    print(f"stage 2: {args.steps} steps in {(time.time() - t1) / 60:.1f} min (both stages {(time.time() - t0) / 60:.1f}"
          f" min); eval ({len(prompts)} held-out prompts x 4, {args.eval_steps}-step ODE, CFG {args.eval_guidance}):")
    for k, v in metrics.items():
        print(f"  {k:28s} {v:.3f}")
    return metrics


if __name__ == "__main__":
    main(tyro.cli(Args))
