"""The ocr reward: Flow-GRPO's rule (first quoted span, spaces removed, lower case, full credit when the target
is inside the text read, else 1 - clipped edit distance / length) on strings; PaddleOCR's PP-OCR detector and
recogniser as the rapidocr package ships them (real weights, no download) reading rendered text through the
reward's own loading code; the reading order and joining at the library boundary; missing models named
before the diffusion model loads; one training iteration of flow_grpo.py and awm.py."""

import os

import numpy as np
import pytest
import torch

import rewards as R

OCR_PROMPT = 'a sign that says "OPEN LATE"'


def _render(lines, size=(96, 320)):
    """Dark text lines on a light background, as a (3, H, W) tensor in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size[::-1], (235, 230, 220))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=30)
    for i, text in enumerate(lines):
        draw.text((16, 8 + 40 * i), text, fill=(20, 20, 60), font=font)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def _engine_key():
    return ("ocr", (R.model_id("ocr"),), "cpu")


def link_shipped_models(path):
    """The folder layout $CLEANFLOWRL_MODEL_OCR names: det.onnx and rec.onnx (here links to the PP-OCR models
    the rapidocr package ships)."""
    shipped = R._rapidocr_models()
    os.symlink(os.path.join(shipped, "PP-OCRv6_det_small.onnx"), path / "det.onnx")
    os.symlink(os.path.join(shipped, "PP-OCRv6_rec_small.onnx"), path / "rec.onnx")
    return path


@pytest.fixture(scope="session")
def ocr_model_dir(tmp_path_factory):
    return link_shipped_models(tmp_path_factory.mktemp("ocr_models"))


# ----------------------------------------------------------------------------------------------
# Flow-GRPO's rule on strings
# ----------------------------------------------------------------------------------------------
def test_quoted_text_is_the_first_span():
    assert R.quoted_text(OCR_PROMPT) == "OPEN LATE"
    assert R.quoted_text('a mug with "BEST" and "DAD" on it') == "BEST"  # prompt.split('"')[1]
    assert R.quoted_text("a poster reading \u201cHELLO\u201d") == "HELLO"
    for bad in ("a sign that says hello", 'an empty sign ""', 'a blank " " sign'):
        with pytest.raises(ValueError, match="double quotes"):
            R.quoted_text(bad)


def test_levenshtein_by_hand():
    assert R.levenshtein("kitten", "sitting") == 3 and R.levenshtein("flaw", "lawn") == 2
    assert R.levenshtein("", "abc") == 3 and R.levenshtein("abc", "") == 3 and R.levenshtein("abc", "abc") == 0


def test_ocr_score_is_flow_grpos_rule():
    s = R.ocr_score
    assert s("Open Late", "OPEN LATE") == 1.0  # case and spaces ignored
    assert s("WELCOME open late 24H", "open late") == 1.0  # the target inside the text read: full credit
    assert s("HELO", "HELLO") == pytest.approx(0.8)  # one edit over 5 characters
    assert s("JELLO", "HELLO") == pytest.approx(0.8)
    assert s("", "HELLO") == 0.0
    assert s("a much longer recognised text", "HI") == 0.0  # the distance is clipped at the length
    assert s("open\nlate", "open late") == pytest.approx(1 - 1 / 8)  # only spaces are removed, as the reference
    assert s("OPENLAT", "open late") == pytest.approx(1 - 1 / 8)


# ----------------------------------------------------------------------------------------------
# The shipped PP-OCR models through the reward's loading code
# ----------------------------------------------------------------------------------------------
def test_the_default_models_read_rendered_text(monkeypatch):
    """With no $CLEANFLOWRL_MODEL_OCR the reward loads the models inside the rapidocr package (no download)
    and reads rendered text: lines top to bottom, joined without separators."""
    monkeypatch.delenv("CLEANFLOWRL_MODEL_OCR", raising=False)
    assert R.missing_models(["ocr"]) == []
    images = torch.stack([_render(["OPEN LATE"]), _render(["ALPHA", "BRAVO"])]).requires_grad_()
    texts = R.read_text(images)
    assert texts[0].replace(" ", "") == "OPENLATE"
    assert texts[1].replace(" ", "") == "ALPHABRAVO"
    prompts = [OCR_PROMPT, 'a poster that says "alpha bravo"']
    scores, info = R.REWARDS["ocr"](images, prompts)
    assert scores.tolist() == [1.0, 1.0] and info["ocr/exact"].tolist() == [1.0, 1.0] and not scores.requires_grad
    wrong, _ = R.REWARDS["ocr"](images, ['a sign that says "CLOSED"', 'a poster that says "ALPHA CHARLIE"'])
    assert wrong[1] == pytest.approx(1 - R.levenshtein("alphabravo", "alphacharlie") / len("alphacharlie"))
    assert (wrong < 1).all()


def test_a_model_folder_loads_with_paddleocrs_settings(ocr_model_dir, monkeypatch):
    """$CLEANFLOWRL_MODEL_OCR names a folder with det.onnx and rec.onnx; the engine gets PaddleOCR 2.9.1's
    settings of Flow-GRPO's call (no angle classifier, box threshold 0.6, unclip 1.5, drop score 0.5, ...)."""
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(ocr_model_dir))
    assert R.read_text(_render(["OPEN LATE"])[None])[0].replace(" ", "") == "OPENLATE"
    engine = R._MODELS[_engine_key()]
    assert engine.cfg.Det.model_path == str(ocr_model_dir / "det.onnx")
    assert engine.cfg.Rec.model_path == str(ocr_model_dir / "rec.onnx")
    assert (engine.use_cls, engine.text_score, engine.cfg.Global.use_preprocess_img) == (False, 0.5, False)
    det = engine.cfg.Det
    assert (det.limit_side_len, det.limit_type, det.thresh, det.box_thresh, det.unclip_ratio, det.use_dilation) == (
        960, "max", 0.3, 0.6, 1.5, False)
    assert list(det.mean) == [0.485, 0.456, 0.406] and list(det.std) == [0.229, 0.224, 0.225]


def test_read_text_joins_the_lines_read_and_passes_8bit_rgb(monkeypatch):
    """At the library boundary: each image goes in as an (H, W, 3) uint8 RGB array (as Flow-GRPO hands
    PaddleOCR its numpy images); the lines come back joined in the engine's order."""
    from types import SimpleNamespace

    seen = []

    def engine(array):
        seen.append(array)
        if array[..., 0].max() == 255:  # the red image shows text
            return SimpleNamespace(txts=("OPEN", "LATE 24"), scores=(0.9, 0.6))
        return SimpleNamespace(txts=None, scores=None)  # rapidocr's empty output: nothing found

    monkeypatch.setitem(R._MODELS, _engine_key(), engine)
    images = torch.zeros(2, 3, 8, 10)
    images[0, 0] = 1.0  # red
    images[1, 2] = 0.5  # dark blue
    assert R.read_text(images) == ["OPENLATE 24", ""]
    assert seen[0].dtype == np.uint8 and seen[0].shape == (8, 10, 3)
    assert (seen[0][..., 0] == 255).all() and (seen[0][..., 1:] == 0).all()
    assert (seen[1][..., 2] == 128).all()  # round(0.5 * 255)
    scores, info = R.REWARDS["ocr"](images, [OCR_PROMPT, OCR_PROMPT])
    assert scores.tolist() == [1.0, 0.0] and info["ocr/exact"].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Missing models
# ----------------------------------------------------------------------------------------------
def test_a_folder_without_the_models_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tmp_path))
    (tmp_path / "det.onnx").write_bytes(b"")
    with pytest.raises(R.RewardModelUnavailable) as e:
        R.make_reward("ocr")
    assert (f"ocr: the folder {tmp_path} (from $CLEANFLOWRL_MODEL_OCR) lacks rec.onnx or PP-OCRv6_rec_small.onnx; "
            f"save the model there, or unset $CLEANFLOWRL_MODEL_OCR to use {R._rapidocr_models()}") in str(e.value)


def test_without_rapidocr_the_reward_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # import rapidocr now raises ImportError
    with pytest.raises(R.RewardModelUnavailable, match=r"pip install rapidocr onnxruntime"):
        R.REWARDS["ocr"](torch.zeros(1, 3, 8, 8), [OCR_PROMPT])


def test_the_script_stops_before_loading_the_diffusion_model(monkeypatch, tmp_path):
    """flow_grpo.py with --reward geneval,ocr and neither model here: one message naming both, before the
    diffusion model loads."""
    import flow_grpo

    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(tmp_path / "no-ocr"))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_GENEVAL", "cleanflowrl-test/no-mask2former")

    def load_policy(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the reward models were checked")

    monkeypatch.setattr(flow_grpo, "load_policy", load_policy)
    args = flow_grpo.Args(model=str(tmp_path / "no-diffusion-model"), reward="geneval:1,ocr:1", lora_rank=4,
                          lora_alpha=4.0, threads=1, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        flow_grpo.main(args)
    msg = str(e.value)
    assert f"ocr: the folder {tmp_path / 'no-ocr'} (from $CLEANFLOWRL_MODEL_OCR) does not exist" in msg
    assert "`hf download cleanflowrl-test/no-mask2former`" in msg


# ----------------------------------------------------------------------------------------------
# Training with it
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["flow_grpo", "awm"])
def test_one_iteration_with_ocr(script, ocr_model_dir, tmp_path, tiny_sd3_dir, monkeypatch):
    """One iteration on the tiny SD3 pipeline with the ocr reward (plus a jpeg term: 64-px noise holds no text,
    so OCR alone scores every image 0), the ocr component logged."""
    import awm
    import flow_grpo
    from reward_runs import assert_trained, train_once

    module, extra = {"flow_grpo": (flow_grpo, {}), "awm": (awm, {"train_timesteps": 2})}[script]
    monkeypatch.setenv("CLEANFLOWRL_MODEL_OCR", str(ocr_model_dir))
    recs, initial, trained = train_once(module, tiny_sd3_dir, tmp_path, "ocr:1,jpeg_incompressibility:0.01", OCR_PROMPT,
                                        monkeypatch, lora_rank=4, **extra)
    assert_trained(recs, initial, trained)
    train = next(r for r in recs if "reward/mean" in r)
    assert "reward/ocr" in train and "reward/ocr/exact" in train
