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
