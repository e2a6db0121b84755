"""pretrain.py is seeded and reproducible, and its output loads as the shapes policy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def pretrain(out, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--steps", "3", "--batch-size", "8",
                           "--eval-steps", "2", "--threads", "1", "--out", str(out), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pretrain_is_reproducible_and_loads(tmp_path):
    out = pretrain(tmp_path / "a")
    assert "eval/strict/counting" in out and (tmp_path / "a" / "samples.png").is_file()
    pretrain(tmp_path / "b")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from common import load_policy

    policy = load_policy(str(tmp_path / "a"), torch.device("cpu"))  # a shapes base folder is a --model
    x = policy.noise(2)
    assert x.shape == (2, 3, 32, 32) and "vae" not in policy.components
    assert policy.velocity(x, 0.5, policy.encode(["a circle", "two squares"]), 4.5).shape == x.shape


def test_pretrain_on_a_vaes_latents(tmp_path):
    import shapes
    from common import load_policy

    vae = shapes.build_vae()
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(tmp_path / "vae")
    assert "eval/strict/counting" in pretrain(tmp_path / "base", "--vae", str(tmp_path / "vae"))
    policy = load_policy(str(tmp_path / "base"), torch.device("cpu"))
    assert policy.latent_shape == (4, 16, 16) and "vae" in policy.components
    assert policy.decode(policy.noise(2)).shape == (2, 3, 32, 32)


def test_pretrain_an_sd3_pipeline_on_a_vaes_latents(tmp_path):
    import shapes
    from common import load_policy

    vae = shapes.build_vae(4)
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(tmp_path / "vae")
    assert "eval/strict/counting" in pretrain(tmp_path / "base", "--vae", str(tmp_path / "vae"), "--sd3", "--pool", "20")
    assert (tmp_path / "base" / "model_index.json").is_file()  # a diffusers pipeline folder, saved without T5
    policy = load_policy(str(tmp_path / "base"), torch.device("cpu"))  # resolution unset: the native 32 px
    assert policy.backend == "sd3" and policy.latent_shape == (4, 8, 8) and "text_encoder_3" not in policy.components
    assert policy.decode(policy.noise(2)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("flags, error", [({"sd3": True}, "--sd3 needs --vae"), ({"pool": 64}, "--pool needs --vae")])
def test_latent_options_need_a_vae(tmp_path, flags, error):
    import pretrain

    with pytest.raises(SystemExit, match=error):
        pretrain.main(pretrain.Args(out=tmp_path, **flags))


def test_sd3_pretraining_encodes_prompts_as_the_sd3_backend(tmp_path):
    """What pre-training feeds the transformer is what the `sd3` backend feeds it after loading the saved folder
    (the same CLIP layers, pooled vectors and zero T5 tokens), so RL starts from the model pre-training made."""
    import pretrain
    import shapes
    from common import load_policy

    vae = shapes.build_vae(4).eval()
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    pipe, models, velocity = pretrain.build_base(pretrain.Args(sd3=True, vae=tmp_path), shapes.build_tokenizer(), vae,
                                                 torch.device("cpu"))
    pipe.save_pretrained(tmp_path / "base")
    policy = load_policy(str(tmp_path / "base"), torch.device("cpu"))
    captions = ["a red circle", "two blue squares", ""]
    x, sigma = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity(x, sigma, policy.encode(captions), 1.0),
                                   velocity(x, sigma * 1000, captions), atol=1e-5, rtol=1e-5)


def test_shipped_base_is_present_and_small():
    base = ROOT / "assets" / "shapes_base"
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").is_file() and size < 10 * 2**20


def test_pool_batches_pair_each_caption_with_its_render():
    """--pool draws batches from renders encoded once: every caption must stay with its own render (the identity
    stands in for the VAE here, so the shapes scorer can read the pooled 'latents')."""
    import random
    from types import SimpleNamespace

    import pretrain
    import shapes

    identity = SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0),
                               encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x)))
    stream = pretrain.batches(pretrain.Args(pool=300, batch_size=64), identity, random.Random(0))
    for _ in range(3):
        captions, x0 = next(stream)
        assert len(captions) == len(x0) == 64 and len(set(captions)) > 1
        assert shapes.score((x0 + 1) / 2, captions)[1].min() == 1  # each render reads as its own caption
