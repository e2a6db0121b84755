"""Every script trains on the tiny SD3 and FLUX pipelines with every real reward (tiny random reward models,
nothing downloaded): one iteration each, and the LoRA weights must move. Issue 17: PickScore's scores carried
a graph through its reward model (its weights required grad) into the advantages, and the first update crashed
("Trying to backward through the graph a second time"); the tests only ever scored with it. And a missing
reward model must stop a script before its diffusion model loads, naming what is missing."""

import json
import math

import pytest
import torch

import awm
import common
import flow_grpo
import g2rpo
import mix_grpo
import rewards as R
import tempflow_grpo
from test_real_rewards import tiny_clip_dir, tiny_ocr_dir, tiny_owl_dir  # noqa: F401 (fixtures)

SCRIPTS = {"flow_grpo": (flow_grpo, {}), "awm": (awm, {"train_timesteps": 2}),
           "mix_grpo": (mix_grpo, {"num_steps": 4, "window_size": 2, "window_interval": 1}),
           "tempflow_grpo": (tempflow_grpo, {}), "g2rpo": (g2rpo, {"granularities": (1, 2)})}
# a GenEval prompt cannot also carry the quoted text OCR reads, so OCR trains on its own prompt
GENEVAL_PROMPT, OCR_PROMPT = "a photo of a red car", 'a sign that says "OPEN LATE"'
EVERY_REWARD = {  # together, every real reward
    "geneval_prompts": ("pickscore:1,clipscore:1,aesthetic:1,geneval:1", GENEVAL_PROMPT),
    "ocr_prompts": ("pickscore:1,clipscore:1,aesthetic:1,ocr:1", OCR_PROMPT),
}


@pytest.fixture
def reward_env(tiny_clip_dir, tiny_ocr_dir, tiny_owl_dir, monkeypatch):  # noqa: F811
    """Every $CLEANFLOWRL_MODEL_<KEY> pointed at a tiny random model."""
    for key in ("pickscore", "pickscore_processor", "clipscore", "aesthetic_clip"):
        monkeypatch.setenv(f"CLEANFLOWRL_MODEL_{key.upper()}", str(tiny_clip_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", str(tiny_clip_dir / "aesthetic.pth"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))


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


@pytest.mark.parametrize("prompts", list(EVERY_REWARD))
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("backend", ["sd3", "flux"])
def test_every_script_trains_with_every_real_reward(backend, script, prompts, reward_env, tmp_path, tiny_sd3_dir,
                                                    tiny_flux_dir, monkeypatch):
    module, extra = SCRIPTS[script]
    model = tiny_flux_dir if backend == "flux" else tiny_sd3_dir
    reward, prompt = EVERY_REWARD[prompts]
    recs, initial, trained = train_once(module, model, tmp_path, reward, prompt, monkeypatch,
                                        guidance=3.5 if backend == "flux" else 1.0, **extra)
    assert_trained(recs, initial, trained)
    names = [name for name, _ in R.parse_reward_spec(reward)]
    train = next(r for r in recs if "reward/mean" in r)
    assert all(f"reward/{name}" in train for name in names)  # each component was scored in training


def readme_reward_sums() -> list[str]:
    """The distinct --reward values of the README's commands that use real reward models."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    sums = dict.fromkeys(re.findall(r"--reward ([\w.:,]+)", readme))
    return [r for r in sums if all(R.model_keys(part.partition(":")[0]) for part in r.split(","))]


README_SUMS = readme_reward_sums()
# the tiny random detector and reader score every tiny image alike: alone, they give no advantage to train on
CONSTANT_ON_TINY_MODELS = {"geneval", "ocr"}


def test_the_readme_uses_real_reward_sums():
    assert "pickscore" in README_SUMS and any("," in r for r in README_SUMS), README_SUMS


@pytest.mark.parametrize("reward", README_SUMS)
def test_readme_reward_sums_train(reward, reward_env, tmp_path, tiny_sd3_dir, monkeypatch):
    """Each reward (sum) a README command uses trains Flow-GRPO one iteration on tiny SD3; the weights move
    unless the sum's rewards are all constant on the tiny models (their gradient path: the sums above)."""
    names = {name for name, _ in R.parse_reward_spec(reward)}
    prompt = OCR_PROMPT if "ocr" in names else GENEVAL_PROMPT
    recs, initial, trained = train_once(flow_grpo, tiny_sd3_dir, tmp_path, reward, prompt, monkeypatch)
    assert_trained(recs, initial, trained, moved=not names <= CONSTANT_ON_TINY_MODELS)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_missing_reward_models_stop_the_script_before_the_diffusion_model(script, monkeypatch, tmp_path):
    """A missing local folder and a hub id outside the cache (offline) are both named, with the right advice,
    before the script loads its (here also missing) diffusion model."""
    module, extra = SCRIPTS[script]
    monkeypatch.setenv("CLEANFLOWRL_MODEL_PICKSCORE", str(tmp_path / "no-pickscore"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/no-such-clip")

    def load_policy(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the reward models were checked")

    monkeypatch.setattr(module, "load_policy", load_policy)
    args = module.Args(model=str(tmp_path / "no-diffusion-model"), reward="pickscore:1,clipscore:1", lora_rank=4,
                       lora_alpha=4.0, threads=1, device="cpu", out=str(tmp_path / "run"), **extra)
    with pytest.raises(SystemExit) as e:
        module.main(args)
    msg = str(e.value)
    assert msg.startswith("--reward: reward models missing (HF_HUB_OFFLINE is set")
    assert f"the folder {tmp_path / 'no-pickscore'} (from $CLEANFLOWRL_MODEL_PICKSCORE) does not exist" in msg
    assert "hf download yuvalkirstain/PickScore_v1 --local-dir" in msg  # how to fill the folder
    assert f"hf download {tmp_path}" not in msg  # never a download of a local path
    assert "'cleanflowrl-test/no-such-clip' is not in the Hugging Face cache" in msg
    assert "`hf download cleanflowrl-test/no-such-clip`" in msg
    assert not (tmp_path / "run").exists()
