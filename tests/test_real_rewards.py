"""The real-model rewards on tiny random models built here (nothing is downloaded), plus the pure parts
(OCR edit distance and quotes, GenEval parsing and clause checking) against hand-computed cases."""

import json
import math

import pytest
import torch

import rewards as R

WORDS = ["a photo of a red car", "a dog left of a cat", "a sign that says OPEN LATE", "three people",
         "a blue cup and a green tv", "HELLO WORLD 123", "a teddy bear"]


def _tokenizer(max_length):
    from shapes import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, 400, max_length)


def _preprocessor(path, **cfg):
    (path / "preprocessor_config.json").write_text(json.dumps(cfg))


CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("tiny_clip")
    tok = _tokenizer(16)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    _preprocessor(path, image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"shortest_edge": 32},
                  crop_size={"height": 32, "width": 32})
    mlp = R.AestheticMLP(24)
    torch.save(mlp.state_dict(), path / "aesthetic.pth")
    return path


@pytest.fixture
def clip_env(tiny_clip_dir, monkeypatch):
    for key in ("pickscore", "pickscore_processor", "clipscore", "aesthetic_clip"):
        monkeypatch.setenv(f"CLEANFLOWRL_MODEL_{key.upper()}", str(tiny_clip_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", str(tiny_clip_dir / "aesthetic.pth"))
    return tiny_clip_dir


def _images(n, size=48, width=None, seed=0):
    return torch.rand(n, 3, size, width or size + 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic"])
def test_clip_rewards_on_tiny_model(clip_env, name, monkeypatch):
    monkeypatch.setattr(R, "BATCH_SIZE", 2)  # three chunks
    images = _images(5)
    prompts = ["a photo of a red car", "three people", "a teddy bear", "a dog left of a cat", "HELLO"]
    scores, info = R.REWARDS[name](images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert info == {}
    assert scores.std() > 0  # different images, different scores
    again, _ = R.REWARDS[name](images[:1], prompts[:1])  # cached model, batch-independent
    assert torch.allclose(again, scores[:1], atol=1e-5)


def test_pickscore_is_scaled_clip_cosine(clip_env):
    """PickScore = logit_scale * cosine / 26 and CLIPScore = the cosine, on the same CLIP model; the cosine
    recomputed here with a hand-written preprocessing (bicubic short side 32, centre crop, normalise)."""
    from transformers import AutoTokenizer, CLIPModel

    images, prompts = _images(2, size=32, width=32), ["a photo of a red car", "three people"]
    pick, _ = R.REWARDS["pickscore"](images, prompts)
    clip, _ = R.REWARDS["clipscore"](images, prompts)
    model = CLIPModel.from_pretrained(clip_env).eval()
    tok = AutoTokenizer.from_pretrained(clip_env)
    x = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    t = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = R._embeds(model.get_image_features(pixel_values=x))
        txt = R._embeds(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert torch.allclose(clip, cos, atol=1e-5)
    assert torch.allclose(pick, model.logit_scale.exp() * cos / 26, atol=1e-5)


def test_aesthetic_is_the_mlp_on_normalised_embeddings(clip_env):
    from transformers import CLIPModel

    images = _images(3, size=32, width=32)
    scores, _ = R.REWARDS["aesthetic"](images, ["", "", ""])
    model = CLIPModel.from_pretrained(clip_env).eval()
    mlp = R.AestheticMLP(24)
    mlp.load_state_dict(torch.load(clip_env / "aesthetic.pth"))
    x = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = R._embeds(model.get_image_features(pixel_values=x))
        want = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(scores, want, atol=1e-5)


def test_weighted_sum_of_real_rewards(clip_env):
    images, prompts = _images(3), ["a photo of a red car", "three people", "a teddy bear"]
    total, info = R.make_reward("pickscore:1,clipscore:0.5")(images, prompts)
    p, _ = R.REWARDS["pickscore"](images, prompts)
    c, _ = R.REWARDS["clipscore"](images, prompts)
    assert torch.allclose(total, p + 0.5 * c) and torch.equal(info["pickscore"], p)


def test_missing_weights_error_names_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/no-such-model")
    with pytest.raises(R.RewardModelUnavailable, match=r"'cleanflowrl-test/no-such-model'.*HF_HUB_OFFLINE.*"
                       r"hf download cleanflowrl-test/no-such-model.*huggingface-cli.*CLEANFLOWRL_MODEL_CLIPSCORE"):
        R.REWARDS["clipscore"](_images(1), ["a dog"])
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_CLIP", str(tmp_path))  # an empty folder: no config
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", "cleanflowrl-test/mlp/model.pth")
    with pytest.raises(R.RewardModelUnavailable, match="hf download cleanflowrl-test/mlp model.pth"):
        R.REWARDS["aesthetic"](_images(1), [""])


def test_hpsv2_and_imagereward_say_what_they_need():
    for name, what in (("hpsv2", "open_clip"), ("imagereward", "image-reward")):
        with pytest.raises(R.RewardModelUnavailable, match=what):
            R.REWARDS[name](_images(1), ["a dog"])


# ----------------------------------------------------------------------------------------------
# OCR
# ----------------------------------------------------------------------------------------------
def test_levenshtein_and_ocr_score_by_hand():
    assert R.levenshtein("kitten", "sitting") == 3
    assert R.levenshtein("", "abc") == 3 and R.levenshtein("abc", "") == 3 and R.levenshtein("abc", "abc") == 0
    assert R.levenshtein("flaw", "lawn") == 2
    assert R.ocr_score("Hello", "HELLO") == 1.0
    assert R.ocr_score("OPEN  late", "open late") == 1.0  # spaces ignored, case-insensitive
    assert R.ocr_score("HELO", "HELLO") == pytest.approx(0.8)  # one deletion over 5 characters
    assert R.ocr_score("", "HELLO") == 0.0
    assert R.ocr_score("a much longer recognised text", "HI") == 0.0  # distance clipped at len(target)
    assert R.ocr_score("JELLO", "HELLO") == pytest.approx(0.8)


def test_quoted_text():
    assert R.quoted_text('a storefront sign that says "OPEN LATE"') == "OPEN LATE"
    assert R.quoted_text('a mug with "BEST" and "DAD" on it') == "BEST DAD"
    assert R.quoted_text("a poster reading \u201cHELLO\u201d") == "HELLO"
    for bad in ("a sign that says hello", 'an empty sign ""'):
        with pytest.raises(ValueError, match="double quotes"):
            R.quoted_text(bad)


@pytest.fixture(scope="module")
def tiny_ocr_dir(tmp_path_factory):
    from transformers import (TrOCRConfig, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    path = tmp_path_factory.mktemp("tiny_ocr")
    tok = _tokenizer(32)
    torch.manual_seed(0)
    enc = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=32, patch_size=8)
    dec = TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=1, decoder_attention_heads=2,
                      decoder_ffn_dim=64, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      decoder_start_token_id=tok.bos_token_id)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
    model = VisionEncoderDecoderModel(cfg)
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _preprocessor(path, image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 32, "width": 32})
    return path


def test_ocr_on_tiny_model(tiny_ocr_dir, monkeypatch):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    monkeypatch.setattr(R, "BATCH_SIZE", 2)
    prompts = ['a sign that says "OPEN LATE"', 'a mug with "HELLO"', 'a poster reading "123"']
    scores, info = R.REWARDS["ocr"](_images(3), prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert set(info) == {"ocr/exact"} and info["ocr/exact"].shape == (3,)
    with pytest.raises(ValueError, match="double quotes"):
        R.REWARDS["ocr"](_images(1), ["a sign without quotes"])


def test_ocr_scores_what_the_recogniser_reads(tiny_ocr_dir, monkeypatch):
    """Plug a recogniser whose output we know: the score is ocr_score(text, quoted target)."""
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    R.REWARDS["ocr"](_images(1), ['"x"'])  # load and cache
    key = next(k for k in R._MODELS if k[0] == "ocr")
    model, tok, pre = R._MODELS[key]

    class Reader:
        def batch_decode(self, ids, skip_special_tokens):
            return ["open lat", "HELLO"][: len(ids)]

    monkeypatch.setitem(R._MODELS, key, (model, Reader(), pre))
    scores, info = R.REWARDS["ocr"](_images(2), ['a sign that says "OPEN LATE"', 'a mug with "HELLO"'])
    assert scores.tolist() == pytest.approx([1 - 1 / 8, 1.0]) and info["ocr/exact"].tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------
# GenEval
# ----------------------------------------------------------------------------------------------
def test_parse_geneval_categories():
    P = R.parse_geneval
    assert P("a photo of a bench") == R.GenevalSpec("single_object", (R.ObjectPhrase("bench", None, None),))
    assert P("a photo of an orange") == R.GenevalSpec("single_object", (R.ObjectPhrase("orange", None, None),))
    assert P("a photo of an orange car").phrases == (R.ObjectPhrase("car", "orange", None),)
    assert P("a photo of three people") == R.GenevalSpec("counting", (R.ObjectPhrase("person", None, 3),))
    assert P("two wine glasses.").phrases == (R.ObjectPhrase("wine glass", None, 2),)
    assert P("a photo of a dog and a teddy bear").category == "two_object"
    assert P("a photo of a red tv remote and a blue dog") == R.GenevalSpec(
        "color_attr", (R.ObjectPhrase("tv remote", "red", None), R.ObjectPhrase("dog", "blue", None)))
    assert P("a photo of a red car and a dog").category == "two_object"
    assert P("a photo of a dog right of a fire hydrant") == R.GenevalSpec(
        "position", (R.ObjectPhrase("dog", None, None), R.ObjectPhrase("fire hydrant", None, None)), "right of")
    assert P("a photo of a purple cup").category == "colors"
    for bad in ("a photo of a unicorn", "a dog and a cat and a cow", 'a sign that says "HI"'):
        with pytest.raises(ValueError):
            P(bad)


def _box(label, cx, cy, color=None, s=10):
    return R.Box(label, 0.9, cx - s, cy - s, cx + s, cy + s, color)


def test_geneval_clauses_by_hand():
    C, P = R.geneval_clauses, R.parse_geneval
    dog, cat = _box("dog", 30, 50, "brown"), _box("cat", 70, 50, "black")
    assert C(P("a dog"), [dog], 100, 100) == [True]
    assert C(P("a dog"), [cat], 100, 100) == [False]
    assert C(P("a dog and a cat"), [cat], 100, 100) == [False, True]
    assert C(P("a dog left of a cat"), [dog, cat], 100, 100) == [True, True, True]
    assert C(P("a dog right of a cat"), [dog, cat], 100, 100) == [True, True, False]
    assert C(P("a dog above a cat"), [dog, cat], 100, 100) == [True, True, False]  # same height
    assert C(P("a dog below a cat"), [dog, _box("cat", 30, 20)], 100, 100) == [True, True, True]
    assert C(P("a dog left of a cat"), [dog, _box("cat", 33, 80)], 100, 100)[-1] is False  # within the margin
    assert C(P("a brown dog"), [dog], 100, 100) == [True, True]
    assert C(P("a white dog"), [dog], 100, 100) == [True, False]
    assert C(P("a white dog"), [cat], 100, 100) == [False, False]
    assert C(P("a black dog and a brown cat"), [dog, cat], 100, 100) == [False, False]
    assert C(P("a brown dog and a black cat"), [dog, cat], 100, 100) == [True, True]
    three = [_box("dog", 20 * i + 10, 50) for i in range(3)]
    assert C(P("three dogs"), three, 100, 100) == [True, True]
    assert C(P("two dogs"), three, 100, 100) == [True, False]
    assert C(P("four dogs"), [cat], 100, 100) == [False, False]


def test_box_color():
    img = torch.ones(3, 40, 40) * torch.tensor([0.92, 0.92, 0.92]).view(3, 1, 1)
    img[:, 10:30, 10:30] = torch.tensor([0.1, 0.3, 0.9]).view(3, 1, 1)
    assert R.box_color(img, 5, 5, 35, 35) == "blue"  # the central half is all object
    img[:, 10:30, 10:30] = torch.tensor([0.95, 0.6, 0.1]).view(3, 1, 1)
    assert R.box_color(img, 8, 8, 32, 32) == "orange"
    assert R.box_color(img, 0, 0, 8, 8) == "white"


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    assert R._nms(boxes, torch.tensor([0.5, 0.9, 0.4]), 0.5) == [1, 2]


@pytest.fixture(scope="module")
def tiny_owl_dir(tmp_path_factory):
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    path = tmp_path_factory.mktemp("tiny_owlv2")
    tok = _tokenizer(16)
    torch.manual_seed(0)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    Owlv2ForObjectDetection(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    _preprocessor(path, image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"height": 32, "width": 32})
    return path


def test_geneval_on_tiny_detector(tiny_owl_dir, monkeypatch):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))
    monkeypatch.setattr(R, "GENEVAL_THRESHOLD", 0.0)  # a random detector: keep every box, exercise the checks
    monkeypatch.setattr(R, "BATCH_SIZE", 2)
    prompts = ["a photo of a dog", "a photo of three cats", "a photo of a red car and a blue cup",
               "a photo of a dog left of a teddy bear", "a photo of a green bench"]
    images = _images(5)
    boxes = R.detect_objects(images, [[ph.name for ph in R.parse_geneval(p).phrases] for p in prompts])
    assert len(boxes) == 5 and all(boxes)
    assert {b.label for b in boxes[2]} <= {"car", "cup"} and {b.label for b in boxes[3]} == {"dog", "teddy bear"}
    assert all(b.color in R._COLOR_ANCHORS for bs in boxes for b in bs)
    scores, info = R.REWARDS["geneval"](images, prompts)
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 1)).all()
    assert scores[0] == 1.0  # threshold 0: some dog box is always found
    assert info["strict"].shape == (5,) and set(info) == {"strict", *(f"strict/{c}" for c in R.GENEVAL_CATEGORIES)}
    assert info["strict/counting"][1] in (0.0, 1.0) and math.isnan(info["strict/counting"][0])
    monkeypatch.setattr(R, "GENEVAL_THRESHOLD", 1.0)  # nothing passes: no clause met
    scores, info = R.REWARDS["geneval"](images, prompts)
    assert scores.tolist() == [0.0] * 5 and info["strict"].sum() == 0


# ----------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------
def test_prompt_files_are_reproducible_disjoint_and_parse(tmp_path):
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    from common import load_prompts

    folder = Path(__file__).resolve().parent.parent / "prompts"
    subprocess.run([sys.executable, str(folder / "make_prompts.py"), str(tmp_path)], check=True, capture_output=True)
    names = ["geneval_train.txt", "geneval_test.txt", "ocr_train.txt", "ocr_test.txt", "general.txt"]
    for name in names:  # the shipped files are what the script writes
        assert (tmp_path / name).read_text() == (folder / name).read_text(), name
    p = {n: load_prompts(str(folder / n), "train") for n in names}
    assert all(len(set(v)) == len(v) for v in p.values())  # no duplicates
    assert not set(p["geneval_train.txt"]) & set(p["geneval_test.txt"])
    for split in ("geneval_train.txt", "geneval_test.txt"):
        cats = Counter(R.parse_geneval(x).category for x in p[split])
        assert set(cats) == set(R.GENEVAL_CATEGORIES), (split, cats)
    tr = {R.quoted_text(x) for x in p["ocr_train.txt"]}
    te = {R.quoted_text(x) for x in p["ocr_test.txt"]}
    assert not tr & te and len(te) >= 20  # the test split renders texts never seen in training
    assert len(p["general.txt"]) >= 300 and not any('"' in x for x in p["general.txt"])


def test_geneval_post_processing_with_a_known_detector(tiny_owl_dir, monkeypatch):
    """A stand-in detector with known outputs: boxes (cx, cy, w, h relative to the grey-padded square)
    become pixel boxes, low scores and overlapping duplicates are dropped, colours come from the pixels."""
    from types import SimpleNamespace

    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))
    img = torch.full((1, 3, 40, 60), 0.92)  # 40 high, 60 wide: padded to 60 x 60
    img[0, :, 5:25, 10:30] = torch.tensor([0.1, 0.3, 0.9]).view(3, 1, 1)  # a blue object
    img[0, :, 10:30, 40:56] = torch.tensor([0.85, 0.1, 0.1]).view(3, 1, 1)  # a red one
    R.detect_objects(img, [["car"]])  # load and cache the tiny model, then swap in the stand-in
    key = next(k for k in R._MODELS if k[0] == "geneval")
    model, tok, pre = R._MODELS[key]
    s = 60.0
    boxes = torch.tensor([[20 / s, 15 / s, 20 / s, 20 / s],  # cup, the blue object
                          [21 / s, 15 / s, 20 / s, 20 / s],  # a weaker duplicate of it
                          [48 / s, 20 / s, 16 / s, 20 / s],  # car, the red object
                          [48 / s, 20 / s, 16 / s, 20 / s]])  # below the threshold for both
    logits = torch.tensor([[5.0, -9], [2.0, -9], [-9, 4.0], [-3, -3]])  # columns: sorted vocab (car, cup)
    logits = logits[:, [1, 0]]

    class Detector:
        config = model.config

        def __call__(self, input_ids, attention_mask, pixel_values):
            b = len(pixel_values)
            assert pixel_values.shape[-2:] == (32, 32) and input_ids.shape[0] == 2 * b  # two queries an image
            return SimpleNamespace(logits=logits.expand(b, -1, -1), pred_boxes=boxes.expand(b, -1, -1))

    monkeypatch.setitem(R._MODELS, key, (Detector(), tok, pre))
    (found,) = R.detect_objects(img, [["cup", "car"]])
    assert [(b.label, b.color) for b in found] == [("car", "red"), ("cup", "blue")]
    car, cup = found
    assert (cup.x0, cup.y0, cup.x1, cup.y1) == pytest.approx((10, 5, 30, 25), abs=1e-4)
    assert (car.x0, car.y0, car.x1, car.y1) == pytest.approx((40, 10, 56, 30), abs=1e-4)
    assert cup.score == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    prompts = ["a photo of a blue cup left of a car", "a photo of a blue cup right of a car",
               "a photo of a red cup and a red car", "a photo of two cups", "a photo of a cup"]
    scores, info = R.REWARDS["geneval"](img.expand(5, -1, -1, -1), prompts)
    assert scores.tolist() == pytest.approx([1, 2 / 3, 1 / 2, 1 / 2, 1])
    assert info["strict"].tolist() == [1, 0, 0, 0, 1]
