"""Plot eval score (and training reward) against wall-clock minutes for one or more run folders.

    python benchmarks/plot.py runs/flow_grpo-A runs/flow_grpo-B --labels A B --out curve.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    runs: list[Path]
    """run folders holding metrics.jsonl"""
    out: Path = Path("curve.png")
    """where the PNG goes"""
    labels: list[str] = field(default_factory=list)
    """one label per run (default: the folder names)"""
    title: str = ""
    """figure title"""


def load(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(args: Args) -> None:
    labels = args.labels or [r.name for r in args.runs]
    fig, (ax_eval, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(args.runs, labels):
        recs = load(run)
        ev = [r for r in recs if "eval/score" in r]
        tr = [r for r in recs if "reward/mean" in r]
        line = ax_eval.plot([r["wall_time"] / 60 for r in ev], [r["eval/score"] for r in ev], "o-", label=label)[0]
        ax_eval.plot([r["wall_time"] / 60 for r in ev], [r["eval/strict"] for r in ev], "s--", color=line.get_color(),
                     alpha=0.6, label=f"{label} (strict)")
        ax_rew.plot([r["wall_time"] / 60 for r in tr], [r["reward/mean"] for r in tr], color=line.get_color(),
                    alpha=0.8, label=label)
    ax_eval.set(xlabel="wall-clock minutes", ylabel="eval score (held-out prompts, ODE)", title="evaluation")
    ax_rew.set(xlabel="wall-clock minutes", ylabel="training reward (SDE samples)", title="training reward")
    for ax in (ax_eval, ax_rew):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
