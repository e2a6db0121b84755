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
    runs: tyro.conf.Positional[list[Path]]
    """run folders holding metrics.jsonl, or metrics .jsonl files"""
    out: Path = Path("curve.png")
    """where the PNG goes"""
    labels: list[str] = field(default_factory=list)
    """one label per run (default: the folder names)"""
    title: str = ""
    """figure title"""
    smooth: int = 10
    """moving-average window (iterations) of the training reward"""


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(args: Args) -> None:
    labels = args.labels or [r.stem for r in args.runs]
    fig, (ax_eval, ax_samples, ax_rew) = plt.subplots(1, 3, figsize=(16, 4))
    for run, label in zip(args.runs, labels):
        recs = load(run)
        ev = [r for r in recs if "eval/score" in r]
        tr = [r for r in recs if "reward/mean" in r]
        samples = {0: 0, **{r["step"]: r["samples"] for r in tr}}
        line = ax_eval.plot([r["wall_time"] / 60 for r in ev], [r["eval/score"] for r in ev], "o-", label=label)[0]
        ax_eval.plot([r["wall_time"] / 60 for r in ev], [r["eval/strict"] for r in ev], "s--", color=line.get_color(),
                     alpha=0.6, label=f"{label} (strict)")
        ax_samples.plot([samples[r["step"]] for r in ev], [r["eval/score"] for r in ev], "o-", color=line.get_color(),
                        label=label)
        rew = [r["reward/mean"] for r in tr]
        smooth = [sum(rew[max(0, i - args.smooth + 1):i + 1]) / len(rew[max(0, i - args.smooth + 1):i + 1])
                  for i in range(len(rew))]
        ax_rew.plot([r["wall_time"] / 60 for r in tr], smooth, color=line.get_color(), alpha=0.8, label=label)
    ax_eval.set(xlabel="wall-clock minutes", ylabel="eval score (held-out prompts, ODE)", title="evaluation")
    ax_samples.set(xlabel="generated training images", ylabel="eval score", title="evaluation against samples")
    ax_rew.set(xlabel="wall-clock minutes", ylabel="training reward (rollout samples)",
               title=f"training reward, mean of the last {args.smooth} iterations")
    for ax in (ax_eval, ax_samples, ax_rew):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
