"""benchmarks/headroom.py: per-prompt groups of scores and their summary."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import headroom  # noqa: E402
from common import load_policy  # noqa: E402


def test_summary_reads_mean_best_of_g_and_all_equal_groups():
    s = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1 / 3]])
    line = headroom.summary("x", s)
    assert "mean 0.528" in line and "best-of-3 0.708" in line and "all-equal groups 0.50" in line


def test_group_scores_are_one_row_per_prompt_and_reproducible():
    policy = load_policy(None, torch.device("cpu"))
    prompts = ["a circle", "two squares", "a red square and a blue circle"]
    s = headroom.group_scores(policy, prompts, 3, 4, 0.7, seed=1)
    assert s.shape == (3, 3) and ((s >= 0) & (s <= 1)).all()
    assert torch.equal(s, headroom.group_scores(policy, prompts, 3, 4, 0.7, seed=1))
