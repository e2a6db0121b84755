"""A Markdown table of runs: eval score (first, at a common iteration, final, best), strict accuracy per
category, median seconds per iteration split into sampling / reward / training, and the time each run
takes to reach a target score. The first run is the baseline of the ratio columns.

    python benchmarks/summarize.py runs/flow_grpo runs/mix_grpo --labels Flow-GRPO MixGRPO --target 0.65
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import tyro

CATEGORIES = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


@dataclass
class Args:
    runs: tyro.conf.Positional[list[Path]]
    """run folders holding metrics.jsonl, or metrics .jsonl files"""
    labels: list[str] = field(default_factory=list)
    """one label per run (default: the folder names)"""
    target: float | None = None
    """report the wall-clock minutes to the first evaluation at or above this score"""
    at: int | None = None
    """also report the eval score at this iteration (default: the last iteration all runs reached)"""


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(records: list[dict], at: int, target: float | None) -> dict:
    train = [r for r in records if "time/train" in r]
    evals = [r for r in records if "eval/score" in r]
    at_eval = max((r for r in evals if r["step"] <= at), key=lambda r: r["step"])
    reached = next((r for r in evals if target is not None and r["eval/score"] >= target), None)
    med = {k: statistics.median(r[f"time/{k}"] for r in train) for k in ("sample", "reward", "train")}
    return {"iterations": train[-1]["step"], "minutes": evals[-1]["wall_time"] / 60, "first": evals[0]["eval/score"],
            "at": at_eval["eval/score"], "final": evals[-1]["eval/score"], "best": max(r["eval/score"] for r in evals),
            "strict": (evals[0]["eval/strict"], evals[-1]["eval/strict"]),
            "cats": {c: evals[-1].get(f"eval/strict/{c}", float("nan")) for c in CATEGORIES},
            "sec": med, "s_it": sum(med.values()), "images": train[-1]["samples"] / train[-1]["step"],
            "reach": reached["wall_time"] / 60 if reached else None}


def main(args: Args) -> None:
    labels = args.labels or [r.stem if r.is_file() else r.name for r in args.runs]
    records = [load(r) for r in args.runs]
    at = args.at or min(max(r["step"] for r in rec if "eval/score" in r) for rec in records)
    rows = [summary(rec, at, args.target) for rec in records]
    base = rows[0]["s_it"]
    reach = f" | minutes to {args.target}" if args.target is not None else ""
    print(f"| run | iterations / minutes | eval: base → it. {at} → final (best) | strict: base → final | "
          f"s/it (sample / reward / train) | vs first | images / it.{reach} |")
    print("| --- " * (7 + bool(reach)) + "|")
    for label, s in zip(labels, rows):
        sec = s["sec"]
        cell = (f" | {s['reach']:.1f}" if s["reach"] is not None else " | not reached") if reach else ""
        print(f"| {label} | {s['iterations']} / {s['minutes']:.1f} | {s['first']:.3f} → {s['at']:.3f} → "
              f"{s['final']:.3f} ({s['best']:.3f}) | {s['strict'][0]:.3f} → {s['strict'][1]:.3f} | {s['s_it']:.2f} "
              f"({sec['sample']:.2f} / {sec['reward']:.2f} / {sec['train']:.2f}) | {s['s_it'] / base:.2f} | "
              f"{s['images']:.0f}{cell} |")
    print("\nFinal strict accuracy per category:\n")
    print("| run | " + " | ".join(CATEGORIES) + " |")
    print("| --- " * (len(CATEGORIES) + 1) + "|")
    for label, s in zip(labels, rows):
        print(f"| {label} | " + " | ".join(f"{s['cats'][c]:.2f}" for c in CATEGORIES) + " |")


if __name__ == "__main__":
    main(tyro.cli(Args))
