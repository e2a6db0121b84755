"""pretrain.py: one seeded command (the VAE, then the SD3 transformer and text encoders on its latents) that is
reproducible, composes with --vae, and writes a pipeline the `sd3` backend loads as pre-training saw it."""

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pretrain
import shapes
from common import load_policy

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vae_steps=2, vae_batch_size=4, vae_eval_images=12, steps=3, batch_size=8, pool=20, eval_steps=2)
PARTS = ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
         "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors")


def same(a: Path, b: Path, part: str) -> bool:
    x, y = load_file(a / part), load_file(b / part)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_pretrain_is_reproducible_composes_with_vae_and_loads(tmp_path, capsys):
    metrics = pretrain.main(pretrain.Args(out=tmp_path / "a", **TINY))
    out = capsys.readouterr().out
    assert "eval/strict/counting" in metrics and "decoded ground truth of 12 renders" in out
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "a" / "model_index.json").is_file()
    pretrain.main(pretrain.Args(out=tmp_path / "b", **TINY))
    assert all(same(tmp_path / "a", tmp_path / "b", part) for part in PARTS)
    # stage 2 alone on the VAE stage 1 saved is the one command's result (how the shipped base was made)
    pretrain.main(pretrain.Args(out=tmp_path / "c", vae=tmp_path / "a" / "vae", **TINY))
    assert all(same(tmp_path / "a", tmp_path / "c", part) for part in PARTS)

    policy = load_policy(str(tmp_path / "a"), torch.device("cpu"))  # resolution unset: the native 32 px
    assert policy.backend == "sd3" and policy.latent_shape == (4, 8, 8) and "text_encoder_3" not in policy.components
    assert policy.decode(policy.noise(2)).shape == (2, 3, 32, 32)
    cfg = policy.components["vae"].config  # with the latents' statistics
    assert cfg.shift_factor != 0 and cfg.scaling_factor > 0


def test_a_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no VAE there"):
        pretrain.main(pretrain.Args(out=tmp_path / "out", vae=tmp_path / "nothing", **TINY))


def test_pretraining_encodes_prompts_as_the_sd3_backend(tmp_path):
    """What pre-training feeds the transformer is what the `sd3` backend feeds it after loading the saved folder
    (the same CLIP layers, pooled vectors and zero T5 tokens), so RL starts from the model pre-training made."""
    vae = shapes.build_vae(4).eval()
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    pipe, models, velocity = pretrain.build_base(vae, shapes.build_tokenizer(), torch.device("cpu"))
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
    assert (base / "model_index.json").is_file() and (base / PARTS[0]).is_file() and size < 10 * 2**20


def test_pool_batches_pair_each_caption_with_its_render():
    """--pool draws batches from renders encoded once: every caption must stay with its own render (the identity
    stands in for the VAE here, so the shapes scorer can read the pooled 'latents')."""
    from types import SimpleNamespace

    identity = SimpleNamespace(config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0),
                               encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x)))
    stream = pretrain.batches(pretrain.Args(pool=300, batch_size=64), identity, random.Random(0))
    for _ in range(3):
        captions, x0 = next(stream)
        assert len(captions) == len(x0) == 64 and len(set(captions)) > 1
        assert shapes.score((x0 + 1) / 2, captions)[1].min() == 1  # each render reads as its own caption
