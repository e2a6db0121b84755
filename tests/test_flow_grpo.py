"""flow_grpo.py end to end (subprocess, like CleanRL's tests), resume, and clear errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--num-steps", "3", "--eval-num-steps", "3",
        "--eval-per-prompt", "1", "--eval-every", "1", "--save-every", "1", "--minibatches", "2", "--threads", "1",
        "--device", "cpu"]


def run(script, *args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_runs_on_shapes_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = run("flow_grpo.py", *TINY, "--out", str(out), "--beta", "0.04")
    assert "done: 2 iterations" in proc.stdout and "eval/score" in proc.stdout and "eval/strict" in proc.stdout
    recs = records(out)
    train = [r for r in recs if "reward/mean" in r]
    evals = [r for r in recs if "eval/score" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    for key in ("reward/mean", "loss/policy", "loss/kl", "train/clipfrac", "time/sample", "time/reward",
                "time/train", "time/forward", "time/backward", "wall_time"):
        assert key in train[-1], key
    assert train[-1]["loss/kl"] >= 0 and train[-1]["time/forward"] > 0
    assert all(r["train/onpolicy_ratio_err"] < 1e-6 for r in train)  # float32: the first minibatch's ratio is 1
    assert 0 <= evals[-1]["eval/score"] <= 1 and "eval/strict/counting" in evals[-1]
    assert (out / "checkpoint.pt").is_file() and (out / "eval_00002.png").is_file()
    assert any(f.name.startswith("events.out.tfevents") for f in out.iterdir())
    # continue the same run to 3 iterations: the log grows by exactly the missing step
    proc = run("flow_grpo.py", *TINY[2:], "--steps", "3", "--resume", str(out))
    assert "resumed" in proc.stdout
    steps = [r["step"] for r in records(out) if "reward/mean" in r]
    assert steps == [1, 2, 3]


def test_runs_on_tiny_sd3_pipeline(tmp_path, tiny_sd3_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a dog\n")
    out = tmp_path / "run"
    run("flow_grpo.py", *TINY, "--model", str(tiny_sd3_dir), "--resolution", "64", "--reward", "jpeg_compressibility",
        "--prompts", str(prompts), "--eval-prompts", str(prompts), "--lora-rank", "4", "--lora-alpha", "4",
        "--beta", "0.04", "--out", str(out))
    train = [r for r in records(out) if "reward/mean" in r]
    assert len(train) == 2 and all(abs(r["train/ratio"] - 1) < 0.1 for r in train)


@pytest.mark.parametrize("args,message", [
    (["--group-size", "1"], "at least 2 images"),
    (["--reward", "nope"], "unknown reward 'nope'"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--model", "no-such-org/no-such-model"], "hf download no-such-org/no-such-model"),
    (["--resolution", "64"], "at most 32x32 px"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_bad_arguments_fail_clearly(tmp_path, args, message):
    if args[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = run("flow_grpo.py", *TINY[:-2], *args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_same_noise_shares_the_initial_state_within_groups(tiny_shapes_policy):
    import torch

    import flow_grpo

    args = flow_grpo.Args(shift=3.0, group_size=3, num_steps=2, same_noise=True)
    batch = flow_grpo.sample_batch(tiny_shapes_policy, ["a circle", "two squares"], {}, args,
                                   torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    x1 = batch["latents"][:, 0]
    assert torch.equal(x1[0], x1[2]) and not torch.equal(x1[0], x1[3])
    assert not torch.equal(batch["latents"][0, -1], batch["latents"][1, -1])  # the SDE's noise still differs
    assert batch["groups"].tolist() == [0, 0, 0, 1, 1, 1]


def test_advantages_and_policy_loss_direction(trainable_policy):
    """One update on a batch where one image per group is rewarded raises that image's log-prob."""
    import torch

    import flow_grpo
    from common import sde_step

    policy = trainable_policy
    args = flow_grpo.Args(shift=3.0, group_size=2, num_steps=3, minibatches=1, clip_range=10.0, lr=1e-3, guidance=1.0)
    gen = torch.Generator().manual_seed(0)
    batch = flow_grpo.sample_batch(policy, ["a circle", "a square"], {}, args, gen, torch.Generator().manual_seed(1))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = flow_grpo.compute_advantages(batch, rewards, {}, args)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=args.lr)
    def surrogate():  # sum over samples and trained steps of A_i * log pi(x_{j+1} | x_j)
        total = 0.0
        with torch.no_grad():
            for j in range(2):  # int(3 * 0.99) = 2 trained steps
                x, x_next, sig = batch["latents"][:, j], batch["latents"][:, j + 1], batch["sigmas"]
                lp = sde_step(x, policy.velocity(x, sig[j], batch["cond"], 1.0), sig[j], sig[j + 1],
                              args.noise_level, prev_sample=x_next).log_prob
                total += (adv * lp).sum().item()
        return total

    before = surrogate()
    flow_grpo.train_on_batch(policy, opt, batch, adv, {}, args, gen)
    assert surrogate() > before


def test_time_budget_stops_evaluates_and_saves(tmp_path):
    out = tmp_path / "run"
    proc = run("flow_grpo.py", *TINY[2:], "--steps", "5", "--max-minutes", "1e-6", "--out", str(out))
    assert "done: 1 iterations" in proc.stdout
    recs = records(out)
    assert [r["step"] for r in recs if "eval/score" in r] == [0, 1]
    train = [r for r in recs if "reward/mean" in r]
    assert len(train) == 1 and train[0]["train_time"] == pytest.approx(
        train[0]["time/sample"] + train[0]["time/reward"] + train[0]["time/train"], rel=1e-6)
    import torch

    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
