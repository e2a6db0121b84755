"""Reward functions: a registry `name -> fn(images, prompts) -> (scores, info)`.

images: (B, 3, H, W) float in [0, 1]; prompts: B strings; scores: (B,) float tensor; info: a dict of
(B,) tensors, NaN where a value does not apply (e.g. the strict accuracy of another category).
`make_reward("shapes:1.0,jpeg_compressibility:0.1")` builds the weighted sum of several.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn

    return deco


@register("shapes")
def shapes_reward(images, prompts):
    """GenEval analogue on the shapes world: fraction of the prompt's clauses met (partial credit).
    info: strict accuracy (all clauses met), overall and per category."""
    from shapes import CATEGORIES, score

    partial, strict, cats = score(images, prompts)
    info = {"strict": strict}
    for c in CATEGORIES:
        mask = torch.tensor([x == c for x in cats])
        info[f"strict/{c}"] = torch.where(mask, strict, torch.full_like(strict, float("nan")))
    return partial, info


def _jpeg_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


@register("jpeg_compressibility")
def jpeg_compressibility(images, prompts):
    """DDPO's classic: minus the JPEG (quality 95) file size in kB; smaller files score higher."""
    return -_jpeg_kb(images), {}


@register("jpeg_incompressibility")
def jpeg_incompressibility(images, prompts):
    """DDPO's classic: the JPEG (quality 95) file size in kB; busier images score higher."""
    return _jpeg_kb(images), {}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'shapes' or 'shapes:1.0,jpeg_compressibility:0.1' -> [(name, weight), ...]."""
    out = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight {weight!r} for {name!r} is not a number (write e.g. {name}:0.5)") from None
        out.append((name, w))
    return out


def make_reward(spec: str) -> RewardFn:
    """The weighted sum of the rewards named in `spec`; info keeps each reward's raw score and info."""
    parts = parse_reward_spec(spec)

    def reward(images, prompts):
        total = torch.zeros(len(images))
        info: dict[str, torch.Tensor] = {}
        for name, w in parts:
            s, inf = REWARDS[name](images, prompts)
            s = s.float().cpu()
            if not torch.isfinite(s).all():
                raise FloatingPointError(f"reward {name!r} returned non-finite scores")
            total += w * s
            if len(parts) > 1:
                info[name] = s
            info.update(inf)
        return total, info

    return reward
