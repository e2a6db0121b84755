"""The shapes world in a latent space: a tiny AutoencoderKL on rendered shapes (32x32x3 <-> 16x16x4), trained here
and scored on its decoded ground truth, the first gate of a latent shapes world (the base then pre-trains on its
latents with `pretrain.py --vae`).

    python benchmarks/latent_shapes.py --out runs/latent_shapes/vae            # train, then score 1,000 decodes
    python benchmarks/latent_shapes.py --out runs/latent_shapes/vae --steps 0  # only score a trained VAE

The bar: decoded renders must read as their prompt to the shapes scorer (strict >= 0.97), or RL could score by
exploiting the decoder's artefacts and the world's ceiling would be the decoder's. The scorer labels each pixel
with its nearest palette colour (within a squared distance of 0.12) and names a shape from its bounding box's
corner pixels, so a soft corner or a blended edge can flip a square into a circle. The loss is therefore
L1 + L2 on pixels plus a cross-entropy of the palette label of every pixel (logits -||x_hat - colour_k||^2 / tau),
which penalises exactly the blends the scorer misreads, plus a small KL to N(0, I). Latents are the posterior
mean; their mean and std over the training renders are stored as the VAE's shift_factor and 1 / scaling_factor,
so decoding is SD3's z / scaling_factor + shift_factor.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapes  # noqa: E402
from pretrain import lr_at  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    out: Path = ROOT / "runs" / "latent_shapes" / "vae"
    """the VAE folder (read with --steps 0, written otherwise) and its report vae_eval.json"""
    steps: int = 3000
    """optimiser steps (0: score the VAE at --out)"""
    batch_size: int = 64
    """renders per step"""
    lr: float = 1e-3
    """Adam learning rate (linear warm-up over 100 steps, then cosine decay to 10%, as pretrain.py)"""
    palette_weight: float = 0.1
    """weight of the per-pixel palette cross-entropy"""
    tau: float = 0.02
    """temperature of the palette logits (squared RGB distances; the closest two colours are 0.42 apart)"""
    kl_weight: float = 1e-6
    """weight of the KL of the posterior to N(0, I)"""
    eval_images: int = 1000
    """fresh renders scored after decoding (categories drawn uniformly)"""
    factor: int = 2
    """spatial downsampling: 2 (16x16x4 latents) or 4 (8x8x4)"""
    seed: int = 0
    """seed of the renders, the initial weights and the posterior samples"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


def renders(n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """n ground-truth renders in [-1, 1] of prompts drawn over the six categories, and the prompts."""
    prompts = [shapes.random_caption(rng) for _ in range(n)]
    return torch.stack([shapes.render_prompt(p, rng) for p in prompts]) * 2 - 1, prompts


def vae_loss(vae, x: torch.Tensor, args: Args) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample
    labels = shapes.palette_labels((x + 1) / 2)
    logits = -shapes.palette_distances((y + 1) / 2) / args.tau  # B K H W
    ce = F.cross_entropy(logits, labels)
    rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
    kl = post.kl().mean()
    return rec + args.palette_weight * ce + args.kl_weight * kl, {"rec": rec.item(), "ce": ce.item()}


@torch.no_grad()
def latent_stats(vae, rng: random.Random, n: int = 2048) -> tuple[float, float]:
    z = torch.cat([vae.encode(x).latent_dist.mode() for x in renders(n, rng)[0].split(256)])
    return z.mean().item(), z.std().item()


@torch.no_grad()
def decoded_scores(vae, n: int, seed: int) -> dict:
    """The shapes scorer on decoded renders (posterior mean) of n fresh prompts: score, strict, per category,
    and how the misread ones fail (shape, colour, count) against the raw renders' detections."""
    x, prompts = renders(n, random.Random(seed))
    y = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(250)])
    partial, strict, cats = shapes.score((y + 1) / 2, prompts)
    raw_partial, raw_strict, _ = shapes.score((x + 1) / 2, prompts)
    out = {"images": n, "score": partial.mean().item(), "strict": strict.mean().item(),
           "raw_strict": raw_strict.mean().item(), "mse01": (((y - x) / 2) ** 2).mean().item()}
    for c in shapes.CATEGORIES:
        m = torch.tensor([k == c for k in cats])
        out[f"strict/{c}"] = strict[m].mean().item()
    why = {"wrong shape": 0, "wrong colour": 0, "wrong count": 0}
    for a, b in zip(shapes.detect((x + 1) / 2), shapes.detect((y + 1) / 2)):
        if len(a) != len(b):
            why["wrong count"] += 1
        elif sorted(d.shape for d in a) != sorted(d.shape for d in b):
            why["wrong shape"] += 1
        elif sorted(d.color for d in a) != sorted(d.color for d in b):
            why["wrong colour"] += 1
    out["misread"] = why
    return out


def train(args: Args):
    vae = shapes.build_vae(args.factor).train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps))
    rng = random.Random(args.seed)
    print(f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params")
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="vae")
    for _ in bar:
        loss, parts = vae_loss(vae, renders(args.batch_size, rng)[0], args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{parts['rec']:.4f}", ce=f"{parts['ce']:.4f}")
    vae.eval()
    mean, std = latent_stats(vae, rng)
    vae.register_to_config(shift_factor=mean, scaling_factor=1 / std)
    vae.save_pretrained(args.out)
    return vae, (time.time() - t0) / 60


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.steps:
        vae, minutes = train(args)
    else:
        from diffusers import AutoencoderKL

        vae, minutes = AutoencoderKL.from_pretrained(args.out).eval(), None
    report = {"train_minutes": minutes, "steps": args.steps, **decoded_scores(vae, args.eval_images, args.seed + 1)}
    (args.out / "vae_eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
