"""The real-model backends (SD3, FLUX) on tiny random pipelines built in code, and the single-GPU options:
every script runs on both, FLUX's one-pass guidance and packed latents, the sampler against diffusers'
own pipelines, gradient checkpointing, the prompt cache and text-encoder offload, --dry-run."""

import copy
import json
import math
import shutil

import pytest
import torch

import awm
import common
import flow_grpo
import g2rpo
import mix_grpo
import tempflow_grpo
from common import load_policy, lora_targets, rollout, weight_memory
from test_flow_grpo import run

CPU = torch.device("cpu")
SCRIPTS = {"flow_grpo": (flow_grpo, {}), "awm": (awm, {"train_timesteps": 2}),
           "mix_grpo": (mix_grpo, {"num_steps": 4, "window_size": 2, "window_interval": 1}),
           "tempflow_grpo": (tempflow_grpo, {}), "g2rpo": (g2rpo, {"granularities": (1, 2)})}


@pytest.fixture(scope="module")
def flux_policy(tiny_flux_dir):
    return load_policy(str(tiny_flux_dir), CPU, resolution=64)


@pytest.fixture(scope="module")
def sd3_policy(tiny_sd3_dir):
    return load_policy(str(tiny_sd3_dir), CPU, resolution=64)


def tiny_args(module, model, tmp_path, **extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a dog\n")
    kw = dict(model=str(model), resolution=64, reward="jpeg_compressibility", prompts=str(prompts),
              eval_prompts=str(prompts), steps=1, prompts_per_step=2, group_size=2, num_steps=3, eval_num_steps=2,
              eval_per_prompt=1, eval_every=1, save_every=1, minibatches=1, lora_rank=4, lora_alpha=4.0, threads=1,
              device="cpu", out=str(tmp_path / "run"))
    return module.Args(**{**kw, **extra})


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("backend", ["flux", "sd3"])
def test_every_script_runs_on_tiny_pipelines(script, backend, tmp_path, tiny_flux_dir, tiny_sd3_dir, capsys):
    module, extra = SCRIPTS[script]
    model = tiny_flux_dir if backend == "flux" else tiny_sd3_dir
    guidance = 3.5 if backend == "flux" else 1.0
    # the memory options ride along: checkpointing on FLUX, offloaded text encoders and chunked sampling on SD3
    options = {"gradient_checkpointing": True} if backend == "flux" else {"offload_text_encoders": True,
                                                                           "sample_batch": 3}
    module.main(tiny_args(module, model, tmp_path, guidance=guidance, **options, **extra))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward/mean" in r]
    assert len(train) == 1 and math.isfinite(train[0]["reward/mean"]) and train[0]["time/backward"] > 0
    if script != "awm":  # the first minibatch is on-policy: in float32 its recomputed ratio is 1 to rounding (the
        # tree methods evaluate a parent once for its children, in another batch shape than the sampler: ~1e-7)
        assert train[0]["train/onpolicy_ratio_err"] < 1e-6
    assert [r["step"] for r in recs if "eval/score" in r] == [0, 1]
    # a reward without strict accuracy: the summary line shows the score and no "eval/strict nan"
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "eval/score" in done[0] and "strict" not in done[0] and "nan" not in done[0]


def test_flux_resolves_its_shift_and_resumes(tmp_path, tiny_flux_dir):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    args = tiny_args(flow_grpo, tiny_flux_dir, tmp_path, guidance=3.5)
    assert args.shift is None
    flow_grpo.main(args)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    expected = math.exp(calculate_shift(16, 256, 4096, 0.5, 1.15))  # 64 px: (64 / 16)^2 = 16 tokens
    assert ckpt["args"]["shift"] == pytest.approx(expected)
    flow_grpo.main(tiny_args(flow_grpo, tiny_flux_dir, tmp_path, guidance=3.5, steps=2, resume=str(tmp_path / "run")))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "reward/mean" in line]
    assert steps == [1, 2]


def test_flux_guidance_is_one_pass_with_the_embedding(flux_policy):
    calls = []
    hook = flux_policy.denoiser.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        cond = flux_policy.encode(["a red circle", "a dog"])
        x = flux_policy.noise(2, torch.Generator().manual_seed(0))
        v = flux_policy.velocity(x, 0.7, cond, 3.5)
    finally:
        hook.remove()
    assert len(calls) == 1 and calls[0]["hidden_states"].shape[0] == 2  # no unconditional pass
    assert torch.equal(calls[0]["guidance"], torch.full((2,), 3.5))
    assert torch.allclose(calls[0]["timestep"], torch.full((2,), 0.7))  # sigma, not 1000 sigma
    assert v.shape == x.shape and flux_policy.uncond is None


def test_flux_packed_latents_and_lora_targets(flux_policy, sd3_policy, monkeypatch):
    assert flux_policy.latent_shape == (16, 64)  # (64 / 16)^2 tokens of 16 channels x 2 x 2
    images = flux_policy.decode(flux_policy.noise(3))
    assert images.shape == (3, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    from peft import LoraConfig

    from common import lora_config

    # the reference FLUX trainer's LoRA (Flow-GRPO, scripts/train_flux.py), re-typed: r 64, alpha 128, these layers
    reference = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2"]
    assert lora_config(flux_policy, 8, None) == (8, 16.0)
    assert lora_config(flux_policy, None, None) == lora_config(sd3_policy, None, None) == (0, 0.0)  # tiny: every weight
    monkeypatch.setattr(common, "FULL_FINETUNE_BELOW", 0)  # as big as the real models: their references' LoRA
    assert lora_config(flux_policy, None, None) == (64, 128.0) and lora_config(sd3_policy, None, None) == (32, 64.0)

    def adapted(targets):
        model = copy.deepcopy(flux_policy.denoiser)
        model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        return {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}

    ours = adapted(lora_targets(flux_policy))
    assert ours == adapted(reference)
    assert "transformer_blocks.0.ff.net.2" in ours and "transformer_blocks.0.ff_context.net.0.proj" in ours
    assert "single_transformer_blocks.0.attn.to_q" in ours
    assert not any(n.endswith(("proj_out", "proj_mlp")) for n in ours)


@pytest.mark.parametrize("backend", ["flux", "sd3"])
def test_ode_matches_the_diffusers_pipeline(backend, tiny_flux_dir, tiny_sd3_dir, flux_policy, sd3_policy):
    """Our sampler (ODE, policy.sigmas) reproduces FluxPipeline / StableDiffusion3Pipeline images at their defaults."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    policy, T = (flux_policy, 3) if backend == "flux" else (sd3_policy, 3)
    guidance = 3.5 if backend == "flux" else 2.0
    sigmas = policy.sigmas(T, policy.default_shift)
    x = policy.noise(1, torch.Generator().manual_seed(1))
    ours = policy.decode(rollout(policy, policy.encode(["a red circle"]), x, sigmas, [0.0] * T, guidance).latents[:, -1])
    if backend == "flux":  # the pipeline's own sigmas: linspace(1, 1/T, T), shifted by e^mu
        pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
        theirs = pipe("a red circle", height=64, width=64, num_inference_steps=T, guidance_scale=guidance, latents=x,
                      output_type="pt", max_sequence_length=512).images
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
        theirs = pipe("a red circle", height=64, width=64, num_inference_steps=T, guidance_scale=guidance,
                      latents=x, output_type="pt", max_sequence_length=128).images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_flux_dir):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        policy = load_policy(str(tiny_flux_dir), CPU, resolution=64, gradient_checkpointing=ckpt)
        policy.add_lora(4, 4.0, lora_targets(policy))
        assert policy.denoiser.gradient_checkpointing == ckpt
        x = policy.noise(2, torch.Generator().manual_seed(0))
        policy.velocity(x, 0.5, policy.encode(["a red circle", "a dog"]), 3.5).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_prompt_cache_and_text_encoder_offload(sd3_policy):
    calls = []
    encode = sd3_policy._encode
    sd3_policy._encode = lambda prompts, dev: calls.append(list(prompts)) or encode(prompts, dev)
    try:
        first = sd3_policy.encode(["a cat", "a dog", "a cat"])
        again = sd3_policy.encode(["a dog", "a cat"])
        sd3_policy.offload_text_encoders(["a cat", "a red square"])
    finally:
        sd3_policy._encode = encode
    assert calls == [["a cat", "a dog"], ["a red square"]]  # each prompt encoded once
    assert torch.equal(first["hidden"][1], again["hidden"][0]) and torch.equal(first["hidden"][0], first["hidden"][2])
    assert sd3_policy.text_device == CPU and set(sd3_policy.text_encoders) == {"text_encoder", "text_encoder_2",
                                                                                "text_encoder_3"}
    report = weight_memory(sd3_policy)
    assert all(name in report for name in ("denoiser", "text_encoder_3", "vae", "trainable", "total"))


def test_missing_flux_weights_fail_clearly(tmp_path, tiny_flux_dir):
    with pytest.raises(SystemExit, match="hf download black-forest-labs/FLUX.1-dev"):
        load_policy("black-forest-labs/FLUX.1-dev", CPU)
    with pytest.raises(SystemExit, match="The folder /nonexistent/flux does not exist"):
        load_policy("/nonexistent/flux", CPU)
    partial = tmp_path / "flux"  # a FLUX folder without its weights
    partial.mkdir()
    shutil.copy(tiny_flux_dir / "model_index.json", partial / "model_index.json")
    with pytest.raises(SystemExit, match=f"cannot load --model '{partial}'.*\n.*is not a complete diffusers pipeline"):
        load_policy(str(partial), CPU)
    with pytest.raises(SystemExit, match="multiple of 16"):
        load_policy(str(tiny_flux_dir), CPU, resolution=72)


def test_a_bad_resolution_stops_before_the_weights_load(monkeypatch, tiny_flux_dir):
    """load_policy checks --resolution on the configs alone: on SD3.5-M or FLUX a wasted load is minutes."""
    def no_load(*a, **k):
        raise AssertionError("the pipeline's weights were loaded before --resolution was checked")

    monkeypatch.setattr(common, "_load_pipeline", no_load)
    with pytest.raises(SystemExit, match="at most 32x32 px"):
        load_policy(None, CPU, resolution=64)  # the shapes pipeline: 2 x 2 patches, 4 x 4 positions, factor 4
    with pytest.raises(SystemExit, match="multiple of 16"):
        load_policy(str(tiny_flux_dir), CPU, resolution=72)


def test_dry_run_prints_the_plan_and_exits(tmp_path, tiny_flux_dir):
    out = tmp_path / "run"
    proc = run("awm.py", "--model", str(tiny_flux_dir), "--resolution", "64", "--dry-run", "--threads", "1",
               "--device", "cpu", "--lora-rank", "4", "--prompts-per-step", "3", "--group-size", "4",
               "--minibatches", "2", "--steps", "5", "--gradient-checkpointing", "--offload-text-encoders",
               "--out", str(out))
    assert "3 prompts x 4 images = 12 rollouts" in proc.stdout and "up to 10 optimiser steps" in proc.stdout
    assert "weight memory" in proc.stdout and "text_encoder_2" in proc.stdout and "--dry-run" in proc.stdout
    assert not out.exists()
