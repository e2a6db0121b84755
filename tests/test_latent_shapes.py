"""The shapes world's latent space: the shipped pipeline decodes as SD3 does, and the VAE's palette loss labels
pixels as the scorer does."""

import random

import torch

import common
import shapes
from pretrain import to_latents


def test_the_shipped_pipeline_decodes_the_vaes_latents_as_sd3():
    policy = common.load_policy(None, torch.device("cpu"))
    assert policy.backend == "sd3" and policy.latent_shape == (4, 8, 8) and "vae" in policy.components
    x = torch.stack([shapes.render_prompt(p, random.Random(i)) for i, p in
                     enumerate(["a red circle", "two blue squares", "a yellow triangle above a green square"])])
    vae = policy.components["vae"]
    z = to_latents(vae, x * 2 - 1)  # (E(x) - shift) * scale, the inverse of the policy's decode
    with torch.no_grad():
        expected = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample / 2 + 0.5
    torch.testing.assert_close(policy.decode(z), expected.clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert shapes.score(policy.decode(z), ["a red circle", "two blue squares",
                                           "a yellow triangle above a green square"])[1].min() == 1


def test_palette_labels_are_the_detectors():
    x = torch.stack([shapes.render_prompt(p, random.Random(i)) for i, p in
                     enumerate(["two blue squares", "a yellow triangle left of a green circle"])])
    x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    d = shapes.palette_distances(x)
    brute = torch.stack([((x - torch.tensor(c).view(1, 3, 1, 1)) ** 2).sum(1)
                         for c in [shapes.BACKGROUND, *shapes.COLORS.values()]], 1)
    torch.testing.assert_close(d, brute)
    assert torch.equal(shapes.palette_labels(x), brute.argmin(1))


def test_evaluation_grids_enlarge_small_images(tmp_path):
    """The shapes world's 32 px images are drawn 4x (nearest neighbour) in the grids; 512 px ones as they are."""
    from PIL import Image

    small = torch.rand(3, 3, 32, 32)
    common.save_grid(small, tmp_path / "small.png", nrow=8)
    with Image.open(tmp_path / "small.png") as im:
        assert im.size == ((3 * 34 + 2) * 4, 36 * 4)
        cell = torch.tensor(list(im.getdata())).view(im.size[1], im.size[0], 3)[8:8 + 128, 8:8 + 128]
    assert torch.equal(cell[::4, ::4], (small[0].permute(1, 2, 0) * 255).round().to(cell.dtype))
    common.save_grid(torch.rand(1, 3, 160, 160), tmp_path / "large.png")
    with Image.open(tmp_path / "large.png") as im:
        assert im.size == (164, 164)
