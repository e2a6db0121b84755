"""Flow-matching pre-training of the tiny shapes base model (the checkpoint shipped in assets/).

A tiny CLIP text encoder (tokenizer built in code) and a 1M-parameter pixel-space UNet learn the shapes
world from rendered ground truth with the rectified-flow loss of SD3:

    x_t = (1 - t) x0 + t eps,   t ~ logit-normal(0, 1),   L = || v_theta(x_t, t | c) - (eps - x0) ||^2

The same per-sample loss, weighted by advantages, is what AWM trains with. 10% of captions are dropped
to the empty prompt so that classifier-free guidance works. The EMA weights are saved.

    python pretrain.py                      # ~10 CPU minutes, writes assets/shapes_base

With --vae (a shapes VAE, benchmarks/latent_shapes.py), the UNet learns the VAE's latents instead of pixels, as
SD3 does (z = (E(x) - shift_factor) * scaling_factor), and the folder written also holds the VAE. With --vae and
--sd3, the denoiser is a tiny SD3 transformer with SD3's two CLIP text encoders, and the folder written is a
StableDiffusion3Pipeline (shapes.build_sd3_pipeline), loaded by the same `sd3` backend as SD3.5-M.
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
from common import SHAPES_BASE, evaluate, flow_matching_loss, load_policy, pick_device, save_grid, seed_everything
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
    pool: int = 0
    """with --vae: render and encode this many images once, then draw every batch from them (0: fresh renders every
    step, as the pixel base); the VAE's encoder otherwise costs about half of a latent step"""
    sd3: bool = False
    """with --vae: an SD3 transformer and SD3's text encoders, saved as a StableDiffusion3Pipeline folder"""


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


def render_batch(n: int, rng: random.Random, vae) -> tuple[list[str], torch.Tensor]:
    """n random captions and one ground-truth render of each: pixels in [-1, 1], or with a VAE its latents."""
    captions = [shapes.random_caption(rng) for _ in range(n)]
    x0 = torch.stack([shapes.render_prompt(c, rng) for c in captions]) * 2 - 1
    return captions, x0 if vae is None else to_latents(vae, x0)


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


def build_base(args: Args, tokenizer, vae, device):
    """The models to pre-train and velocity(x_t, timestep, captions): a UNet with one CLIP text encoder (the shapes
    base), or with --sd3 an SD3 pipeline's transformer and its two CLIP encoders, prompts encoded as the pipeline
    encodes them (so the `sd3` backend sees what pre-training saw)."""
    if args.sd3:
        pipe = shapes.build_sd3_pipeline(vae, tokenizer)

        def velocity(x_t, timestep, captions):
            pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  device=device, max_sequence_length=pipe.tokenizer_max_length)
            return pipe.transformer(hidden_states=x_t, timestep=timestep, encoder_hidden_states=pe,
                                    pooled_projections=pooled).sample

        return pipe, [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2], velocity
    te = shapes.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                   tokenizer.pad_token_id)
    unet = shapes.build_unet() if vae is None else shapes.build_unet(vae.config.latent_channels,
                                                                     shapes.latent_side(vae))

    def velocity(x_t, timestep, captions):
        ids = tokenizer(captions, padding="max_length", max_length=shapes.MAX_TOKENS, return_tensors="pt").input_ids
        return unet(x_t, timestep, encoder_hidden_states=te(ids).last_hidden_state).sample

    return None, [unet, te], velocity


def save_base(out: Path, pipe, models: list, tokenizer, vae) -> None:
    if pipe is not None:
        pipe.save_pretrained(out)
        return
    models[0].save_pretrained(out / "unet")
    models[1].save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    if vae is not None:
        vae.save_pretrained(out / "vae")


def main(args: Args) -> None:
    if args.vae is not None and args.out == SHAPES_BASE:
        raise SystemExit("--vae: pass --out too (a latent base must not overwrite the shipped pixel base)")
    if args.pool and args.vae is None:
        raise SystemExit("--pool needs --vae: it stores encoded latents (pixels are rendered fresh every step)")
    if args.sd3 and args.vae is None:
        raise SystemExit("--sd3 needs --vae: the SD3 transformer works on a VAE's latents")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device("cpu")
    seed_everything(args.seed)
    tokenizer = shapes.build_tokenizer()
    vae = None if args.vae is None else AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    pipe, models, velocity = build_base(args, tokenizer, vae, device)
    for m in models:
        m.train()
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps))
    emas = [copy.deepcopy(m).eval() for m in models]
    rng = random.Random(args.seed)
    print(f"denoiser {sum(p.numel() for p in models[0].parameters()) / 1e6:.2f}M params, text encoders "
          f"{sum(p.numel() for m in models[1:] for p in m.parameters()) / 1e6:.2f}M")

    t0 = time.time()
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
    minutes = (time.time() - t0) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    for ema_m, m in zip(emas, models):
        m.load_state_dict(ema_m.state_dict())  # the EMA weights are the ones saved
    save_base(args.out, pipe, models, tokenizer, vae)
    policy = load_policy(str(args.out), device)
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
