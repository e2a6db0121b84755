"""benchmarks/grid.py: a small grid end to end, resuming an interrupted run, and its curve arithmetic."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import grid  # noqa: E402

TINY = ("--prompts-per-step 2 --group-size 2 --num-steps 4 --eval-num-steps 3 --eval-per-prompt 1 --eval-every 1 "
        "--save-every 1 --device cpu")


def run_grid(tmp_path, *flags, check=True):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grid.py"), "--runs-dir", str(tmp_path / "runs"), "--out",
           str(tmp_path / "out"), f"--flags={TINY}", "--threads", "1", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def test_grid_runs_writes_results_and_resumes(tmp_path):
    # an interrupted run: flow_grpo seed 0 saved after iteration 1 of 3 and never finished
    args = grid.Args(variants=["flow_grpo", "g2rpo_single"], seeds=[0, 1], iterations=3, threads=1, flags=TINY,
                     runs_dir=tmp_path / "runs", out=tmp_path / "out")
    partial = tmp_path / "runs" / "flow_grpo-s0"
    cmd = grid.command("flow_grpo", 0, args) + ["--max-minutes", "1e-6", "--out", str(partial)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert (partial / "checkpoint.pt").is_file() and not (partial / "DONE").exists()

    proc = run_grid(tmp_path, "--variants", "flow_grpo", "g2rpo_single", "--seeds", "0", "1", "--iterations", "3",
                    "--workers", "2")
    assert "resumed" in (tmp_path / "runs" / "flow_grpo-s0.log").read_text()
    evals, train = grid.load_run(partial)
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 1, 2, 3]
    assert all(r["train_time"] > 0 for r in evals[1:]) and evals[0]["samples"] == 0
    with open(tmp_path / "out" / "evals.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4  # 2 variants x 2 seeds x evaluations at 0, 1, 2, 3
    assert {r["variant"] for r in rows} == {"flow_grpo", "g2rpo_single"}
    table = (tmp_path / "out" / "table.md").read_text()
    flow_row = next(line for line in table.splitlines() if line.startswith("| Flow-GRPO |"))
    assert "| 1.00 |" in flow_row and "G²RPO, Λ = {1}" in table and "color_attr" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "metrics" / "g2rpo_single-s1.jsonl").is_file()

    # the same command again: every run is finished, nothing starts
    stamp = (partial / "metrics.jsonl").stat().st_mtime
    proc = run_grid(tmp_path, "--variants", "flow_grpo", "g2rpo_single", "--seeds", "0", "1", "--iterations", "3",
                    "--workers", "2")
    assert "4 already finished" in proc.stdout and (partial / "metrics.jsonl").stat().st_mtime == stamp
    # other flags on the same folder would mix two benchmarks
    proc = run_grid(tmp_path, "--variants", "flow_grpo", "--seeds", "0", "--iterations", "5", check=False)
    assert proc.returncode != 0 and "use the same flags" in proc.stdout + proc.stderr


def test_unknown_variant_fails_with_the_list(tmp_path):
    proc = run_grid(tmp_path, "--variants", "ppo", check=False)
    assert proc.returncode != 0 and "unknown variant(s) ['ppo']" in proc.stderr and "mix_flash" in proc.stderr


def test_load_run_keeps_the_last_record_of_a_step(tmp_path):
    recs = [{"step": 0, "wall_time": 1, "eval/score": 0.5, "eval/strict": 0.1},
            {"step": 1, "wall_time": 2, "reward/mean": 0.1, "samples": 4, "train_time": 1.0},
            {"step": 2, "wall_time": 3, "reward/mean": 0.2, "samples": 8, "train_time": 2.0},  # lost by the kill
            {"step": 2, "wall_time": 4, "reward/mean": 0.3, "samples": 8, "train_time": 2.5},  # after the resume
            {"step": 2, "wall_time": 5, "eval/score": 0.7, "eval/strict": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    evals, train = grid.load_run(tmp_path)
    assert [r["reward/mean"] for r in train] == [0.1, 0.3]
    assert [(r["step"], r["samples"], r["train_time"]) for r in evals] == [(0, 0, 0.0), (2, 8, 2.5)]


def test_mean_curve_interpolates_up_to_the_shortest_run():
    xs, mean, lo, hi = grid.mean_curve([[(0, 0.0), (2, 2.0)], [(0, 1.0), (4, 1.0)]], n=3)
    assert xs.tolist() == [0, 1, 2]
    assert mean.tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert lo.tolist() == [0.0, 1.0, 1.0] and hi.tolist() == [1.0, 1.0, 2.0]


def test_minutes_to_target_uses_training_time():
    evals = [{"eval/score": 0.6, "train_time": 0.0}, {"eval/score": 0.66, "train_time": 90.0},
             {"eval/score": 0.7, "train_time": 180.0}]
    assert grid.minutes_to(evals, 0.65) == 1.5 and grid.minutes_to(evals, 0.8) is None


def test_median_reach_counts_unreached_seeds_as_last():
    assert grid.median_reach([3.0, None, 1.0]) == 3.0  # 1.0, 3.0, never: the middle seed reached at 3.0
    assert grid.median_reach([2.0, None, None]) is None  # the median seed never reached
    assert grid.median_reach([4.0, 1.0, None, 2.0]) == 3.0  # even count: mean of the middle two
    assert grid.median_reach([4.0, None, None, 2.0]) is None


def test_separation_table_names_differences_beyond_twice_the_seed_spread():
    def finals(*scores):
        return {s: ([{"eval/score": 0.6}, {"eval/score": x}], [{}]) for s, x in enumerate(scores)}

    runs = {}
    for v, scores in {"flow_grpo": (0.70, 0.71, 0.72), "awm": (0.80, 0.82, 0.84),
                      "mix_grpo": (0.66, 0.72, 0.78)}.items():
        runs.update({(v, s): r for s, r in finals(*scores).items()})
    rows = {line.split(" | ")[0]: line for line in grid.separation_table(runs, ["flow_grpo", "awm", "mix_grpo"])
            .splitlines() if line.startswith("| ") and "---" not in line}
    # AWM - Flow-GRPO = +0.110 > 2 x 0.020 (AWM's sd, the larger); AWM - MixGRPO = +0.100 is beyond twice AWM's
    # spread but not twice MixGRPO's (0.060), the larger; MixGRPO - Flow-GRPO = +0.010
    assert rows["| AWM"] == "| AWM | **+0.110** | – | +0.100 |"
    assert rows["| Flow-GRPO"] == "| Flow-GRPO | – | **-0.110** | -0.010 |"
    assert rows["| MixGRPO"] == "| MixGRPO | +0.010 | -0.100 | – |"
