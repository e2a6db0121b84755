import math
import random

import pytest
import torch

import shapes as S
from rewards import REWARDS, make_reward


def test_unknown_reward_lists_known_ones():
    with pytest.raises(ValueError, match="unknown reward 'pickscor'.*jpeg_compressibility.*shapes"):
        make_reward("pickscor")
    with pytest.raises(ValueError, match="not a number"):
        make_reward("shapes:x")


def test_weighted_sum():
    rng = random.Random(0)
    prompts = S.prompt_split("train")[:6]
    images = torch.stack([S.render_prompt(p, rng) for p in prompts])
    images[3:] = torch.rand(3, 3, S.RES, S.RES)
    total, info = make_reward("shapes:1.0,jpeg_compressibility:0.1")(images, prompts)
    s, _ = REWARDS["shapes"](images, prompts)
    j, _ = REWARDS["jpeg_compressibility"](images, prompts)
    assert torch.allclose(total, s + 0.1 * j)
    assert torch.equal(info["shapes"], s) and "strict" in info


def test_shapes_reward_info_per_category():
    prompts = ["a circle", "three squares"]
    images = torch.stack([S.render_prompt(p, random.Random(1)) for p in prompts])
    scores, info = make_reward("shapes")(images, prompts)
    assert scores.tolist() == [1.0, 1.0]
    assert info["strict/single_object"][0] == 1 and math.isnan(info["strict/single_object"][1])


def test_shapes_reward_refuses_other_sizes():
    with pytest.raises(ValueError, match="32x32 images, got \\(64, 64\\)"):
        REWARDS["shapes"](torch.rand(1, 3, 64, 64), ["a circle"])


def test_a_sum_keeps_both_rewards_info_when_their_keys_clash(monkeypatch):
    monkeypatch.setitem(REWARDS, "other", lambda images, prompts: (torch.zeros(len(images)),
                                                                   {"strict": torch.full((len(images),), 7.0)}))
    images = torch.stack([S.render_prompt("a circle", random.Random(0))])
    _, info = make_reward("shapes,other")(images, ["a circle"])
    assert info["strict"].tolist() == [1.0] and info["other/strict"].tolist() == [7.0]


def test_jpeg_rewards_order_flat_and_busy_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    busy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imgs = torch.cat([flat, busy])
    comp, _ = REWARDS["jpeg_compressibility"](imgs, ["", ""])
    incomp, _ = REWARDS["jpeg_incompressibility"](imgs, ["", ""])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    assert torch.equal(comp, -incomp)
