"""Flow-matching pre-training of the tiny shapes base model (the checkpoint shipped in assets/).

A tiny CLIP text encoder (tokenizer built in code) and a 1M-parameter pixel-space UNet learn the shapes
world from rendered ground truth with the rectified-flow loss of SD3:

    x_t = (1 - t) x0 + t eps,   t ~ logit-normal(0, 1),   L = || v_theta(x_t, t | c) - (eps - x0) ||^2

The same per-sample loss, weighted by advantages, is what AWM trains with. 10% of captions are dropped
to the empty prompt so that classifier-free guidance works. The EMA weights are saved.

    python pretrain.py                      # ~10 CPU minutes, writes assets/shapes_base

With --vae (a shapes VAE, benchmarks/latent_shapes.py), the UNet learns the VAE's latents instead of pixels, as
SD3 does (z = (E(x) - shift_factor) * scaling_factor), and the folder written also holds the VAE.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from diffusers import AutoencoderKL
from tqdm import tqdm

import shapes
from common import SHAPES_BASE, evaluate, flow_matching_loss, pick_device, save_grid, seed_everything, shapes_policy
from rewards import make_reward


@dataclass
class Args:
    steps: int = 1400
    """optimiser steps"""
    batch_size: int = 64
    """images per step"""
    lr: float = 1e-3
    """AdamW learning rate (linear warm-up over 100 steps, then cosine decay to 10%)"""
    ema: float = 0.995
    """EMA decay of the saved weights"""
    cfg_drop: float = 0.1
    """fraction of captions replaced by the empty prompt (enables classifier-free guidance)"""
    seed: int = 0
    """seed of the data stream, the noise and the initial weights"""
    out: Path = SHAPES_BASE
    """where the base model is written (unet/, text_encoder/, tokenizer/, samples.png)"""
    eval_steps: int = 20
    """ODE steps of the final evaluation"""
    eval_guidance: float = 4.5
    """CFG scale of the final evaluation"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    vae: Path | None = None
    """a shapes VAE folder: pre-train on its latents (a latent shapes base) instead of on pixels"""


def lr_at(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def rectified_flow_loss(velocity, x0: torch.Tensor) -> torch.Tensor:
    """The pre-training loss on a batch of clean images x0: t ~ logit-normal(0, 1), x_t = (1 - t) x0 + t eps,
    mean over the batch of ||velocity(x_t, 1000 t) - (eps - x0)||^2."""
    t = torch.sigmoid(torch.randn(len(x0)))
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    return flow_matching_loss(velocity(x_t, t * 1000), x0, eps).mean()


@torch.no_grad()
def to_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE's normalised latents (posterior mean), the inverse of shapes_policy's decode."""
    z = vae.encode(x).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def main(args: Args) -> None:
    if args.vae is not None and args.out == SHAPES_BASE:
        raise SystemExit("--vae: pass --out too (a latent base must not overwrite the shipped pixel base)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("cpu")
    seed_everything(args.seed)
    tokenizer = shapes.build_tokenizer()
    text_encoder = shapes.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id).train()
    vae = None if args.vae is None else AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    unet = shapes.build_unet().train() if vae is None else shapes.build_unet(
        vae.config.latent_channels, shapes.RES // 2 ** (len(vae.config.block_out_channels) - 1)).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps))
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    rng = random.Random(args.seed)
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")

    t0 = time.time()
    bar = tqdm(range(args.steps), desc="pretrain")
    for step in bar:
        captions = [shapes.random_caption(rng) for _ in range(args.batch_size)]
        x0 = torch.stack([shapes.render_prompt(c, rng) for c in captions]) * 2 - 1  # pixels in [-1, 1]
        if vae is not None:
            x0 = to_latents(vae, x0)
        captions = ["" if rng.random() < args.cfg_drop else c for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=shapes.MAX_TOKENS, return_tensors="pt").input_ids
        loss = rectified_flow_loss(
            lambda x_t, timestep: unet(x_t, timestep, encoder_hidden_states=text_encoder(ids).last_hidden_state).sample,
            x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema_m, m in ((ema_unet, unet), (ema_te, text_encoder)):
                for pe, p in zip(ema_m.parameters(), m.parameters()):
                    pe.lerp_(p, 1 - args.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    minutes = (time.time() - t0) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    ema_unet.save_pretrained(args.out / "unet")
    ema_te.save_pretrained(args.out / "text_encoder")
    tokenizer.save_pretrained(args.out / "tokenizer")
    if vae is not None:
        vae.save_pretrained(args.out / "vae")
    policy = shapes_policy(ema_unet, ema_te, tokenizer, device, vae)
    prompts = shapes.prompt_split("eval")
    metrics, images = evaluate(policy, prompts, make_reward("shapes"), per_prompt=4, num_steps=args.eval_steps,
                               shift=3.0, guidance=args.eval_guidance, seed=1234)
    save_grid(images, args.out / "samples.png", nrow=8, scale=4)
    print(f"pre-trained {args.steps} steps in {minutes:.1f} min; eval ({len(prompts)} held-out prompts x 4, "
          f"{args.eval_steps}-step ODE, CFG {args.eval_guidance}):")
    for k, v in metrics.items():
        print(f"  {k:28s} {v:.3f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
