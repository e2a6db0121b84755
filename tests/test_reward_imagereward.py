"""ImageReward-v1.0 (rewards.imagereward) on tiny random models, nothing downloaded.

The checkpoints here are written in the official layout: the key names of the original's ImageReward module
(ImageReward/ImageReward.py:71-78 and ImageReward/models/BLIP/{blip_pretrain,vit,med}.py of THUDM/ImageReward,
retyped below with their shapes), tiny sizes but the real head counts, saved with torch.save and loaded through
the code path of the real ImageReward.pt. Scores are checked against a forward pass of the original's
architecture written here from those names in plain torch, and the preprocessing against PIL."""

import math

import numpy as np
import pytest
import torch

import awm
import flow_grpo
import rewards as R
from reward_runs import GENEVAL_PROMPT, assert_trained, train_once

# tiny sizes; heads stay 16 (ViT-L) and 12 (BERT-base), so head dims are 2
TINY = dict(width=32, blocks=1, patch=8, grid=4, mlp=64, t_width=24, t_layers=1, t_mlp=48, positions=40)
REAL = dict(width=1024, blocks=24, patch=16, grid=14, mlp=4096, t_width=768, t_layers=12, t_mlp=3072, positions=512,
            vocab=30524)
WORDS = ["a", "photo", "of", "red", "car", "dog", "cat", "blue", "sitting", "on", "the", "bench", "next", "to",
         "tree", "under", "sky", "with", "and", "green", "big", "small", "##s", "##ing"]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py:80-81
RGB_MEAN, RGB_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # ImageReward.py:36


def official_layout(width, blocks, patch, grid, mlp, t_width, t_layers, t_mlp, positions, vocab, embed=256):
    """name -> shape of every tensor in the original ImageReward module's state_dict()."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {v + "cls_token": (1, 1, width), v + "pos_embed": (1, grid * grid + 1, width),
              v + "patch_embed.proj.weight": (width, 3, patch, patch), v + "patch_embed.proj.bias": (width,)}
    for i in range(blocks):
        b = f"{v}blocks.{i}."
        for name, out, inp in (("norm1", width, None), ("attn.qkv", 3 * width, width), ("attn.proj", width, width),
                               ("norm2", width, None), ("mlp.fc1", mlp, width), ("mlp.fc2", width, mlp)):
            shapes[b + name + ".weight"] = (out, inp) if inp else (out,)
            shapes[b + name + ".bias"] = (out,)
    shapes |= {v + "norm.weight": (width,), v + "norm.bias": (width,)}
    shapes |= {t + "embeddings.position_ids": (1, positions), t + "embeddings.word_embeddings.weight": (vocab, t_width),
               t + "embeddings.position_embeddings.weight": (positions, t_width),
               t + "embeddings.LayerNorm.weight": (t_width,), t + "embeddings.LayerNorm.bias": (t_width,)}
    for i in range(t_layers):
        lay = f"{t}encoder.layer.{i}."
        parts = []
        for att, source in (("attention", t_width), ("crossattention", width)):
            parts += [(f"{att}.self.query", t_width, t_width), (f"{att}.self.key", t_width, source),
                      (f"{att}.self.value", t_width, source), (f"{att}.output.dense", t_width, t_width),
                      (f"{att}.output.LayerNorm", t_width, None)]
        parts += [("intermediate.dense", t_mlp, t_width), ("output.dense", t_width, t_mlp), ("output.LayerNorm", t_width, None)]
        for name, out, inp in parts:
            shapes[lay + name + ".weight"] = (out, inp) if inp else (out,)
            shapes[lay + name + ".bias"] = (out,)
    for name, inp in (("vision_proj", width), ("text_proj", t_width)):
        shapes |= {f"blip.{name}.weight": (embed, inp), f"blip.{name}.bias": (embed,)}
    for j, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, t_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes |= {f"mlp.layers.{j}.weight": (out, inp), f"mlp.layers.{j}.bias": (out,)}
    return shapes


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1]).expand(shape).clone()
        elif "norm" in name.lower() and name.endswith(".weight"):
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
            state[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return state


def tokenizer_dir(path):
    from transformers import BertTokenizer

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer.from_pretrained(path).save_pretrained(path)  # tokenizer.json too, as the hub's copy has
    return path


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    """(checkpoint path, its state dict in the original's names, tokenizer folder)."""
    path = tmp_path_factory.mktemp("tiny_imagereward")
    tok = tokenizer_dir(path / "tokenizer")
    vocab = len(WORDS) + 5 + 2  # BLIP adds [DEC] and [ENC] (models/BLIP/blip.py:18-19), as 30522 -> 30524
    state = random_state(official_layout(**TINY, vocab=vocab))
    torch.save(state, path / "ImageReward.pt")
    return path / "ImageReward.pt", state, tok


@pytest.fixture
def ir_env(tiny_ir, monkeypatch):
    ckpt, state, tok = tiny_ir
    monkeypatch.setenv("CLEANFLOWRL_MODEL_IMAGEREWARD", str(ckpt))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_IMAGEREWARD_TOKENIZER", str(tok))
    return tiny_ir


def reference_scores(sd, pixels, ids, mask, vision_heads=16, text_heads=12):
    """The original's forward (vit.py VisionTransformer, med.py BertModel in 'multimodal' mode, ImageReward.py
    score()) from its state dict, in plain torch."""
    F = torch.nn.functional

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def norm(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def attend(q, k, v, heads, bias=None):
        split = [x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v)]
        s = split[0] @ split[1].transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
        s = s if bias is None else s + bias
        return (s.softmax(-1) @ split[2]).transpose(1, 2).flatten(2)

    v = "blip.visual_encoder."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x], 1) + sd[v + "pos_embed"]
    blocks = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(v + "blocks."))
    for i in range(blocks):
        b = f"{v}blocks.{i}."
        q, k, val = lin(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, val, vision_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = norm(h, t + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py:659-660
    layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith(t + "encoder.layer."))
    for i in range(layers):
        lay = f"{t}encoder.layer.{i}."
        for att, source, bias in (("attention", None, padding), ("crossattention", image, None)):
            kv = h if source is None else source
            o = attend(lin(h, lay + att + ".self.query"), lin(kv, lay + att + ".self.key"),
                       lin(kv, lay + att + ".self.value"), text_heads, bias)
            h = norm(lin(o, lay + att + ".output.dense") + h, lay + att + ".output.LayerNorm", 1e-12)
        h = norm(lin(F.gelu(lin(h, lay + "intermediate.dense")), lay + "output.dense") + h, lay + "output.LayerNorm", 1e-12)
    raw = h[:, 0]  # [CLS]
    for j in (0, 2, 4, 6, 7):  # dropouts between them are off in eval
        raw = lin(raw, f"mlp.layers.{j}")
    return (raw.squeeze(-1) - MEAN) / STD


def pil_preprocess(image, size=224):
    """torchvision's Resize(size, BICUBIC) + CenterCrop(size) + ToTensor + Normalize on a PIL image, typed out."""
    from PIL import Image

    im = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    w, h = im.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + size, top + size))).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(RGB_MEAN).view(3, 1, 1)) / torch.tensor(RGB_STD).view(3, 1, 1)


def _images(n, h, w, seed=0):
    """Smooth colour fields plus fine noise: content at every scale, so a shifted crop or a wrong size shows."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    return (0.8 * coarse + 0.2 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The checkpoint layout and the key table
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_the_key_table_maps_the_official_layout_onto_the_model_exactly(size):
    """Every key of the official layout maps (none unknown), onto exactly the model's weights with their
    shapes (none missing, none extra); the unused ones are the text position ids and BLIP's projections.
    At the real size the model is built on the meta device, and its configuration is ViT-L/16 at 224 px and
    BERT-base with cross-attention to 1024-wide image tokens."""
    sizes = TINY | {"vocab": 36} if size == "tiny" else REAL
    layout = official_layout(**sizes)
    mapped = {R.imagereward_key(k): s for k, s in layout.items()}
    unused = sorted(k for k in layout if R.imagereward_key(k) == "")
    assert unused == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
                      "blip.vision_proj.bias", "blip.vision_proj.weight"]
    mapped.pop("")
    assert len(mapped) == len(layout) - len(unused)  # no two keys onto one weight
    vision, text = R._imagereward_configs({k: torch.empty(s, device="meta") for k, s in mapped.items()})
    with torch.device("meta"):
        model = R.ImageRewardModel(vision, text)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == mapped
    if size == "real":
        assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers,
                vision.num_attention_heads, vision.intermediate_size, vision.layer_norm_eps) == (
                    224, 16, 1024, 24, 16, 4096, 1e-6)
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
                text.vocab_size, text.max_position_embeddings, text.encoder_hidden_size, text.layer_norm_eps) == (
                    768, 12, 12, 3072, 30524, 512, 1024, 1e-12)
        assert vision.hidden_act == text.hidden_act == "gelu"  # exact (erf) GELU, as nn.GELU and med_config.json
        assert 440e6 < sum(p.numel() for p in model.parameters()) < 460e6


def test_a_renamed_missing_or_pickled_key_fails_to_load(tiny_ir, tmp_path):
    """The loader is strict where the original's load_state_dict(strict=False) is not: an unknown name or a
    missing weight is an error naming it, not a model scored with random weights; a pickle that would run
    code is refused (torch.load weights_only=True)."""
    ckpt, state, _ = tiny_ir
    renamed = dict(state)
    renamed["blip.visual_encoder.blocks.0.attn.qkv_.weight"] = renamed.pop("blip.visual_encoder.blocks.0.attn.qkv.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(R.RewardModelUnavailable, match=r"unknown keys blip\.visual_encoder\.blocks\.0\.attn\.qkv_\.weight"):
        R.load_imagereward(str(tmp_path / "renamed.pt"))
    missing = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.0.crossattention.self.key.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(R.RewardModelUnavailable, match=r"lacks weights .*text\.encoder\.layer\.0\.crossattention\.self\.key\.bias"):
        R.load_imagereward(str(tmp_path / "missing.pt"))
    optional = {k: v for k, v in state.items() if not k.startswith(("blip.vision_proj", "blip.text_encoder.embeddings.position_ids"))}
    torch.save(optional, tmp_path / "optional.pt")
    R.load_imagereward(str(tmp_path / "optional.pt"))  # the score needs neither

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({**state, "mlp.layers.7.bias": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(R.RewardModelUnavailable, match="refusing to load .*evil.pt: it holds more than tensors"):
        R.load_imagereward(str(tmp_path / "evil.pt"))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
def test_scores_equal_the_originals_forward_pass(ir_env, monkeypatch):
    """Scores (in chunks of BATCH_SIZE) equal the original's computation written out from its state dict:
    ViT tokens, BERT with cross-attention, the MLP on [CLS], (raw - 0.16717...) / 1.03333...; the prompts are
    BERT-tokenised, padded and truncated to 35 tokens (the long prompt is cut)."""
    from transformers import BertTokenizer

    ckpt, state, tok_dir = ir_env
    monkeypatch.setattr(R, "BATCH_SIZE", 2)
    images = _images(5, 40, 56)
    prompts = ["a photo of a red car", "A Small Dog sitting on the bench", "cats",
               " ".join(["a big green tree under the blue sky"] * 6), "a zebra"]
    scores, info = R.REWARDS["imagereward"](images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and info == {}

    tok = BertTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids, mask = t["input_ids"], t["attention_mask"]
    assert ids.shape == (5, 35) and mask[3].all() and ids[3, -1] == tok.sep_token_id  # the long one, cut at 35
    assert ids[0, :7].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["a", "photo", "of", "a", "red", "car"])]
    assert ids[0, 8:].eq(0).all() and mask[0].sum() == 8 and (ids[:, 0] == tok.cls_token_id).all()
    with torch.no_grad():
        want = reference_scores(state, R.imagereward_preprocess(images, 32), ids, mask)
    assert torch.allclose(scores, want, atol=1e-5, rtol=1e-5), (scores, want)
    assert scores.std() > 1e-3  # the images and prompts differ, and so do their scores
    model, reward_tok = R._MODELS[("imagereward", (str(ckpt), str(tok_dir)), "cpu")]
    assert len(reward_tok) == model.text.config.vocab_size == len(WORDS) + 7  # with [DEC] and [ENC], as 30524
    assert reward_tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS) + 5, len(WORDS) + 6]


def test_preprocessing_matches_the_originals_transform_on_non_square_images():
    """At 224 px, on 512x384, 384x512 and 460x300 images (W x H): the short side to 224, the long side
    truncated (298.7 -> 298, 343.5 -> 343), bicubic, the centre crop at int(round(offset)) (59.5 -> 60), CLIP's
    mean and std. PIL resizes 8-bit images in fixed point, torch in float here: they differ by at most one
    8-bit level, on about a sixth of the values."""
    for h, w in ((384, 512), (512, 384), (300, 460)):
        images = _images(2, h, w, seed=h)
        got = R.imagereward_preprocess(images)
        assert got.shape == (2, 3, 224, 224)
        for i in range(2):
            diff = ((got[i] - pil_preprocess(images[i])) * torch.tensor(RGB_STD).view(3, 1, 1) * 255).abs()
            assert diff.max() <= 1.01 and diff.mean() < 0.25, (h, w, diff.max(), diff.mean())


def test_frozen_and_detached(ir_env):
    images = _images(2, 32, 32).requires_grad_()
    scores, _ = R.make_reward("imagereward")(images, ["a red car", "a dog"])
    assert not scores.requires_grad and scores.grad_fn is None
    key = ("imagereward", tuple(R.model_id(k) for k in R.model_keys("imagereward")), "cpu")
    model, _ = R._MODELS[key]
    assert not any(p.requires_grad for p in model.parameters()) and not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------------
# The scripts: missing weights stop them early; one training iteration on the tiny SD3 pipeline
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [flow_grpo, awm])
def test_missing_imagereward_stops_the_script_before_the_diffusion_model(module, monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache: both the checkpoint and the tokenizer are named, with the
    command that downloads each, before the script loads its diffusion model; then a missing local file."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for key in ("IMAGEREWARD", "IMAGEREWARD_TOKENIZER"):
        monkeypatch.delenv(f"CLEANFLOWRL_MODEL_{key}", raising=False)
    monkeypatch.setattr(module, "load_policy", lambda *a, **k: pytest.fail("the diffusion model loaded first"))
    args = module.Args(model=str(tmp_path / "no-model"), reward="imagereward", lora_rank=4, lora_alpha=4.0,
                       threads=1, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        module.main(args)
    msg = str(e.value)
    assert "imagereward: 'THUDM/ImageReward/ImageReward.pt' is not in the Hugging Face cache" in msg
    assert "`hf download THUDM/ImageReward ImageReward.pt`" in msg and "$CLEANFLOWRL_MODEL_IMAGEREWARD " in msg
    assert "imagereward (imagereward_tokenizer): 'google-bert/bert-base-uncased' is not in the Hugging Face cache" in msg
    assert "`hf download google-bert/bert-base-uncased`" in msg and "$CLEANFLOWRL_MODEL_IMAGEREWARD_TOKENIZER" in msg
    monkeypatch.setenv("CLEANFLOWRL_MODEL_IMAGEREWARD", str(tmp_path / "ImageReward.pt"))
    with pytest.raises(SystemExit, match=rf"the file {tmp_path / 'ImageReward.pt'} \(from \$CLEANFLOWRL_MODEL_IMAGEREWARD\) "
                       r"does not exist; save the model there \(`hf download THUDM/ImageReward ImageReward.pt"):
        module.main(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [flow_grpo, awm])
def test_one_training_iteration_with_imagereward(module, ir_env, tmp_path, tiny_sd3_dir, monkeypatch):
    extra = {"train_timesteps": 2} if module is awm else {}
    recs, initial, trained = train_once(module, tiny_sd3_dir, tmp_path, "imagereward", GENEVAL_PROMPT, monkeypatch,
                                        **extra)
    assert_trained(recs, initial, trained)
