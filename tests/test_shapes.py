"""The shapes world: grammar, splits, renderer and scorer."""

import random
from collections import defaultdict

import pytest
import torch

import shapes as S


def test_splits_disjoint_and_complete():
    train, ev = S.prompt_split("train"), S.prompt_split("eval")
    every = [p for ps in S.all_prompts().values() for p in ps]
    assert not set(train) & set(ev)
    assert sorted(train + ev) == sorted(every)
    assert {S.parse(p).category for p in ev} == set(S.CATEGORIES)  # every category is evaluated
    with pytest.raises(ValueError, match="unknown split"):
        S.prompt_split("test")


def test_parse_categories():
    assert S.parse("a circle").category == "single_object"
    assert S.parse("a circle and a square").category == "two_object"
    assert S.parse("three triangles") == S.Spec("counting", (S.Phrase("triangle", None, 3),))
    assert S.parse("a blue square").category == "colors"
    spec = S.parse("a circle left of a square")
    assert spec.category == "position" and spec.relation == "left of"
    assert S.parse("a red square and a blue circle").category == "color_attr"
    with pytest.raises(ValueError, match="cannot parse"):
        S.parse("a purple hexagon")


def test_scorer_right_on_ground_truth():
    """Every category, 2,400 renders: all clauses met."""
    rng = random.Random(0)
    by_cat = S.all_prompts()
    prompts = [rng.choice(by_cat[c]) for c in S.CATEGORIES for _ in range(400)]
    images = torch.stack([S.render_prompt(p, rng) for p in prompts])
    partial, strict, cats = S.score(images, prompts)
    per_cat = defaultdict(list)
    for s, c in zip(strict.tolist(), cats):
        per_cat[c].append(s)
    assert {c: sum(v) / len(v) for c, v in per_cat.items()} == {c: 1.0 for c in S.CATEGORIES}
    assert partial.min() == 1.0


def _render(objs, cells, seed=0):
    return S.render(objs, cells, random.Random(seed))


@pytest.mark.parametrize("prompt,good,bad", [
    ("a red circle", ([("circle", "red")], [(0, 0)]), ([("circle", "blue")], [(0, 0)])),  # wrong colour
    ("three squares", ([("square", "green")] * 3, [(0, 0), (0, 1), (1, 0)]),
     ([("square", "green")] * 2, [(0, 0), (0, 1)])),  # wrong count
    ("a circle left of a triangle", ([("circle", "red"), ("triangle", "blue")], [(0, 0), (1, 1)]),
     ([("circle", "red"), ("triangle", "blue")], [(0, 1), (1, 0)])),  # wrong position
    ("a triangle above a square", ([("triangle", "red"), ("square", "blue")], [(0, 0), (1, 0)]),
     ([("triangle", "red"), ("square", "blue")], [(1, 0), (0, 0)])),
    ("a red square and a blue circle", ([("square", "red"), ("circle", "blue")], [(0, 0), (1, 1)]),
     ([("square", "blue"), ("circle", "red")], [(0, 0), (1, 1)])),  # swapped attributes
    ("a square and a circle", ([("square", "red"), ("circle", "blue")], [(0, 0), (1, 1)]),
     ([("square", "red"), ("triangle", "blue")], [(0, 0), (1, 1)])),  # wrong object
    ("a circle", ([("circle", "yellow")], [(1, 1)]),
     ([("circle", "yellow"), ("square", "red")], [(1, 1), (0, 0)])),  # something else in the picture
])
def test_scorer_ranks_wrong_images_lower(prompt, good, bad):
    for seed in range(5):
        imgs = torch.stack([_render(*good, seed), _render(*bad, seed)])
        partial, strict, _ = S.score(imgs, [prompt, prompt])
        assert strict.tolist() == [1.0, 0.0]
        assert partial[0] == 1.0 and partial[1] < 1.0


def test_noise_and_blank_images_score_zero_strict():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 3, S.RES, S.RES, generator=g)
    blank = torch.tensor(S.BACKGROUND).view(1, 3, 1, 1).expand(64, 3, S.RES, S.RES)
    prompts = S.prompt_split("train")[:64]
    for imgs in (noise, blank):
        partial, strict, _ = S.score(imgs, prompts)
        assert strict.sum() == 0 and partial.mean() < 0.05
