"""How far can 15 CPU minutes move the shapes base at all? Supervised fine-tuning on the ground truth.

Continues pre-training the shipped base (the transformer only; the text encoders stay frozen, as in the RL
scripts) with pretrain.py's rectified-flow loss on rendered ground-truth images of the *training*
prompts, the prompts the RL scripts sample from. A dense, exact target for every image, where RL gets one
scalar reward: not a bound on RL, but a yardstick of how fast the base moves in a given time.
The held-out evaluation is the one of flow_grpo.py (every held-out prompt x 8, 20-step ODE, no CFG,
the same fixed noise), so the two read on one scale.

    python benchmarks/supervised_ceiling.py --lr 1e-4 --minutes 15 --out ceiling.jsonl
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import EMA, evaluate, load_policy, load_prompts, pick_device  # noqa: E402
from pretrain import ground_truth, rectified_flow_loss, to_latents  # noqa: E402
from rewards import make_reward  # noqa: E402


@dataclass
class Args:
    lr: float = 1e-4
    """AdamW learning rate, constant"""
    minutes: float = 15.0
    """training minutes (rendering, forward, backward, step; evaluations excluded)"""
    ema: float = 0.0
    """evaluate an EMA of the weights with this decay per step (0: the live weights)"""
    batch_size: int = 64
    """ground-truth images per step"""
    eval_per_prompt: int = 8
    """evaluation images per held-out prompt (flow_grpo.py's default: 8)"""
    eval_every: float = 2.5
    """evaluate every this many training minutes (and at the start and the end)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    seed: int = 0
    """seed of the prompts, renders and noise"""
    out: Path = Path("supervised_ceiling.jsonl")
    """one JSON line per evaluation: step, train_min, eval/score, eval/strict"""


def ground_truth_loss(policy, captions: list[str], rng: random.Random) -> torch.Tensor:
    """pretrain.py's rectified-flow loss of the policy's denoiser on the VAE's latents of one rendered ground-truth
    image per caption."""
    x0 = to_latents(policy.components["vae"], ground_truth(captions, rng))
    cond = policy.encode(captions)
    return rectified_flow_loss(lambda x_t, timestep: policy.velocity(x_t, timestep / 1000, cond, 1.0), x0)


def main(args: Args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policy = load_policy(None, pick_device("cpu"))  # pick_device sets flush-denormal on the CPU
    denoiser = policy.denoiser.requires_grad_(True)
    train, held_out = load_prompts(None, "train"), load_prompts(None, "eval")
    reward = make_reward("shapes")
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(list(denoiser.parameters()), args.ema)
    rng = random.Random(args.seed)
    records: list[dict] = []

    def log_eval(step: int, seconds: float) -> None:
        with ema.swapped_in():  # flow_grpo's evaluation; decay 0: the shadow is the live weights
            metrics, _ = evaluate(policy, held_out, reward, args.eval_per_prompt, 20, 3.0, 1.0, seed=10_000)
        records.append({"step": step, "train_min": seconds / 60,
                        "eval/score": metrics["eval/score"], "eval/strict": metrics["eval/strict"]})
        print(json.dumps(records[-1]), flush=True)

    seconds, step, next_eval = 0.0, 0, 0.0
    while True:
        if seconds >= next_eval * 60 or seconds > args.minutes * 60:
            log_eval(step, seconds)
            next_eval += args.eval_every
        if seconds > args.minutes * 60:
            break
        t0 = time.time()
        loss = ground_truth_loss(policy, [rng.choice(train) for _ in range(args.batch_size)], rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        ema.update()
        step += 1
        seconds += time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


if __name__ == "__main__":
    main(tyro.cli(Args))
