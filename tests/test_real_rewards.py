"""The real-model rewards on tiny random models built here (nothing is downloaded), plus the pure parts
(OCR edit distance and quotes, GenEval parsing and clause checking) against hand-computed cases."""

import json
import math
from pathlib import Path

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


def _cache_key(name):
    """The R._MODELS key of a reward's models as the environment names them now (other test modules may have
    cached other tiny models under the same reward)."""
    key = (name, tuple(R.model_id(k) for k in R.model_keys(name)), "cpu")
    assert key in R._MODELS
    return key


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
    """PickScore = logit_scale * cosine / 26 and CLIPScore = logit_scale * cosine / 30, on the same CLIP model; the cosine
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
    assert torch.allclose(clip, model.logit_scale.exp() * cos / 30, atol=1e-5)
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
    """Called directly (no make_reward), a reward that cannot load names what is missing and how to get it."""
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/no-such-model")
    with pytest.raises(R.RewardModelUnavailable, match=r"HF_HUB_OFFLINE(.|\n)*'cleanflowrl-test/no-such-model' is not "
                       r"in the Hugging Face cache; download .*`hf download cleanflowrl-test/no-such-model`.*"
                       r"CLEANFLOWRL_MODEL_CLIPSCORE(.|\n)*huggingface-cli"):
        R.REWARDS["clipscore"](_images(1), ["a dog"])
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_CLIP", str(tmp_path))  # an empty folder: no config
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", "cleanflowrl-test/mlp/model.pth")
    with pytest.raises(R.RewardModelUnavailable) as e:
        R.REWARDS["aesthetic"](_images(1), [""])
    assert f"the folder {tmp_path} (from $CLEANFLOWRL_MODEL_AESTHETIC_CLIP) lacks config.json, the weights" in str(e.value)
    assert "hf download cleanflowrl-test/mlp model.pth" in str(e.value)
    assert f"hf download {tmp_path}" not in str(e.value)  # never a download of a local path


@pytest.fixture
def every_model_env(clip_env, tiny_ocr_dir, tiny_owl_dir, monkeypatch):
    """Every reward model on a tiny random one."""
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))
    monkeypatch.setattr(R, "GENEVAL_TEST_SCALE", (64, 64))  # the tiny detector need not see 800 px


REAL = {"pickscore": "a photo of a red car", "clipscore": "three people", "aesthetic": "",
        "ocr": 'a sign that says "OPEN LATE"', "geneval": "a photo of a dog left of a cat"}


@pytest.mark.parametrize("name", list(REAL))
def test_real_rewards_are_frozen_and_return_detached_scores(every_model_env, name):
    """Issue 17: pickscore multiplied by the model's logit_scale outside no_grad, with the model's parameters
    still requiring grad, so its scores carried a graph into the advantages and the first update crashed.
    Every reward model is frozen (no grad, eval mode) and every reward returns detached tensors, even for
    images that require grad."""
    images = _images(2, size=32).requires_grad_()
    scores, info = R.make_reward(name)(images, [REAL[name]] * 2)  # the sum the scripts use refuses graphs too
    raw, raw_info = R.REWARDS[name](images, [REAL[name]] * 2)
    for t in (scores, raw, *info.values(), *raw_info.values()):
        assert not t.requires_grad and t.grad_fn is None
    if name == "ocr":  # onnxruntime runs the OCR models: no torch module, no graph
        return
    loaded = [m for m in R._MODELS[_cache_key(name)] if isinstance(m, torch.nn.Module)]
    if name == "geneval":  # and its colour check's CLIP, loaded when a colour was asked
        clip = R._MODELS.get(("geneval_clip", (R.model_id("geneval_clip"),), "cpu"), ())
        loaded += [m for m in clip if isinstance(m, torch.nn.Module)]
    assert loaded
    for model in loaded:
        assert not any(p.requires_grad for p in model.parameters()), f"{name}: {type(model).__name__} is not frozen"
        assert not any(m.training for m in model.modules()), f"{name}: {type(model).__name__} is in train mode"


def test_the_reward_sum_refuses_a_reward_that_requires_grad(monkeypatch):
    """A user-registered reward that returns a graph is refused by name before it reaches the advantages."""
    weight = torch.ones(1, requires_grad=True)
    monkeypatch.setitem(R.REWARDS, "toy_graph", lambda images, prompts: (images.mean((1, 2, 3)) * weight, {}))
    monkeypatch.setitem(R.REWARDS, "toy_info_graph", lambda images, prompts: (
        torch.zeros(len(images)), {"toy/extra": images.mean((1, 2, 3)) * weight}))
    with pytest.raises(RuntimeError, match=r"reward 'toy_graph' returned scores that require grad: .*detached"):
        R.make_reward("jpeg_compressibility:0.1,toy_graph:1")(_images(2), ["", ""])
    with pytest.raises(RuntimeError, match=r"reward 'toy_info_graph' returned toy/extra that require grad"):
        R.make_reward("toy_info_graph")(_images(2), ["", ""])
    monkeypatch.setitem(R.REWARDS, "toy_detached", lambda images, prompts: ((images.mean((1, 2, 3)) * weight).detach(), {}))
    scores, _ = R.make_reward("toy_detached")(_images(2), ["", ""])
    assert scores.shape == (2,)


# ----------------------------------------------------------------------------------------------
# Availability: make_reward checks every model before anything loads (the scripts call it first)
# ----------------------------------------------------------------------------------------------
def test_make_reward_names_every_missing_model_before_loading(monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("a model loaded")))
    partial = tmp_path / "ocr"  # a model folder, but not the OCR's (no det.onnx, rec.onnx)
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_PICKSCORE", str(tmp_path / "nonexistent"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_PICKSCORE_PROCESSOR", "cleanflowrl-test/no-processor")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/no-clip")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_CLIP", "cleanflowrl-test/no-clip")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", "~/cleanflowrl-no-such-folder/aesthetic.pth")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(partial))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tmp_path / "config.json"))  # a file, not a folder
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL_CLIP", "cleanflowrl-test/no-geneval-clip")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(R.RewardModelUnavailable) as e:
        R.make_reward("pickscore:1,clipscore:1,aesthetic:1,ocr:1,geneval:1")
    lines = str(e.value).splitlines()
    assert lines[0] == "reward models missing (HF_HUB_OFFLINE is set, so nothing is downloaded):"
    assert lines[-1] == "(with huggingface_hub < 1.0 the command is `huggingface-cli download`)"
    body = "\n".join(lines[1:-1])
    assert len(lines) == 9, body  # one line per missing model; the CLIP both rewards share, once
    home = str(Path("~").expanduser())
    for want in (
        f"  - pickscore: the folder {tmp_path / 'nonexistent'} (from $CLEANFLOWRL_MODEL_PICKSCORE) does not exist; "
        f"save the model there (`hf download yuvalkirstain/PickScore_v1 --local-dir {tmp_path / 'nonexistent'}`), or "
        f"unset $CLEANFLOWRL_MODEL_PICKSCORE to use yuvalkirstain/PickScore_v1",
        "  - pickscore (pickscore_processor): 'cleanflowrl-test/no-processor' is not in the Hugging Face cache; download "
        "it where the hub is reachable with `hf download cleanflowrl-test/no-processor`, or point "
        "$CLEANFLOWRL_MODEL_PICKSCORE_PROCESSOR at a local copy",
        "  - clipscore, aesthetic (aesthetic_clip): 'cleanflowrl-test/no-clip' is not in the Hugging Face cache; download "
        "it where the hub is reachable with `hf download cleanflowrl-test/no-clip`, or point $CLEANFLOWRL_MODEL_CLIPSCORE "
        "or $CLEANFLOWRL_MODEL_AESTHETIC_CLIP at a local copy",
        f"  - aesthetic (aesthetic_mlp): the file {home}/cleanflowrl-no-such-folder/aesthetic.pth (from "
        f"$CLEANFLOWRL_MODEL_AESTHETIC_MLP) does not exist; save the model there (`hf download "
        f"trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth --local-dir {home}/cleanflowrl-no-such-folder`)",
        f"  - ocr: the folder {partial} (from $CLEANFLOWRL_MODEL_OCR) lacks det.onnx or PP-OCRv6_det_small.onnx, "
        f"rec.onnx or PP-OCRv6_rec_small.onnx; save the model there, or unset $CLEANFLOWRL_MODEL_OCR to use "
        f"{R.MODEL_IDS['ocr']}",
        f"  - geneval: {tmp_path / 'config.json'} (from $CLEANFLOWRL_MODEL_GENEVAL) is not a folder; point "
        f"$CLEANFLOWRL_MODEL_GENEVAL at the model's folder",
        "  - geneval (geneval_clip): 'cleanflowrl-test/no-geneval-clip' is not in the Hugging Face cache; download it "
        "where the hub is reachable with `hf download cleanflowrl-test/no-geneval-clip`, or point "
        "$CLEANFLOWRL_MODEL_GENEVAL_CLIP at a local copy"):
        assert want in body, (want, body)
    assert f"hf download {tmp_path}" not in body and f"hf download {home}" not in body


def test_the_check_finds_a_partly_cached_hub_model(monkeypatch, tmp_path):
    """Offline, a hub id counts when the files it needs are in the Hugging Face cache (here a fake one)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--cleanflowrl-test--clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "preprocessor_config.json", "aesthetic.pth"):
        (snap / f).write_text("{}")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/clip")
    with pytest.raises(R.RewardModelUnavailable, match=r"'cleanflowrl-test/clip' is only partly in the Hugging Face "
                       r"cache \(it lacks the weights \(model.safetensors or pytorch_model.bin\)\)"):
        R.make_reward("clipscore")
    (snap / "pytorch_model.bin").write_text("")
    R.make_reward("clipscore")  # complete: no error, nothing loaded yet
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_CLIP", "cleanflowrl-test/clip")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", "cleanflowrl-test/clip/aesthetic.pth")
    assert R.missing_models(["aesthetic"]) == []
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", "cleanflowrl-test/clip/other.pth")
    assert R.missing_models(["aesthetic"]) == [
        "aesthetic (aesthetic_mlp): 'cleanflowrl-test/clip/other.pth' is not in the Hugging Face cache; download it "
        "where the hub is reachable with `hf download cleanflowrl-test/clip other.pth`, or point "
        "$CLEANFLOWRL_MODEL_AESTHETIC_MLP at a local copy"]


def test_online_a_hub_model_may_still_download(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE a hub id outside the cache downloads when the reward loads: not refused (and the
    check contacts no server); a missing local folder is refused all the same."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", "cleanflowrl-test/no-such-model")
    R.make_reward("clipscore")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_CLIPSCORE", str(tmp_path / "gone"))
    with pytest.raises(R.RewardModelUnavailable, match=r"^reward models missing:\n  - clipscore: the folder .*gone"):
        R.make_reward("clipscore")


def test_tiny_models_pass_the_check(every_model_env):
    assert R.missing_models(list(REAL)) == []
    R.make_reward("pickscore:1,clipscore:1,aesthetic:1,ocr:1,geneval:1")


def test_a_pickled_aesthetic_head_cannot_run_code(clip_env, monkeypatch, tmp_path):
    """The aesthetic head's .pth is unpickled with weights_only=True: a pickle that would run code is refused."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"layers.0.weight": Payload()}, tmp_path / "evil.pth")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_AESTHETIC_MLP", str(tmp_path / "evil.pth"))
    with pytest.raises(R.RewardModelUnavailable, match="refusing to load .*evil.pth: it holds more than tensors"):
        R.REWARDS["aesthetic"](_images(1), [""])
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# OCR (its own tests: test_reward_ocr.py)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ocr_dir(tmp_path_factory):
    """A folder for $CLEANFLOWRL_MODEL_OCR: det.onnx and rec.onnx, links to the PP-OCR models the rapidocr
    package ships (real weights, a few MB: no smaller OCR model is needed)."""
    from test_reward_ocr import link_shipped_models

    return link_shipped_models(tmp_path_factory.mktemp("tiny_ocr"))


def test_ocr_on_the_shipped_models(tiny_ocr_dir, monkeypatch):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tiny_ocr_dir))
    prompts = ['a sign that says "OPEN LATE"', 'a mug with "HELLO"', 'a poster reading "123"']
    scores, info = R.REWARDS["ocr"](_images(3), prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert set(info) == {"ocr/exact"} and info["ocr/exact"].shape == (3,)
    with pytest.raises(ValueError, match="double quotes"):
        R.REWARDS["ocr"](_images(1), ["a sign without quotes"])


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


_GENEVAL_DIRS: dict = {}


@pytest.fixture
def tiny_owl_dir(tmp_path_factory, monkeypatch):
    """The folder to point $CLEANFLOWRL_MODEL_GENEVAL at: a tiny random Mask2Former (built once a session).
    The geneval reward also loads a CLIP for its colour check: this points $CLEANFLOWRL_MODEL_GENEVAL_CLIP at a
    tiny one, so fixtures that set only $CLEANFLOWRL_MODEL_GENEVAL keep working. (The name is from when the
    reward ran OWLv2; test_train_with_rewards imports it. The geneval tests are in test_reward_geneval.py.)"""
    from test_reward_geneval import _tiny_clip, _tiny_mask2former

    if not _GENEVAL_DIRS:
        root = tmp_path_factory.mktemp("tiny_geneval")
        (root / "mask2former").mkdir()
        (root / "clip").mkdir()
        _GENEVAL_DIRS.update(mask2former=_tiny_mask2former(root / "mask2former"), clip=_tiny_clip(root / "clip"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL_CLIP", str(_GENEVAL_DIRS["clip"]))
    return _GENEVAL_DIRS["mask2former"]


def test_geneval_on_tiny_models(tiny_owl_dir, monkeypatch):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", str(tiny_owl_dir))
    monkeypatch.setattr(R, "GENEVAL_TEST_SCALE", (64, 64))
    monkeypatch.setattr(R, "BATCH_SIZE", 2)
    prompts = ["a photo of a dog", "a photo of three cats", "a photo of a red car and a blue cup",
               "a photo of a dog left of a teddy bear", "a photo of a green bench"]
    scores, info = R.REWARDS["geneval"](_images(5), prompts)
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    assert info["strict"].shape == (5,) and set(info) == {"strict", *(f"strict/{c}" for c in R.GENEVAL_CATEGORIES)}
    assert info["strict/counting"][1] in (0.0, 1.0) and math.isnan(info["strict/counting"][0])
    monkeypatch.setattr(R, "GENEVAL_THRESHOLD", 1.0)  # nothing passes: no clause met
    monkeypatch.setattr(R, "GENEVAL_COUNTING_THRESHOLD", 1.0)
    scores, info = R.REWARDS["geneval"](_images(5), prompts)
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
