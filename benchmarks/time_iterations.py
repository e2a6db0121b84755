"""Seconds per training iteration of several scripts, measured side by side in one process.

Each entry is `script.py` followed by its flags (quoted). Every algorithm gets its own policy, optimiser
and state from the same base; iterations run round-robin (A, B, C, A, B, C, ...) so that drift in the
machine's speed hits all of them alike. The first iteration of each is a warm-up and is not counted.

    python benchmarks/time_iterations.py flow_grpo.py mix_grpo.py "mix_grpo.py --flash" \\
        "mix_grpo.py --flash-frozen" --iterations 5 --out benchmarks/results/mix_grpo_speed.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup(entry: str, seed: int):
    """Import the script as a module and build what its loop builds before the first iteration."""
    from common import load_policy, load_prompts, lora_config, lora_targets, pick_device, seed_everything
    from rewards import make_reward

    script, *flags = shlex.split(entry)
    mod = importlib.import_module(Path(script).stem)
    args = tyro.cli(mod.Args, args=flags)
    mod.check_args(args)
    seed_everything(seed)
    device = pick_device(args.device)
    policy = load_policy(args.model, device, args.mixed_precision, args.resolution, args.gradient_checkpointing)
    if args.shift is None:
        args.shift = policy.default_shift
    args.lora_rank, args.lora_alpha = lora_config(policy, args.lora_rank, args.lora_alpha)
    policy.add_lora(args.lora_rank, args.lora_alpha, lora_targets(policy))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return {"name": entry, "mod": mod, "args": args, "policy": policy, "opt": opt, "state": mod.init_state(policy, args),
            "reward": make_reward(args.reward), "prompts": load_prompts(args.prompts, "train"),
            "gen": torch.Generator(device=device).manual_seed(seed), "cpu_gen": torch.Generator().manual_seed(seed),
            "rng": random.Random(seed), "times": []}


def iteration(r: dict) -> dict:
    """One sample / score / update, timed like the scripts' loop."""
    mod, args, policy = r["mod"], r["args"], r["policy"]
    policy.clock.update(forward=0.0, backward=0.0)
    t0 = time.time()
    batch = mod.sample_batch(policy, r["rng"].sample(r["prompts"], k=args.prompts_per_step), r["state"], args, r["gen"],
                             r["cpu_gen"])
    t1 = time.time()
    rewards, info = r["reward"](batch["images"], batch["prompts"])
    adv = mod.compute_advantages(batch, rewards, info, args)
    t2 = time.time()
    mod.train_on_batch(policy, r["opt"], batch, adv, r["state"], args, r["cpu_gen"])
    t3 = time.time()
    return {"sample": t1 - t0, "reward": t2 - t1, "train": t3 - t2, "total": t3 - t0,
            "model": policy.clock["forward"] + policy.clock["backward"], "images": len(rewards)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help="'script.py [flags]', one per algorithm")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations per entry (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the medians as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    runs = [setup(e, a.seed) for e in a.entries]
    for i in range(a.iterations + 1):
        for r in runs:
            t = iteration(r)
            if i > 0:
                r["times"].append(t)
            print(f"{r['name']:<40} iteration {i}: {t['total']:.2f} s", flush=True)
    base = statistics.median(t["total"] for t in runs[0]["times"])
    result = {}
    print(f"\n{'entry':<40} {'s/it':>6} {'sample':>7} {'reward':>7} {'train':>6} {'model%':>7} {'images':>6} {'vs first':>8}")
    for r in runs:
        med = {k: statistics.median(t[k] for t in r["times"]) for k in r["times"][0]}
        result[r["name"]] = {**med, "ratio": med["total"] / base}
        print(f"{r['name']:<40} {med['total']:6.2f} {med['sample']:7.2f} {med['reward']:7.2f} {med['train']:6.2f} "
              f"{100 * med['model'] / med['total']:6.0f}% {med['images']:6.0f} {med['total'] / base:8.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"threads": a.threads, "iterations": a.iterations, "results": result}, indent=1))


if __name__ == "__main__":
    main()
