"""One training iteration of a script on a tiny pipeline with a given reward, and the check that it trained: shared by
the reward tests (test_train_with_rewards.py, test_reward_hps.py, test_reward_imagereward.py, ...)."""

import json
import math

import torch

import common

# a GenEval prompt cannot also carry the quoted text OCR reads, so OCR trains on its own prompt
GENEVAL_PROMPT, OCR_PROMPT = "a photo of a red car", 'a sign that says "OPEN LATE"'


def train_once(module, model, tmp_path, reward, prompt, monkeypatch, **extra):
    """One iteration of `module` with the smallest settings; returns (metrics records, trainable state when the
    adapters were added, trainable state saved after the iteration)."""
    initial = []
    add_lora = common.Policy.add_lora

    def recording_add_lora(policy, *args, **kwargs):
        add_lora(policy, *args, **kwargs)
        initial.append(policy.trainable_state())

    monkeypatch.setattr(common.Policy, "add_lora", recording_add_lora)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    kw = dict(model=str(model), resolution=64, reward=reward, prompts=str(prompts), eval_prompts=str(prompts),
              steps=1, prompts_per_step=1, group_size=2, num_steps=3, eval_num_steps=2, eval_per_prompt=1,
              eval_every=1, save_every=1, minibatches=1, lora_rank=4, lora_alpha=4.0, threads=1, device="cpu",
              out=str(tmp_path / "run"))
    module.main(module.Args(**{**kw, **extra}))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)  # written here
    assert len(initial) == 1
    return recs, initial[0], ckpt["trainable"]


def assert_trained(recs, initial, trained, moved=True):
    """One training record with a finite reward; with `moved`, the rewards differed within the group and the
    LoRA weights moved. Their B matrices start at zero, so weight decay alone cannot move them: only a gradient
    step through the loss does."""
    train = [r for r in recs if "reward/mean" in r]
    assert len(train) == 1 and math.isfinite(train[0]["reward/mean"])
    lora_b = [n for n in initial if "lora_B" in n]
    assert lora_b and set(trained) == set(initial) and all(torch.isfinite(t).all() for t in trained.values())
    assert all(initial[n].abs().max() == 0 for n in lora_b)
    if moved:
        assert train[0]["adv/abs_mean"] > 0
        assert any(trained[n].abs().max() > 0 for n in lora_b), "the LoRA weights did not move"
