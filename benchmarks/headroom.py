"""How much reward is within the base's reach? Mean against best-of-G per prompt and category.

Draws G images per prompt from the shipped base (the 20-step ODE of the evaluation, and the 10-step SDE
of the training rollouts at noise level a) and prints, per split and category, the mean partial-credit
score, the mean over prompts of the best of the G, and the fraction of groups whose G rewards are all
equal (zero advantage for every image: GRPO learns nothing from them).

    python benchmarks/headroom.py
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapes  # noqa: E402
from common import load_policy, load_prompts, pick_device, sample_and_score  # noqa: E402
from rewards import make_reward  # noqa: E402


@dataclass
class Args:
    group_size: int = 8
    """images per prompt (G)"""
    noise_level: float = 0.7
    """a of the training rollouts' SDE"""
    splits: tuple[str, ...] = ("eval", "train")
    """prompt splits to measure"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    seed: int = 123
    """seed of the noise"""
    model: str | None = None
    """a shapes base pipeline (pretrain.py's --out); default: the shipped one"""


def group_scores(policy, prompts: list[str], g: int, num_steps: int, noise_level: float, seed: int) -> torch.Tensor:
    """(len(prompts), g) partial-credit scores of g samples per prompt (no CFG, shift 3, as the RL scripts sample)."""
    scores, _, _ = sample_and_score(policy, prompts, make_reward("shapes"), g, num_steps, 3.0, 1.0, seed, noise_level)
    return scores.view(len(prompts), g)


def summary(label: str, s: torch.Tensor) -> str:
    return (f"{label:26s} {len(s):3d} prompts  mean {s.mean():.3f}  best-of-{s.shape[1]} {s.max(1).values.mean():.3f}"
            f"  all-equal groups {(s.std(1) == 0).float().mean():.2f}")


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.model, pick_device("cpu"))
    results = {}
    for split in args.splits:
        prompts = load_prompts(None, split)
        for mode, steps, a in (("ODE, 20 steps", 20, 0.0), (f"SDE a={args.noise_level}, 10 steps", 10, args.noise_level)):
            s = group_scores(policy, prompts, args.group_size, steps, a, args.seed)
            results[(split, mode)] = s
            print(summary(f"{split}, {mode}", s))
            by_category = collections.defaultdict(list)
            for p, row in zip(prompts, s):
                by_category[shapes.parse(p).category].append(row)
            for category, rows in by_category.items():
                print("  " + summary(category, torch.stack(rows)))
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
