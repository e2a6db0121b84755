"""Every script trains on the tiny SD3 and FLUX pipelines with every real reward (tiny random reward models,
nothing downloaded): one iteration each, and the LoRA weights must move. Issue 17: PickScore's scores carried
a graph through its reward model (its weights required grad) into the advantages, and the first update crashed
("Trying to backward through the graph a second time"); the tests only ever scored with it. And a missing
reward model must stop a script before its diffusion model loads, naming what is missing."""

import pytest

import awm
import flow_grpo
import g2rpo
import mix_grpo
import rewards as R
import tempflow_grpo
from reward_runs import GENEVAL_PROMPT, OCR_PROMPT, assert_trained, train_once
from test_real_rewards import tiny_clip_dir, tiny_ocr_dir, tiny_owl_dir  # noqa: F401 (fixtures)
from test_reward_hps import tiny_hps  # noqa: F401 (fixture)
from test_reward_imagereward import tiny_ir  # noqa: F401 (fixture)

SCRIPTS = {"flow_grpo": (flow_grpo, {}), "awm": (awm, {"train_timesteps": 2}),
           "mix_grpo": (mix_grpo, {"num_steps": 4, "window_size": 2, "window_interval": 1}),
           "tempflow_grpo": (tempflow_grpo, {}), "g2rpo": (g2rpo, {"granularities": (1, 2)})}
EVERY_REWARD = {  # together, every real reward
    "geneval_prompts": ("pickscore:1,clipscore:1,aesthetic:1,hpsv2:1,geneval:1", GENEVAL_PROMPT),
    "ocr_prompts": ("pickscore:1,clipscore:1,imagereward:1,ocr:1", OCR_PROMPT),
}


@pytest.fixture
def reward_env(tiny_clip_dir, tiny_ocr_dir, tiny_owl_dir, tiny_hps, tiny_ir, monkeypatch):  # noqa: F811
    """Every $CLEANFLOWRL_MODEL_<KEY> pointed at a tiny random model."""
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2", str(tiny_hps[1]))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2_TOKENIZER", str(tiny_hps[0] / "tokenizer"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_IMAGEREWARD", str(tiny_ir[0]))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_IMAGEREWARD_TOKENIZER", str(tiny_ir[2]))
    for key in ("pickscore", "pickscore_processor", "clipscore", "aesthetic_clip"):
        monkeypatch.setenv(f"CLEANFLOWRL_MODEL_{key.upper()}", str(tiny_clip_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", str(tiny_clip_dir / "aesthetic.pth"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))


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
    """The distinct --reward values of the real-model commands (the README's and those it points to: one per paper
    and backend in docs/real_models.md, the torchrun ones in docs/many_gpus.md) that use real reward models."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = "\n".join((root / name).read_text() for name in ("README.md", "docs/real_models.md", "docs/many_gpus.md"))
    sums = dict.fromkeys(re.findall(r"--reward ([\w.:,]+)", text))
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
