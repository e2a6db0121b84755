"""How much of one batch's gradient points where the objective wants? Flow-GRPO against supervised training.

At the shipped base, draw K independent batches, take each method's gradient over every denoiser weight, and
report the mean cosine similarity between the gradients of different batches, raw and with each weight's
gradient divided by its RMS over the batches (closer to the step Adam takes). Two noisy estimates
g_k = mu + noise_k of one expected gradient mu agree, in expectation, by about |mu|^2 / (|mu|^2 + tr(Sigma) / n):
near 0 when the batch's noise swamps the direction, near 1 when every batch points the same way. Adam moves every
weight by about lr per step whatever the gradient's scale, so this agreement, not the gradient's size, says how
much of a step goes where the objective leads.

  - Flow-GRPO: flow_grpo.py's own update, run with one minibatch and an optimiser that keeps the gradient instead
    of applying it, over one default iteration's batch (8 prompts x 8 SDE rollouts, every trained step). The
    ratio is 1 at the sampling weights and the KL's gradient is 0 at the reference, so this is the policy gradient.
  - supervised: benchmarks/supervised_ceiling.py's loss (pretrain.py's rectified flow on rendered ground truth)
    over as many training prompts.

    python benchmarks/gradient_agreement.py --threads 2
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_grpo  # noqa: E402
from common import load_policy, load_prompts, pick_device  # noqa: E402
from rewards import make_reward  # noqa: E402
from supervised_ceiling import ground_truth_loss  # noqa: E402


@dataclass
class Args:
    batches: int = 12
    """independent batches per method (K); the agreement is the mean over the K (K - 1) / 2 pairs"""
    prompts_per_step: int = 8
    """Flow-GRPO: prompts per batch (flow_grpo.py's default); supervised batches hold prompts x group images"""
    group_size: int = 8
    """Flow-GRPO: images per prompt (flow_grpo.py's default)"""
    reward: str = "shapes"
    """Flow-GRPO's reward (a dense one such as jpeg_compressibility is the control: its gradient should agree)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    seed: int = 0
    """seed of prompts, noise and renders"""
    out: Path | None = None
    """also write the results here as JSON"""
    model: str | None = None
    """a shapes base pipeline (pretrain.py's --out); default: the shipped one"""


class GradientKeeper:
    """Stands in for the optimiser: step() keeps the flattened gradient instead of applying it."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params, self.grads = params, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                                     for p in self.params]))


def pairwise_cosines(grads: list[torch.Tensor]) -> list[float]:
    """cos(g_k, g_l) for every pair k < l."""
    return [torch.dot(a, b).item() / (a.norm() * b.norm()).item() for a, b in itertools.combinations(grads, 2)]


def jackknife_se(grads: list[torch.Tensor], cosines: list[float]) -> float:
    """Standard error of the mean pairwise cosine, leaving one batch out at a time (the pairs share batches)."""
    k, pairs = len(grads), list(itertools.combinations(range(len(grads)), 2))
    if k < 3:
        return float("nan")
    means = [statistics.mean(c for (a, b), c in zip(pairs, cosines) if i not in (a, b)) for i in range(k)]
    return ((k - 1) / k * sum((m - statistics.mean(means)) ** 2 for m in means)) ** 0.5


def per_weight_scaled(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each weight's gradient divided by its RMS over the batches: the scale Adam's second moment removes, so
    that a few weights with large gradients do not decide the cosine alone."""
    rms = torch.stack(grads).pow(2).mean(0).sqrt()
    return [torch.where(rms > 0, g / rms, torch.zeros_like(g)) for g in grads]


def flow_grpo_gradients(policy, args: Args) -> list[torch.Tensor]:
    fg = flow_grpo.Args(prompts_per_step=args.prompts_per_step, group_size=args.group_size, minibatches=1,
                        beta=0.0, shift=policy.default_shift)  # beta 0: at the reference the KL's gradient is 0 anyway
    keeper, reward = GradientKeeper(policy.trainable_parameters()), make_reward(args.reward)
    gen, cpu_gen, rng = (torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed),
                         random.Random(args.seed))
    train = load_prompts(None, "train")
    while len(keeper.grads) < args.batches:
        batch = flow_grpo.sample_batch(policy, rng.choices(train, k=fg.prompts_per_step), {}, fg, gen, cpu_gen)
        rewards, info = reward(batch["images"], batch["prompts"])
        adv = flow_grpo.compute_advantages(batch, rewards, info, fg)
        if adv.abs().sum() == 0:  # every group's rewards equal: no gradient, draw again
            continue
        flow_grpo.train_on_batch(policy, keeper, batch, adv, {}, fg, cpu_gen)
    return keeper.grads


def supervised_gradients(policy, args: Args) -> list[torch.Tensor]:
    keeper, rng = GradientKeeper(policy.trainable_parameters()), random.Random(args.seed)
    train, n = load_prompts(None, "train"), args.prompts_per_step * args.group_size
    torch.manual_seed(args.seed)
    for _ in range(args.batches):
        keeper.zero_grad()
        ground_truth_loss(policy, [rng.choice(train) for _ in range(n)], rng).backward()
        keeper.step()
    return keeper.grads


def main(args: Args) -> dict:
    if args.batches < 2:
        raise SystemExit(f"--batches {args.batches}: an agreement needs at least 2 batches")
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.model, pick_device("cpu"))
    policy.add_lora(0, 0.0, [])  # every denoiser weight trainable, as flow_grpo.py's default on shapes
    results = {}
    for name, fn in (("Flow-GRPO", flow_grpo_gradients), ("supervised", supervised_gradients)):
        grads = fn(policy, args)
        results[name] = {"images_per_batch": args.prompts_per_step * args.group_size, "batches": args.batches}
        for view, g in (("raw", grads), ("per_weight", per_weight_scaled(grads))):
            cos = pairwise_cosines(g)
            r = results[name][view] = {"mean": statistics.mean(cos), "se": jackknife_se(g, cos),
                                       "min": min(cos), "max": max(cos)}
            print(f"{name:10s} {r['mean']:+.4f} ± {r['se']:.4f} {view:10s} cosine between the gradients of "
                  f"{args.batches} batches of {args.prompts_per_step * args.group_size} images "
                  f"(pairs: min {r['min']:+.4f}, max {r['max']:+.4f})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
