"""Many processes (torchrun, gloo on the CPU): 2 ranks on B images each update the weights as one process on the
same 2B images, for every script; a real 2-rank run logs and checkpoints once, resumes, and evaluates as one
process does; a rank that raises ends the job with its error instead of hanging."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["flow_grpo", "awm", "mix_grpo", "g2rpo", "tempflow_grpo", "dance_grpo", "diffusion_nft"]
TINY = ["--prompts-per-step", "2", "--group-size", "4", "--num-steps", "3", "--eval-num-steps", "3",
        "--eval-per-prompt", "1", "--eval-every", "1", "--save-every", "1", "--threads", "1", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, ranks=2, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args] if ranks > 1 else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """Every script's weights after one iteration (two minibatches, two optimiser steps) on the same global batch:
    by one process, and by each of 2 ranks on its half."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    check(launch("tests/dist_worker.py", "update", str(one), ranks=1))
    check(launch("tests/dist_worker.py", "update", str(two), ranks=2))
    return one, two


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_update_the_weights_as_one_process(updates, script):
    one, two = updates
    a, r0, r1 = (torch.load(p, weights_only=True) for p in (one / f"{script}.0.pt", two / f"{script}.0.pt",
                                                             two / f"{script}.1.pt"))
    for k in a["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), f"{k}: the ranks' weights differ"
    moved = max((a["weights"][k] - a["before"][k]).abs().max().item() for k in a["weights"])
    diff = max((a["weights"][k] - r0["weights"][k]).abs().max().item() for k in a["weights"])
    assert moved > 1e-4 and diff < 1e-6 + 1e-4 * moved, (moved, diff)


def test_world_of_one_splits_minibatches_as_before():
    a = [m[0] for m in common.local_minibatches(common.global_rows(10), 3, torch.Generator().manual_seed(0))]
    b = torch.randperm(10, generator=torch.Generator().manual_seed(0)).chunk(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 3
    assert [m[2] for m in common.local_minibatches(common.global_rows(10), 3, torch.Generator())] == [4, 4, 2]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_trains_logs_once_resumes_and_evaluates_as_one_process(tmp_path):
    out = tmp_path / "run"
    proc = check(launch("flow_grpo.py", *TINY, "--steps", "2", "--out", str(out)))
    assert proc.stdout.count("done: 2 iterations") == 1 and "rank 0 of 2 processes" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(ckpt["gen"]) == 2 and not any(p.suffix == ".tmp" for p in out.iterdir())
    recs = records(out)
    assert [r["step"] for r in recs if "reward/mean" in r] == [1, 2]
    assert all(r["samples"] == 8 * r["step"] for r in recs if "reward/mean" in r)  # both ranks' images counted
    check(launch("flow_grpo.py", *TINY, "--steps", "3", "--resume", str(out)))
    assert [r["step"] for r in records(out) if "reward/mean" in r] == [1, 2, 3]
    # the held-out evaluation is split over the ranks and gathered: the same score as one process
    single = tmp_path / "single"
    check(launch("flow_grpo.py", *TINY, "--steps", "0", "--out", str(single), ranks=1))
    assert records(single)[0]["eval/score"] == [r for r in recs if "eval/score" in r][0]["eval/score"]
    with pytest.raises(AssertionError, match="saved by 2 processes, this one has 1"):
        check(launch("flow_grpo.py", *TINY, "--steps", "4", "--resume", str(out), ranks=1))


def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    t0 = time.time()
    proc = launch("tests/dist_worker.py", "fail", *TINY, "--steps", "2", "--out", str(tmp_path / "run"))
    assert proc.returncode != 0 and "rank 1 fails on purpose" in proc.stdout + proc.stderr
    assert time.time() - t0 < 120  # not torch.distributed's 10-minute collective timeout


def test_prompts_per_step_must_split_over_the_ranks(tmp_path):
    proc = launch("flow_grpo.py", *TINY, "--prompts-per-step", "3", "--steps", "1", "--out", str(tmp_path / "r"))
    assert proc.returncode != 0 and "multiple of the 2 processes" in proc.stdout + proc.stderr
