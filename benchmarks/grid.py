"""Run every algorithm and its named variants on the shapes world, from the same base, over several seeds,
then write one CSV of every evaluation, plots of eval score against training minutes (evaluations excluded)
and against generated samples (mean and min-max over seeds), and a Markdown table with the ratios to Flow-GRPO.

    python benchmarks/grid.py --seeds 0 1 2 --minutes 4 --workers 2     # the README's benchmark
    python benchmarks/grid.py --variants flow_grpo awm --iterations 30    # a smaller one
    python benchmarks/grid.py --report-only --target 0.75                # redo CSV / plots / table

Each run is a plain `python <script>.py ... --seed S --out <runs-dir>/<variant>-s<S>`. Run the same command
again to resume an interrupted grid: finished runs are skipped, a run with a checkpoint continues from it
(`--resume`), a run without one starts over.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize import CATEGORIES  # noqa: E402

# name -> (label, command); Flow-GRPO first: it is the baseline of every ratio
VARIANTS = {
    "flow_grpo": ("Flow-GRPO", "flow_grpo.py"),
    "awm": ("AWM", "awm.py"),
    "awm_mse": ("AWM, MSE weighting", "awm.py --weighting mse"),
    "mix_grpo": ("MixGRPO", "mix_grpo.py"),
    "mix_flash": ("MixGRPO-Flash", "mix_grpo.py --flash"),
    "mix_flash_frozen": ("MixGRPO-Flash*", "mix_grpo.py --flash-frozen"),
    "tempflow": ("TempFlow-GRPO", "tempflow_grpo.py"),
    "tempflow_noweight": ("TempFlow, no noise weighting", "tempflow_grpo.py --no-noise-weighting"),
    "g2rpo": ("G²RPO", "g2rpo.py"),
    "g2rpo_single": ("G²RPO, Λ = {1} (no multi-granularity)", "g2rpo.py --granularities 1"),
    "dance_grpo": ("DanceGRPO", "dance_grpo.py"),
    "diffusion_nft": ("DiffusionNFT", "diffusion_nft.py"),
}


@dataclass
class Args:
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """any of flow_grpo, awm, awm_mse, mix_grpo, mix_flash, mix_flash_frozen, tempflow, tempflow_noweight, g2rpo,
    g2rpo_single"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """one run per variant and seed"""
    minutes: float = 0.0
    """budget of each run in training minutes (sampling, reward, update; evaluations excluded); 0: run --iterations"""
    iterations: int = 100
    """iterations of each run (with --minutes: an upper bound)"""
    workers: int = 1
    """runs at the same time"""
    threads: int = 0
    """torch threads of each run (0: the machine's cores divided by --workers)"""
    flags: str = ""
    """extra flags for every run, e.g. '--eval-every 5'"""
    target: float = 0.70
    """the table's 'minutes to reach' score (the shapes base evaluates at 0.645, seed mean)"""
    runs_dir: Path = ROOT / "runs" / "grid"
    """run folders (checkpoints, images, logs)"""
    out: Path = ROOT / "benchmarks" / "results" / "grid"
    """results: evals.csv, curves.png, table.md, metrics/*.jsonl"""
    report_only: bool = False
    """skip the runs; rebuild the results from the run folders"""

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        if not self.seeds or self.workers < 1 or self.iterations < 1 or self.minutes < 0:
            raise SystemExit("--seeds needs at least one seed; --workers >= 1, --iterations >= 1, --minutes >= 0")


# ------------------------------------------------------------------------------------------------
# running the grid
# ------------------------------------------------------------------------------------------------
def command(variant: str, seed: int, args: Args) -> list[str]:
    script, *flags = shlex.split(VARIANTS[variant][1])
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    return [sys.executable, str(ROOT / script), *flags, "--steps", str(args.iterations), "--max-minutes",
            str(args.minutes), "--seed", str(seed), "--threads", str(threads), *shlex.split(args.flags)]


def check_config(args: Args) -> None:
    """A grid folder belongs to one configuration: resuming with other flags would mix two benchmarks."""
    config = {"minutes": args.minutes, "iterations": args.iterations, "flags": args.flags, "threads": args.threads,
              "workers": args.workers}
    path = args.runs_dir / "grid.json"
    if path.is_file() and json.loads(path.read_text()) != config:
        raise SystemExit(f"{args.runs_dir} holds a grid run with {path.read_text().strip()}; use the same flags to "
                         f"resume it, or another --runs-dir")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))


def progress(run_dir: Path, args: Args) -> float:
    """Fraction of a run done, read from the last training record of its metrics.jsonl."""
    if (run_dir / "DONE").is_file():
        return 1.0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = next(json.loads(line) for line in reversed(lines) if '"train_time"' in line)
    except (OSError, StopIteration, ValueError):
        return 0.0
    frac = last["step"] / args.iterations
    if args.minutes:
        frac = max(frac, last.get("train_time", 0.0) / (60 * args.minutes))
    return min(frac, 0.99)


def start(variant: str, seed: int, args: Args) -> subprocess.Popen:
    run_dir = args.runs_dir / f"{variant}-s{seed}"
    cmd = command(variant, seed, args)
    if (run_dir / "checkpoint.pt").is_file():
        cmd += ["--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # started but never saved: nothing to keep
        cmd += ["--out", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(args.runs_dir / f"{variant}-s{seed}.log", "a")
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_grid(args: Args) -> None:
    check_config(args)
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    todo = [(v, s) for v, s in jobs if not (args.runs_dir / f"{v}-s{s}" / "DONE").is_file()]
    print(f"{len(jobs)} runs ({len(args.variants)} variants x {len(args.seeds)} seeds), {len(jobs) - len(todo)} "
          f"already finished; {args.workers} at a time; logs in {args.runs_dir}")
    running: dict[tuple[str, int], subprocess.Popen] = {}
    failed = []
    bar = tqdm(total=len(jobs), desc="grid",
               bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}]{postfix}")
    while todo or running:
        while todo and len(running) < args.workers:
            job = todo.pop(0)
            running[job] = start(*job, args)
        time.sleep(2)
        for job, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[job]
            if proc.returncode == 0:
                (args.runs_dir / f"{job[0]}-s{job[1]}" / "DONE").touch()
            else:
                failed.append(job)
                tqdm.write(f"{job[0]} seed {job[1]} failed (exit {proc.returncode}); see "
                           f"{args.runs_dir / f'{job[0]}-s{job[1]}.log'}")
        bar.n = sum(progress(args.runs_dir / f"{v}-s{s}", args) for v, s in jobs)
        bar.set_postfix_str(", ".join(f"{v}-s{s}" for v, s in running), refresh=False)
        bar.refresh()
    bar.close()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}; fix the cause and run the same command to resume")


# ------------------------------------------------------------------------------------------------
# results: CSV, plots, table
# ------------------------------------------------------------------------------------------------
def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(evaluations, training iterations) of one run; after a resume the last record of each step wins."""
    evals, train = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (evals if "eval/score" in rec else train)[rec["step"]] = rec
    at = {0: {"samples": 0, "train_time": 0.0}, **train}  # an evaluation at step s follows iteration s
    ev = [{**r, "samples": at[s]["samples"], "train_time": at[s]["train_time"]} for s, r in sorted(evals.items())]
    return ev, [r for _, r in sorted(train.items())]


def write_csv(runs: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "step", "train_minutes", "wall_minutes", "samples", "eval_score", "eval_strict",
                    *[f"strict_{c}" for c in CATEGORIES]])
        for (variant, seed), (evals, _) in runs.items():
            for r in evals:
                w.writerow([variant, seed, r["step"], f"{r['train_time'] / 60:.3f}", f"{r['wall_time'] / 60:.3f}",
                            r["samples"],
                            f"{r['eval/score']:.4f}", f"{r['eval/strict']:.4f}",
                            *[f"{r.get(f'eval/strict/{c}', float('nan')):.4f}" for c in CATEGORIES]])


def mean_curve(curves: list[list[tuple[float, float]]], n: int = 60):
    """Mean, min and max over seeds of piecewise-linear curves, on a grid up to the shortest curve's end."""
    import numpy as np

    end = min(c[-1][0] for c in curves)
    xs = np.linspace(0, end, n)
    ys = np.stack([np.interp(xs, [p[0] for p in c], [p[1] for p in c]) for c in curves])
    return xs, ys.mean(0), ys.min(0), ys.max(0)


def plot(runs: dict, variants: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap("tab10")
    for i, v in enumerate(variants):
        seeds = [evals for (var, _), (evals, _) in runs.items() if var == v]
        style = "-" if VARIANTS[v][1].count("--") == 0 else "--"
        for ax, key, scale in ((axes[0], "train_time", 1 / 60), (axes[1], "samples", 1.0)):
            xs, mean, lo, hi = mean_curve([[(r[key] * scale, r["eval/score"]) for r in ev] for ev in seeds])
            ax.plot(xs, mean, style, color=colors(i), label=f"{VARIANTS[v][0]} ({len(seeds)} seeds)")
            ax.fill_between(xs, lo, hi, color=colors(i), alpha=0.12)
    axes[0].set(xlabel="training minutes (sampling, reward, update; evaluations excluded)",
                ylabel="eval score (held-out prompts, ODE)")
    axes[1].set(xlabel="generated training images", ylabel="eval score")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title + "  (line: mean over seeds; band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def minutes_to(evals: list[dict], target: float) -> float | None:
    hit = next((r for r in evals if r["eval/score"] >= target), None)
    return hit["train_time"] / 60 if hit else None


def median_reach(reach: list[float | None]) -> float | None:
    """Median minutes to the target over seeds, a seed that never reached it counting as later than any that did:
    defined when more than half of the seeds reached it, None otherwise."""
    ordered = sorted(reach, key=lambda m: float("inf") if m is None else m)
    n = len(ordered)
    mid = ordered[(n - 1) // 2: n // 2 + 1]
    return None if None in mid else statistics.fmean(mid)


def summarize(runs: dict, v: str, target: float) -> dict:
    seeds = [(ev, tr) for (var, _), (ev, tr) in runs.items() if var == v]
    mean = statistics.fmean

    def spread(xs):
        return f"{mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    reach = [minutes_to(ev, target) for ev, _ in seeds]
    sec = {k: statistics.median(r[f"time/{k}"] for _, tr in seeds for r in tr) for k in ("sample", "reward", "train")}
    return {"n": len(seeds), "its": statistics.median(tr[-1]["step"] for _, tr in seeds),
            "base": mean(ev[0]["eval/score"] for ev, _ in seeds),
            "final": spread([ev[-1]["eval/score"] for ev, _ in seeds]),
            "final_mean": mean(ev[-1]["eval/score"] for ev, _ in seeds),
            "best": mean(max(r["eval/score"] for r in ev) for ev, _ in seeds),
            "strict": spread([ev[-1]["eval/strict"] for ev, _ in seeds]),
            "cats": {c: mean(ev[-1].get(f"eval/strict/{c}", float("nan")) for ev, _ in seeds) for c in CATEGORIES},
            "reach": median_reach(reach), "hit": sum(m is not None for m in reach),
            "sec": sec, "s_it": sum(sec.values()),
            "img_it": statistics.median(tr[-1]["samples"] / tr[-1]["step"] for _, tr in seeds)}


def table(runs: dict, variants: list[str], target: float) -> str:
    rows = {v: summarize(runs, v, target) for v in variants}
    base = rows.get("flow_grpo")  # without Flow-GRPO in the grid the ratio columns stay empty

    def ratio(s: dict) -> tuple[str, str, str]:
        if base is None:
            return "–", "–", "–"
        faster = f"{base['reach'] / s['reach']:.2f}×" if base["reach"] and s["reach"] else "–"
        return f"{s['final_mean'] - base['final_mean']:+.3f}", faster, f"{s['s_it'] / base['s_it']:.2f}"

    lines = [f"| variant | seeds | iterations | eval: base → final (mean ± sd) | Δ final vs Flow-GRPO | best | "
             f"strict, final | seeds that reached {target}, median training minutes | "
             f"speed-up to {target} vs Flow-GRPO | "
             "s/it: sample / reward / train | s/it vs Flow-GRPO | images / it |", "| --- " * 12 + "|"]
    for v, s in rows.items():
        delta, faster, cost = ratio(s)
        reach = f"{s['hit']}/{s['n']} reached" + (f", {s['reach']:.1f}" if s["reach"] is not None else "")
        sec = s["sec"]
        lines.append(f"| {VARIANTS[v][0]} | {s['n']} | {s['its']:.0f} | {s['base']:.3f} → {s['final']} | {delta} | "
                     f"{s['best']:.3f} | {s['strict']} | {reach} | {faster} | {s['s_it']:.2f}: {sec['sample']:.2f} / "
                     f"{sec['reward']:.2f} / {sec['train']:.2f} | {cost} | {s['img_it']:.0f} |")
    lines += ["", "Final strict accuracy per GenEval category (mean over seeds):", "",
              "| variant | " + " | ".join(CATEGORIES) + " |", "| --- " * (len(CATEGORIES) + 1) + "|"]
    lines += [f"| {VARIANTS[v][0]} | " + " | ".join(f"{s['cats'][c]:.2f}" for c in CATEGORIES) + " |"
              for v, s in rows.items()]
    return "\n".join(lines) + "\n"


def paired_table(runs: dict, variants: list[str]) -> str:
    """Each seed against Flow-GRPO's run of the same seed (same base, same evaluation noise): the gain (final minus
    first evaluation), the final's difference, and the training minutes to Flow-GRPO's final score of that seed
    (median over seeds as median_reach; Flow-GRPO's own is when it first reached its final)."""
    seeds = sorted(s for v, s in runs if v == "flow_grpo")
    if not seeds:
        return ""
    target = {s: runs[("flow_grpo", s)][0][-1]["eval/score"] for s in seeds}
    lines = ["", "Each seed against Flow-GRPO's run of the same seed (seeds " + ", ".join(map(str, seeds)) + "):", "",
             "| variant | gain: final − first eval (mean ± sd) | final − Flow-GRPO's final, per seed | "
             "minutes to Flow-GRPO's final score (seeds that got there) |", "| --- " * 4 + "|"]
    for v in variants:
        paired = [s for s in seeds if (v, s) in runs]
        evals = {s: runs[(v, s)][0] for s in paired}
        gains = [evals[s][-1]["eval/score"] - evals[s][0]["eval/score"] for s in paired]
        gain = f"{statistics.fmean(gains):+.3f}" + (f" ± {statistics.stdev(gains):.3f}" if len(gains) > 1 else "")
        delta = ", ".join(f"{evals[s][-1]['eval/score'] - target[s]:+.3f}" for s in paired)
        reach = [minutes_to(evals[s][1:], target[s]) for s in paired]
        med = median_reach(reach)
        lines.append(f"| {VARIANTS[v][0]} | {gain} | {delta} | {'–' if med is None else f'{med:.1f}'} "
                     f"({sum(m is not None for m in reach)}/{len(paired)}) |")
    return "\n".join(lines) + "\n"


def separation_table(runs: dict, variants: list[str]) -> str:
    """Every pair of methods by final score: row's mean minus column's (over seeds), in bold where the difference
    exceeds twice the larger of the two seed spreads (sd over seeds): the differences this grid can name."""
    finals = {v: [ev[-1]["eval/score"] for (var, _), (ev, _) in runs.items() if var == v] for v in variants}
    finals = {v: f for v, f in finals.items() if len(f) > 1}  # a spread needs two seeds
    if len(finals) < 2:
        return ""
    names = [VARIANTS[v][0] for v in finals]
    lines = ["", "Final scores, row minus column (mean over seeds); **bold**: more than twice the larger seed spread "
             "(sd) of the two:", "", "| | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for a, fa in finals.items():
        cells = []
        for b, fb in finals.items():
            d = statistics.fmean(fa) - statistics.fmean(fb)
            sep = abs(d) > 2 * max(statistics.stdev(fa), statistics.stdev(fb))
            cells.append("–" if a == b else f"**{d:+.3f}**" if sep else f"{d:+.3f}")
        lines.append(f"| {VARIANTS[a][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def command_line(args: Args) -> str:
    """The grid command that produced these runs (the flags that matter, relative paths)."""
    parts = ["python benchmarks/grid.py"]
    if args.variants != list(VARIANTS):
        parts.append("--variants " + " ".join(args.variants))
    parts.append("--seeds " + " ".join(map(str, args.seeds)))
    parts.append(f"--minutes {args.minutes:g} --iterations {args.iterations}" if args.minutes  # a cap with minutes
                 else f"--iterations {args.iterations}")
    parts.append(f"--workers {args.workers}")
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.flags:
        parts.append(f"--flags {shlex.quote(args.flags)}")
    return " ".join(parts)


def report(args: Args) -> None:
    runs = {}
    for v in args.variants:
        for s in args.seeds:
            run_dir = args.runs_dir / f"{v}-s{s}"
            if (run_dir / "metrics.jsonl").is_file():
                runs[(v, s)] = load_run(run_dir)
    runs = {k: r for k, r in runs.items() if r[0] and r[1]}  # at least one evaluation and one iteration
    variants = [v for v in args.variants if any(k[0] == v for k in runs)]
    if not variants:
        raise SystemExit(f"no finished iterations under {args.runs_dir}; run the grid first")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics").mkdir(exist_ok=True)
    for v, s in runs:
        shutil.copy(args.runs_dir / f"{v}-s{s}" / "metrics.jsonl", args.out / "metrics" / f"{v}-s{s}.jsonl")
    write_csv(runs, args.out / "evals.csv")
    budget = f"{args.minutes:g} training minutes" if args.minutes else f"{args.iterations} iterations"
    plot(runs, variants, args.out / "curves.png", f"shapes world, {budget}")
    header = (f"`{command_line(args)}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; each run "
              f"{budget}, {args.workers} at a time. Minutes are training time (sampling, reward, update), "
              f"evaluations excluded.\n\n")
    (args.out / "table.md").write_text(header + table(runs, variants, args.target) + paired_table(runs, variants)
                                       + separation_table(runs, variants))
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out / 'evals.csv'}, {args.out / 'curves.png'}, {args.out / 'table.md'}")


def main(args: Args) -> None:
    if not args.report_only:
        run_grid(args)
    report(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
