"""The geneval reward: GenEval's evaluator (Mask2Former detections, CLIP colours, box positions) with
Flow-GRPO's partial credit. The judging rules on synthetic detections against hand-computed answers; the
detector's post-processing on a stand-in model with known outputs; the real architectures (a Mask2Former
with a tiny Swin backbone, a tiny CLIP) saved in transformers' layout and loaded through the reward's own
code; the up-front check; one training iteration of flow_grpo.py and awm.py."""

import json

import pytest
import torch

import rewards as R

D = R.Detection
COCO = {i: n for i, n in enumerate(R.GENEVAL_OBJECTS)}
CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]


def _tiny_clip(path):
    """A CLIP with tiny towers whose tokenizer knows GenEval's colour prompts."""
    from transformers import CLIPConfig, CLIPModel

    from shapes import build_clip_tokenizer

    words = [f"a photo of a {c}-colored {n} object" for c in R.GENEVAL_COLORS for n in ("dog", "car", "cup")]
    tok = build_clip_tokenizer(words, 300, 16)
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
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_mean=CLIP_MEAN, image_std=CLIP_STD, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})))
    return path


def _tiny_mask2former(path):
    """Mask2Former for COCO instances (80 labels, GenEval's names) with a one-block-per-stage Swin, 32 channels
    and 8 queries, saved as the hub checkpoint is (config.json, model.safetensors, preprocessor_config.json
    with the ImageNet statistics its image processor uses)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, num_queries=8, num_labels=80, id2label=COCO)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], size={"height": 384, "width": 384},
        size_divisor=32, num_labels=80)))
    return path


@pytest.fixture(scope="session")
def tiny_geneval_dirs(tmp_path_factory):
    """(Mask2Former folder, CLIP folder): tiny random models of the two the geneval reward loads."""
    root = tmp_path_factory.mktemp("tiny_geneval")
    (root / "mask2former").mkdir()
    (root / "clip").mkdir()
    return _tiny_mask2former(root / "mask2former"), _tiny_clip(root / "clip")


@pytest.fixture
def geneval_env(tiny_geneval_dirs, monkeypatch):
    m2f, clip = tiny_geneval_dirs
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(m2f))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL_CLIP", str(clip))
    monkeypatch.setattr(R, "GENEVAL_TEST_SCALE", (64, 64))  # a tiny model need not see 800 px (one test does)
    return m2f, clip


# ----------------------------------------------------------------------------------------------
# Prompt -> GenEval metadata
# ----------------------------------------------------------------------------------------------
# Lines of GenEval's prompts/evaluation_metadata.jsonl (its own prompts, with its plurals "persons", "knifes")
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "handbag", "count": 1}], "prompt": "a photo of a handbag"},
    {"tag": "two_object", "include": [{"class": "tie", "count": 1}, {"class": "broccoli", "count": 1}],
     "prompt": "a photo of a tie and a broccoli"},
    {"tag": "counting", "include": [{"class": "person", "count": 3}], "exclude": [{"class": "person", "count": 4}],
     "prompt": "a photo of three persons"},
    {"tag": "counting", "include": [{"class": "knife", "count": 4}], "exclude": [{"class": "knife", "count": 5}],
     "prompt": "a photo of four knifes"},
    {"tag": "colors", "include": [{"class": "clock", "count": 1, "color": "green"}], "prompt": "a photo of a green clock"},
    {"tag": "position", "include": [{"class": "skateboard", "count": 1}, {"class": "bird", "count": 1,
                                    "position": ["below", 0]}], "prompt": "a photo of a bird below a skateboard"},
    {"tag": "position", "include": [{"class": "horse", "count": 1}, {"class": "vase", "count": 1,
                                    "position": ["right of", 0]}], "prompt": "a photo of a vase right of a horse"},
    {"tag": "color_attr", "include": [{"class": "tennis racket", "count": 1, "color": "purple"},
                                      {"class": "sink", "count": 1, "color": "black"}],
     "prompt": "a photo of a purple tennis racket and a black sink"},
]


@pytest.mark.parametrize("line", GENEVAL_LINES, ids=lambda x: x["prompt"])
def test_metadata_is_genevals(line):
    want = {k: v for k, v in line.items() if k != "prompt"}
    assert R.geneval_metadata(R.parse_geneval(line["prompt"])) == want
    assert R.parse_geneval("a photo of two people").phrases == (R.ObjectPhrase("person", None, 2),)  # English too


# ----------------------------------------------------------------------------------------------
# The judging rules on synthetic detections
# ----------------------------------------------------------------------------------------------
def _det(cx, cy, half=5, score=0.9):
    return D((cx - half, cy - half, cx + half, cy + half), score)


def test_relative_position_by_hand():
    rel = R.relative_position
    a = D((0, 0, 10, 10), 1)
    # offset (-20, 0), boxes 10 + 10 wide: |offset| shrinks by 0.1 * 20 = 2 -> (-18, 0) / 20 -> dx = -0.9
    assert rel(a, D((20, 0, 30, 10), 1)) == {"left of"} and rel(D((20, 0, 30, 10), 1), a) == {"right of"}
    assert rel(a, D((2, 0, 12, 10), 1)) == set()  # offset 2 shrinks to 0: no relation
    # offset (-10, -10) -> (-8, -8) / 14.14: both components -0.566, beyond -0.5
    assert rel(a, D((10, 10, 20, 20), 1)) == {"left of", "above"}
    # offset (-10, -20) -> (-8, -18) / 22.36 = (-0.36, -0.80): above only
    assert rel(a, D((10, 20, 20, 30), 1)) == {"above"}
    assert rel(D((0, 30, 10, 40), 1), a) == {"below"}


def test_select_detections_threshold_order_cap_and_overlap(monkeypatch):
    dets = [D((0, 0, 9, 9), s) for s in (0.3, 0.31, 0.95, 0.5)]
    assert [d.score for d in R.select_detections(dets, 0.3)] == [0.95, 0.5, 0.31]  # strictly above, best first
    assert [d.score for d in R.select_detections(dets, 0.9)] == [0.95]  # the counting threshold
    many = [D((i, 0, i + 9, 9), 0.5 + i / 100) for i in range(20)]
    assert len(R.select_detections(many, 0.3)) == 16  # GenEval keeps at most 16 of a class
    # GenEval's default max_overlap 1.0 keeps even identical boxes; with 0.3 the (0, 0, 9, 9) / (5, 0, 14, 9)
    # pair (inclusive pixels: 50 shared of 150, IoU 1/3) drops the weaker, while IoU 0 pairs stay
    pair = [D((0, 0, 9, 9), 0.9), D((5, 0, 14, 9), 0.8), D((20, 0, 29, 9), 0.7)]
    assert R._inclusive_iou(pair[0].box, pair[1].box) == pytest.approx(1 / 3)
    assert len(R.select_detections(pair, 0.3)) == 3
    monkeypatch.setattr(R, "GENEVAL_MAX_OVERLAP", 0.3)
    assert [d.score for d in R.select_detections(pair, 0.3)] == [0.9, 0.7]


def _judge(prompt, objects, colors=None):
    """(GenEval's verdict, Flow-GRPO's partial score) for synthetic detections; colors: {class: [colour of
    each detection, best first]}."""
    meta = R.geneval_metadata(R.parse_geneval(prompt))
    asked = []

    def color_fn(classname, dets):
        asked.append((classname, len(dets)))
        return (colors or {})[classname][:len(dets)]

    return R.geneval_correct(meta, objects, color_fn), R.geneval_partial(meta, objects, color_fn)


def test_counting_and_presence_by_hand():
    dogs = [_det(10 * i, 0) for i in range(7)]
    assert _judge("a photo of three dogs", {"dog": dogs[:3]}) == (True, 1.0)
    assert _judge("a photo of three dogs", {"dog": dogs[:4]}) == (False, pytest.approx(2 / 3))  # exclude: < 4
    assert _judge("a photo of three dogs", {"dog": dogs[:2]}) == (False, pytest.approx(2 / 3))
    assert _judge("a photo of three dogs", {"dog": dogs}) == (False, pytest.approx(1 - 4 / 3))  # negative
    assert _judge("a photo of three dogs", {}) == (False, 0.0)
    # "a dog" asks for at least one (GenEval) but exactly one earns Flow-GRPO's credit
    assert _judge("a photo of a dog", {"dog": dogs[:2]}) == (True, 0.0)
    assert _judge("a photo of a dog and a cat", {"dog": dogs[:1]}) == (False, 0.5)


def test_colors_by_hand():
    car = [_det(10, 10)]
    assert _judge("a photo of a red car", {"car": car}, {"car": ["red"]}) == (True, 1.0)
    assert _judge("a photo of a red car", {"car": car}, {"car": ["blue"]}) == (False, 0.5)  # (1 + 0) / 2
    two = [_det(10, 10), _det(40, 10)]
    # GenEval judges the best car only; Flow-GRPO's found != count gives (0 + 0) / 2
    assert _judge("a photo of a red car", {"car": two}, {"car": ["red", "blue"]}) == (True, 0.0)
    assert _judge("a photo of a red car", {}, {"car": []}) == (False, 0.0)
    assert _judge("a photo of a red car and a blue cup", {"car": car, "cup": [_det(40, 10)]},
                  {"car": ["red"], "cup": ["green"]}) == (False, 0.75)  # (1 + 1 + 1 + 0) / 4


def test_position_by_hand():
    dog_left, cat, dog_right = _det(10, 50), _det(60, 50), _det(110, 50)
    assert _judge("a photo of a dog left of a cat", {"dog": [dog_left], "cat": [cat]}) == (True, 1.0)
    # a wrong position: the reference appends 0 and then 1 -> (1 + 1 + 0 + 1) / 4
    assert _judge("a photo of a dog left of a cat", {"dog": [dog_right], "cat": [cat]}) == (False, 0.75)
    # no cat: the dog's position has no target -> (0 + 1 + 0) / 3
    assert _judge("a photo of a dog left of a cat", {"dog": [dog_left]}) == (False, pytest.approx(1 / 3))
    # two cats: GenEval takes the best cat; Flow-GRPO's cat clause does not match -> (0 + 1 + 0) / 3
    assert _judge("a photo of a dog left of a cat", {"dog": [dog_left], "cat": [cat, dog_right]}) == (
        True, pytest.approx(1 / 3))
    # too close: offsets within 10% of the boxes' sizes are no relation
    assert _judge("a photo of a dog left of a cat", {"dog": [_det(59, 50)], "cat": [cat]})[0] is False


# ----------------------------------------------------------------------------------------------
# Detector post-processing (mmdet's Mask2Former instance inference) on known logits
# ----------------------------------------------------------------------------------------------
def test_mask_boxes_and_instance_scores():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 5, 7] = True
    assert R.mask_boxes(masks).tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 0, 0]]  # x1, y1 exclusive
    logits = torch.full((2, 4, 4), -3.0)
    logits[0, :2, :2] = 2.0  # 4 pixels at sigmoid(2)
    masks, scores = R.instance_masks(logits, torch.tensor([0.8, 0.9]))
    assert masks[0].sum() == 4 and masks[1].sum() == 0
    assert scores.tolist() == pytest.approx([0.8 * torch.sigmoid(torch.tensor(2.0)).item(), 0.0], abs=1e-5)
    cls = torch.full((3, 81), -10.0)
    cls[0, 16], cls[1, 17], cls[2, 80] = 5.0, 3.0, 9.0  # dog, horse, "no object"
    probs, labels, queries = R.top_instances(cls, max_per_image=2)
    assert labels.tolist() == [16, 17] and queries.tolist() == [0, 1]
    assert probs[0] == pytest.approx(torch.softmax(cls[0], -1)[16].item())


class _Stand_in:
    """A Mask2Former stand-in: fixed class logits, and square masks given in image pixels, written at the
    model's 1/4 resolution of the padded input."""

    def __init__(self, config, objects, size):
        self.config, self.objects, self.size = config, objects, size  # objects: [(label, prob logit, box)]

    def __call__(self, pixel_values):
        from types import SimpleNamespace

        b, _, ph, pw = pixel_values.shape
        q = len(self.objects)
        cls = torch.full((b, q, 81), -20.0)
        masks = torch.full((b, q, ph // 4, pw // 4), -100.0)
        s = ph / self.size / 4  # image pixel -> mask cell
        for i, (label, logit, (x0, y0, x1, y1)) in enumerate(self.objects):
            cls[:, i, label], cls[:, i, 80] = logit, 0.0
            masks[:, i, round(y0 * s):round(y1 * s), round(x0 * s):round(x1 * s)] = 100.0
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)


def test_detect_with_known_outputs(geneval_env, monkeypatch):
    """Three dogs (class probabilities 0.95, 0.88 and 0.5 against "no object") and a cat: a counting prompt
    keeps the one above 0.9, the others the three above 0.3; boxes come back in image pixels."""
    img = torch.rand(1, 3, 32, 32)
    R.geneval_detect(img, [{"dog"}], [0.3])  # load and cache the tiny model
    key = ("geneval", tuple(R.model_id(k) for k in R.model_keys("geneval")), "cpu")
    model, mean, std = R._MODELS[key]
    logit = lambda p: torch.logit(torch.tensor(p)).item()  # noqa: E731 (vs a "no object" logit of 0)
    objects = [(16, logit(0.95), (0, 0, 8, 8)), (16, logit(0.88), (16, 0, 32, 8)), (16, logit(0.5), (0, 16, 8, 32)),
               (15, logit(0.99), (16, 16, 32, 32))]
    monkeypatch.setitem(R._MODELS, key, (_Stand_in(model.config, objects, 32), mean, std))
    (counting,) = R.geneval_detect(img, [{"dog"}], [R.GENEVAL_COUNTING_THRESHOLD])
    assert list(counting) == ["dog"] and len(counting["dog"]) == 1
    (found,) = R.geneval_detect(img, [{"dog", "cat"}], [R.GENEVAL_THRESHOLD])
    assert [round(d.score, 2) for d in found["dog"]] == [0.95, 0.88, 0.5] and len(found["cat"]) == 1
    best = found["dog"][0]
    assert best.box == pytest.approx((0, 0, 8, 8), abs=1) and best.mask.shape == (32, 32)
    assert found["cat"][0].box == pytest.approx((16, 16, 32, 32), abs=1)
    (only_cat,) = R.geneval_detect(img, [{"cat"}], [0.3])  # classes the prompt does not name are not kept
    assert list(only_cat) == ["cat"]


def test_the_colour_crop_is_the_masked_object_on_grey(geneval_env, monkeypatch):
    """The crop CLIP sees: the image inside the mask, #999 outside, cut to the box (checked through a
    recording stand-in for the CLIP preprocessing)."""
    img = torch.zeros(3, 16, 16)
    img[0] = 1.0  # a red image
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 2:6] = True
    mask[4, 9] = True  # the box spans x 2..10
    seen = []
    R.geneval_colors(img, "car", [D((2, 4, 10, 8), 0.9, mask)])  # load and cache the tiny CLIP
    key = ("geneval_clip", (R.model_id("geneval_clip"),), "cpu")
    model, tok, pre, classifiers = R._MODELS[key]
    monkeypatch.setitem(R._MODELS, key, (model, tok, lambda x: seen.append(x) or pre(x), classifiers))
    (color,) = R.geneval_colors(img, "car", [D((2, 4, 10, 8), 0.9, mask)])
    assert color in R.GENEVAL_COLORS
    (crop,) = seen
    assert crop.shape == (1, 3, 4, 8)
    assert torch.equal(crop[0, :, :, :4], img[:, 4:8, 2:6])  # the object
    assert torch.allclose(crop[0, :, 1:, 5], torch.full((3, 3), 0x99 / 255))  # grey outside the mask
    assert torch.equal(crop[0, :, 0, 7], img[:, 4, 9])


def test_geneval_reward_on_the_stand_in(geneval_env, monkeypatch):
    """The reward end to end on known detections: a sure dog top left, a doubtful one (0.5) bottom left, a sure
    cat bottom right; every colour "red". The doubtful dog counts (> 0.3) except for a counting prompt (> 0.9)."""
    img = torch.rand(4, 3, 32, 32)
    R.geneval_detect(img[:1], [{"dog"}], [0.3])
    key = ("geneval", tuple(R.model_id(k) for k in R.model_keys("geneval")), "cpu")
    model, mean, std = R._MODELS[key]
    objects = [(16, 5.0, (0, 0, 8, 8)), (16, 0.0, (0, 16, 8, 32)), (15, 5.0, (16, 16, 32, 32))]
    monkeypatch.setitem(R._MODELS, key, (_Stand_in(model.config, objects, 32), mean, std))
    monkeypatch.setattr(R, "geneval_colors", lambda image, classname, dets: ["red"] * len(dets))
    prompts = ["a photo of a dog left of a cat", "a photo of a red dog and a blue cat", "a photo of two dogs",
               "a photo of a cat"]
    scores, info = R.REWARDS["geneval"](img, prompts)
    # cat 1, dog 1 - |1 - 2| = 0, position 0 (two dogs: no match) | dogs 0 + colour 0, cat 1 + blue 0 |
    # two dogs asked, one above 0.9: 1 - 1/2 | the cat
    assert scores.tolist() == pytest.approx([1 / 3, 1 / 4, 1 / 2, 1.0])
    assert info["strict"].tolist() == [1.0, 0.0, 0.0, 1.0]  # GenEval: the best dog is left of the cat
    assert set(info) == {"strict", *(f"strict/{c}" for c in R.GENEVAL_CATEGORIES)}
    assert info["strict/position"][0] == 1.0 and torch.isnan(info["strict/position"][1:]).all()


# ----------------------------------------------------------------------------------------------
# The real architectures, tiny, through the reward's own loading code
# ----------------------------------------------------------------------------------------------
def test_geneval_on_tiny_models_at_the_evaluators_scale(geneval_env, monkeypatch):
    """The tiny Mask2Former and CLIP load from their folders and score at GenEval's test scale (a 40 x 48
    image resized to 800 x 960, padded to 800 x 960); with the thresholds at 0 the random detector finds
    objects, so colours and positions are exercised; the models are frozen and the scores detached."""
    monkeypatch.setattr(R, "GENEVAL_TEST_SCALE", (1333, 800))
    monkeypatch.setattr(R, "GENEVAL_THRESHOLD", 0.0)
    monkeypatch.setattr(R, "GENEVAL_COUNTING_THRESHOLD", 0.0)
    monkeypatch.setattr(R, "GENEVAL_MAX_PER_IMAGE", 8 * 80)  # every (query, class) pair of the 8 queries
    images = torch.rand(2, 3, 40, 48, requires_grad=True)
    prompts = ["a photo of a red dog and a blue cup", "a photo of a dog left of a cat"]
    scores, info = R.REWARDS["geneval"](images, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and not scores.requires_grad
    assert info["strict"].shape == (2,)
    key = ("geneval", tuple(R.model_id(k) for k in R.model_keys("geneval")), "cpu")
    model = R._MODELS[key][0]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    found = R.geneval_detect(images[:1], [{"dog", "cup"}], [0.0])[0]
    assert found and all(d.mask.shape == (40, 48) for ds in found.values() for d in ds)


def test_a_detector_without_cocos_80_classes_is_refused(tmp_path, geneval_env, monkeypatch):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    m2f, _ = geneval_env
    cfg = Mask2FormerConfig.from_pretrained(m2f)
    cfg.num_labels = 133  # a panoptic checkpoint
    cfg.id2label = {i: str(i) for i in range(133)}
    cfg.label2id = {str(i): i for i in range(133)}
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text((m2f / "preprocessor_config.json").read_text())
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tmp_path))
    with pytest.raises(R.RewardModelUnavailable, match="detects 133 classes, not COCO's 80"):
        R.REWARDS["geneval"](torch.rand(1, 3, 32, 32), ["a photo of a dog"])


def test_missing_geneval_models_are_named_before_loading(monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model loaded")))
    monkeypatch.delenv("CLEANFLOWRL_MODEL_GENEVAL", raising=False)
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL_CLIP", str(tmp_path / "clip"))
    with pytest.raises(R.RewardModelUnavailable) as e:
        R.make_reward("geneval")
    msg = str(e.value)
    assert ("geneval: 'facebook/mask2former-swin-small-coco-instance' is not in the Hugging Face cache; download it "
            "where the hub is reachable with `hf download facebook/mask2former-swin-small-coco-instance`") in msg
    assert f"geneval (geneval_clip): the folder {tmp_path / 'clip'} (from $CLEANFLOWRL_MODEL_GENEVAL_CLIP) does not exist" in msg
    assert "hf download openai/clip-vit-large-patch14 --local-dir" in msg


# ----------------------------------------------------------------------------------------------
# Training with it
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["flow_grpo", "awm"])
def test_one_iteration_with_geneval(script, geneval_env, tmp_path, tiny_sd3_dir, monkeypatch):
    """One iteration on the tiny SD3 pipeline with the geneval reward (plus a jpeg term, as the tiny random
    detector alone scores every image alike), and the geneval info logged."""
    import awm
    import flow_grpo
    from reward_runs import assert_trained, train_once

    module, extra = {"flow_grpo": (flow_grpo, {}), "awm": (awm, {"train_timesteps": 2})}[script]
    monkeypatch.setattr(R, "GENEVAL_TEST_SCALE", (64, 64))
    recs, initial, trained = train_once(module, tiny_sd3_dir, tmp_path, "geneval:1,jpeg_incompressibility:0.01",
                                        "a photo of a red car", monkeypatch, lora_rank=4, **extra)
    assert_trained(recs, initial, trained)
    train = next(r for r in recs if "reward/mean" in r)
    assert "reward/geneval" in train and "reward/strict/colors" in train and "reward/strict/counting" not in train
