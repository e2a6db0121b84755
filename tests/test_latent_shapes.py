"""The latent shapes world's code path: a shapes base folder with a VAE loads through load_policy, decodes as
SD3 does, and trains; the VAE's palette loss and its decoded-ground-truth report."""

import random
import sys

import pytest
import torch

import common
import flow_grpo
import shapes
from conftest import ROOT
from pretrain import to_latents
from reward_runs import assert_trained, train_once

sys.path.insert(0, str(ROOT / "benchmarks"))


def _vae(seed=0):
    torch.manual_seed(seed)
    vae = shapes.build_vae().eval()
    vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    return vae


@pytest.fixture(scope="module")
def latent_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("latent_base")
    tok = shapes.build_tokenizer()
    torch.manual_seed(0)
    shapes.build_unet(shapes.LATENT_CHANNELS, shapes.RES // 2).save_pretrained(path / "unet")
    shapes.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id).save_pretrained(
        path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    _vae().save_pretrained(path / "vae")
    return path


def test_a_latent_base_folder_is_a_shapes_policy_on_latents(latent_base):
    assert common.is_shapes_base(str(latent_base)) and not common.is_shapes_base(None)
    policy = common.load_policy(str(latent_base), torch.device("cpu"))
    assert policy.backend == "shapes" and policy.latent_shape == (4, 16, 16) and "vae" in policy.components
    x = torch.stack([shapes.render_prompt("a red circle", random.Random(i)) for i in range(3)]) * 2 - 1
    vae = policy.components["vae"]
    z = to_latents(vae, x)  # (E(x) - shift) * scale, the inverse of the policy's decode
    expected = vae.decode(vae.encode(x).latent_dist.mode()).sample / 2 + 0.5
    torch.testing.assert_close(policy.decode(z), expected.clamp(0, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="32x32"):
        common.load_policy(str(latent_base), torch.device("cpu"), resolution=512)


def test_flow_grpo_trains_on_a_latent_base(latent_base, tmp_path, monkeypatch):
    recs, initial, trained = train_once(flow_grpo, latent_base, tmp_path, "shapes", "a red circle", monkeypatch,
                                        resolution=None, group_size=4)
    assert_trained(recs, initial, trained, moved=False)  # a random base may score a group equally


def test_palette_labels_are_the_detectors():
    x = torch.stack([shapes.render_prompt(p, random.Random(i)) for i, p in
                     enumerate(["two blue squares", "a yellow triangle left of a green circle"])])
    x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    d = shapes.palette_distances(x)
    brute = torch.stack([((x - torch.tensor(c).view(1, 3, 1, 1)) ** 2).sum(1)
                         for c in [shapes.BACKGROUND, *shapes.COLORS.values()]], 1)
    torch.testing.assert_close(d, brute)
    assert torch.equal(shapes.palette_labels(x), brute.argmin(1))


def test_vae_training_and_report(tmp_path):
    import latent_shapes

    args = latent_shapes.Args(out=tmp_path / "vae", steps=2, batch_size=4, eval_images=12, threads=1)
    report = latent_shapes.main(args)
    assert report["raw_strict"] == 1.0 and 0 <= report["strict"] <= 1
    assert sum(report["misread"].values()) <= 12
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.from_pretrained(tmp_path / "vae").config  # with the latents' statistics
    assert cfg.latent_channels == 4 and cfg.shift_factor is not None and cfg.scaling_factor > 0


@pytest.fixture(scope="module")
def shapes_sd3(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes_sd3")
    torch.manual_seed(0)
    vae = shapes.build_vae(4)
    vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    shapes.build_sd3_pipeline(vae).save_pretrained(path)
    return path


def test_flow_grpo_trains_on_a_shapes_sd3_pipeline(shapes_sd3, tmp_path, monkeypatch):
    """The shapes world as a StableDiffusion3Pipeline runs through the `sd3` backend at its native 32 px with the
    shapes reward, as SD3.5-M does at 512."""
    recs, initial, trained = train_once(flow_grpo, shapes_sd3, tmp_path, "shapes", "a red circle", monkeypatch,
                                        resolution=None, group_size=4)
    assert_trained(recs, initial, trained, moved=False)  # a random base may score a group equally
