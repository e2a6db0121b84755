"""--micro-batch splits the update's forward/backward passes and accumulates the gradients: for every script the
optimiser step it produces equals the one-pass step, and a bad size fails clearly."""

import dataclasses
import importlib

import pytest
import torch

from test_flow_grpo import TINY, run

# beta > 0 (and AWM's EMA regulariser) so the KL paths are split too; one minibatch, so the step is one gradient
CASES = {
    "flow_grpo": dict(num_steps=3, beta=0.04, clip_range=0.2),
    "mix_grpo": dict(num_steps=4, window_size=2, beta=0.04, clip_range=0.2),
    "awm": dict(num_steps=5, train_timesteps=2, beta=0.1, ema_kl_beta=1.0),
    "tempflow_grpo": dict(num_steps=3, beta=0.04, clip_range=0.2),
    "g2rpo": dict(num_steps=4, beta=0.04, clip_range=0.2),
}


def one_update(script, policy, args, micro: int) -> list[torch.Tensor]:
    """Sample a batch, score it at random, take one SGD step (lr 1) with --micro-batch `micro`; return the change
    of every trainable weight. The weights are restored afterwards."""
    params = policy.trainable_parameters()
    before = [p.detach().clone() for p in params]
    args = dataclasses.replace(args, micro_batch=micro)
    gen = torch.Generator().manual_seed(0)
    state = script.init_state(policy, args)
    batch = script.sample_batch(policy, ["a red circle", "two squares"], state, args, gen,
                                torch.Generator().manual_seed(1))
    rewards = torch.rand(len(batch["images"]), generator=torch.Generator().manual_seed(1))
    adv = script.compute_advantages(batch, rewards, {}, args)
    script.train_on_batch(policy, torch.optim.SGD(params, lr=1.0), batch, adv, state, args,
                          torch.Generator().manual_seed(2))
    delta = [p.detach() - b for p, b in zip(params, before)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return delta


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batches_give_the_same_update(trainable_policy, name):
    script = importlib.import_module(name)
    args = script.Args(shift=3.0, group_size=3, minibatches=1, guidance=1.0, max_grad_norm=1e9, **CASES[name])
    whole = one_update(script, trainable_policy, args, 0)
    split = one_update(script, trainable_policy, args, 1)
    scale = max(d.abs().max().item() for d in whole)
    assert scale > 1e-6, "the update did not move the weights: the test would not see a difference"
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * scale)


def test_negative_micro_batch_fails_clearly(tmp_path):
    proc = run("flow_grpo.py", *TINY, "--micro-batch", "-1", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0 and "--micro-batch -1: use a positive size" in proc.stdout + proc.stderr
