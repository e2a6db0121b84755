"""HPS-v2.1 on a tiny random model of its architecture (an open_clip ViT with ViT-H-14's head widths), saved in
the official checkpoint's layout ({"state_dict": open_clip's names}, float16) and loaded through the same code
as the real file; its score and preprocessing against computations written out here; CLIPScore on Flow-GRPO's
scale; each component of a reward sum logged on its own, in training and evaluation. Nothing is downloaded."""

import math

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoTokenizer

import flow_grpo
import rewards as R
from test_real_rewards import CLIP_MEAN, CLIP_STD, _tokenizer, clip_env, tiny_clip_dir  # noqa: F401 (fixtures)
from reward_runs import assert_trained, train_once

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP's, as open_clip uses
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SIZE, PATCH, CONTEXT = 32, 8, 16  # image side, patch side, text positions of the tiny model
PROMPTS = ["a photo of a red car", "three people", "a teddy bear", "a dog left of a cat"]


def tiny_open_clip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's names, ViT-H-14's layout at small sizes: image tower width 160 (2 heads of
    80, as ViT-H-14), text width 128 (2 heads of 64), 2 blocks each, embeddings of 24."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {"visual.conv1.weight": rnd(160, 3, PATCH, PATCH), "visual.class_embedding": rnd(160, scale=0.5),
          "visual.positional_embedding": rnd((SIZE // PATCH) ** 2 + 1, 160, scale=0.5),
          "visual.proj": rnd(160, 24, scale=0.2), "token_embedding.weight": rnd(vocab, 128, scale=0.5),
          "positional_embedding": rnd(CONTEXT, 128, scale=0.5), "text_projection": rnd(128, 24, scale=0.2),
          "logit_scale": torch.tensor(math.log(100.0))}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        width = 128 if ln == "ln_final" else 160
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + rnd(width, scale=0.2), rnd(width, scale=0.2)
    for tower, width in (("visual.transformer", 160), ("transformer", 128)):
        for i in range(2):
            p = f"{tower}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + rnd(width, scale=0.2), rnd(width, scale=0.2)
            sd[p + "attn.in_proj_weight"] = rnd(3 * width, width, scale=0.15)
            sd[p + "attn.in_proj_bias"] = rnd(3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = rnd(width, width, scale=0.15), rnd(width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = rnd(4 * width, width, scale=0.15), rnd(4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = rnd(width, 4 * width, scale=0.15), rnd(width)
    return {k: v.half() for k, v in sd.items()}  # as the "compressed" release stores them


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """(folder, checkpoint path, the state dict as float32): the checkpoint is {"state_dict": ...}, as the official
    HPS_v2.1_compressed.pt; the folder holds a tiny CLIP BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny_hps")
    tok = _tokenizer(CONTEXT)
    tok.save_pretrained(path / "tokenizer")
    state = tiny_open_clip_state(len(tok))
    torch.save({"state_dict": state}, path / "HPS_v2.1_compressed.pt")
    return path, path / "HPS_v2.1_compressed.pt", {k: v.float() for k, v in state.items()}


@pytest.fixture
def hps_env(tiny_hps, monkeypatch):
    path, ckpt, _ = tiny_hps
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2", str(ckpt))
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2_TOKENIZER", str(path / "tokenizer"))
    return tiny_hps


# ---- open_clip's forward pass written out on the checkpoint's own tensors (no transformers, no key table) ----
def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _blocks(x, sd, prefix, head_width, causal):
    n, i = x.shape[1], 0
    while f"{prefix}.{i}.ln_1.weight" in sd:
        p = f"{prefix}.{i}."
        q, k, v = (_ln(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (-1, head_width)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, head_width)
        att = q @ k.transpose(-1, -2) / math.sqrt(head_width)
        if causal:
            att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = (att.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.gelu(_ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        i += 1
    assert i == 2
    return x


def open_clip_features(sd, pixels, ids, eot_id):
    """Image and text features of open_clip's CLIP (VisionTransformer and the text tower), unnormalised."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(len(x), 1, -1)
    x = _ln(torch.cat([cls, x], 1) + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    x = _blocks(x, sd, "visual.transformer.resblocks", 80, causal=False)
    image = _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = _blocks(t, sd, "transformer.resblocks", 64, causal=True)
    eot = (ids == eot_id).int().argmax(-1)  # the first end-of-text token (open_clip: argmax of the ids)
    text = _ln(t, sd, "ln_final")[torch.arange(len(ids)), eot] @ sd["text_projection"]
    return image, text


def hps_pixels(images, size):
    """The hpsv2 package's eval transform written out: 8-bit input, the long side to `size` (bicubic, antialiased),
    centred on a black square (the odd pixel right / bottom), OpenAI CLIP's mean and std."""
    x = (images * 255).round() / 255
    h, w = x.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    canvas = torch.zeros(len(x), 3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[:, :, top:top + nh, left:left + nw] = x
    return (canvas - MEAN) / STD


def _images(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---- tests ---------------------------------------------------------------------------------------------------
def test_the_score_is_the_diagonal_of_normalised_features(hps_env, monkeypatch):
    """On non-square 512 x 384 images, in two chunks: the package's recipe, diag(normalise(image features) @
    normalise(text features).T), no logit scale, recomputed from the checkpoint's tensors."""
    _, _, sd = hps_env
    monkeypatch.setattr(R, "BATCH_SIZE", 3)
    images = _images(4, 384, 512)
    scores, info = R.REWARDS["hpsv2"](images, PROMPTS)
    tok = AutoTokenizer.from_pretrained(hps_env[0] / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")["input_ids"]
    image, text = open_clip_features(sd, hps_pixels(images, SIZE), ids, tok.eos_token_id)
    want = torch.diagonal(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T)
    assert info == {} and scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.std() > 0.01  # the prompts and images are told apart
    assert torch.allclose(scores, want, atol=1e-5), (scores, want)


def test_the_preprocessing_is_the_packages():
    """Long side to the model's size, the short side scaled alike and padded black on both sides; the padding is
    exactly the normalised black, on the short side only; portrait and landscape alike."""
    black = (-MEAN / STD).view(3)
    for h, w in ((384, 512), (512, 300), (20, 12)):  # 300: an odd padding (13 columns: 6 left, 7 right)
        images = _images(2, h, w, seed=h)
        got = R.hpsv2_preprocess(images, SIZE)
        assert got.shape == (2, 3, SIZE, SIZE)
        assert torch.allclose(got, hps_pixels(images, SIZE), atol=1e-5)
        nh, nw = round(h * SIZE / max(h, w)), round(w * SIZE / max(h, w))
        top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
        pad = torch.ones(SIZE, SIZE, dtype=torch.bool)
        pad[top:top + nh, left:left + nw] = False
        pixels = got.permute(0, 2, 3, 1)  # (2, SIZE, SIZE, 3)
        assert pad.any() and torch.allclose(pixels[:, pad], black.expand(2, int(pad.sum()), 3), atol=1e-6)
        assert not torch.isclose(pixels[:, ~pad], black, atol=1e-3).all(-1).any()


def test_the_official_layout_loads_and_a_renamed_or_missing_key_fails(hps_env, tmp_path, monkeypatch):
    """The tiny checkpoint in the release's layout loads with every weight from the file (frozen, eval); a key
    renamed or dropped is an error that names it, not a model scored with random weights."""
    _, ckpt, sd = hps_env
    scores, _ = R.REWARDS["hpsv2"](_images(2, 64, 64), PROMPTS[:2])
    model, _ = R._MODELS[("hpsv2", (str(ckpt), R.model_id("hpsv2_tokenizer")), "cpu")]
    assert not model.training and not any(p.requires_grad for p in model.parameters()) and not scores.requires_grad
    assert model.config.vision_config.num_attention_heads == 2 and model.config.text_config.num_hidden_layers == 2
    assert torch.equal(model.visual_projection.weight, sd["visual.proj"].T)

    original = torch.load(ckpt, weights_only=True)["state_dict"]
    renamed = {("visual.ln_post.gamma" if k == "visual.ln_post.weight" else k): v for k, v in original.items()}
    torch.save({"state_dict": renamed}, tmp_path / "renamed.pt")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2", str(tmp_path / "renamed.pt"))
    with pytest.raises(R.RewardModelUnavailable, match=r"renamed.pt is not in the layout of .*visual\.ln_post\.gamma"):
        R.REWARDS["hpsv2"](_images(1, 64, 64), PROMPTS[:1])
    dropped = {k: v for k, v in original.items() if k != "visual.ln_post.bias"}
    torch.save({"state_dict": dropped}, tmp_path / "dropped.pt")
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2", str(tmp_path / "dropped.pt"))
    with pytest.raises(R.RewardModelUnavailable, match=r"dropped.pt lacks weights .*vision_model.post_layernorm.bias"):
        R.REWARDS["hpsv2"](_images(1, 64, 64), PROMPTS[:1])


def test_missing_weights_stop_the_script_before_the_diffusion_model(monkeypatch, tmp_path):
    """Offline, with the default hub file not cached or a local path that is not there: one message naming the
    file and how to get it, from make_reward and from a script before its diffusion model loads."""
    monkeypatch.delenv("CLEANFLOWRL_MODEL_HPSV2", raising=False)
    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2_TOKENIZER", str(tmp_path / "no-tokenizer"))
    with pytest.raises(R.RewardModelUnavailable) as e:
        R.make_reward("hpsv2")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "'xswu/HPSv2/HPS_v2.1_compressed.pt' is not in the Hugging Face cache" in msg
    assert "`hf download xswu/HPSv2 HPS_v2.1_compressed.pt`" in msg and "$CLEANFLOWRL_MODEL_HPSV2" in msg
    assert f"the folder {tmp_path / 'no-tokenizer'} (from $CLEANFLOWRL_MODEL_HPSV2_TOKENIZER) does not exist" in msg

    monkeypatch.setenv("CLEANFLOWRL_MODEL_HPSV2", str(tmp_path / "HPS_v2.1_compressed.pt"))

    def load_policy(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the reward models were checked")

    monkeypatch.setattr(flow_grpo, "load_policy", load_policy)
    args = flow_grpo.Args(model=str(tmp_path / "no-diffusion-model"), reward="hpsv2", lora_rank=4, lora_alpha=4.0,
                          threads=1, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        flow_grpo.main(args)
    assert str(e.value).startswith("--reward: reward models missing")
    assert (f"the file {tmp_path / 'HPS_v2.1_compressed.pt'} (from $CLEANFLOWRL_MODEL_HPSV2) does not exist; save the "
            f"model there (`hf download xswu/HPSv2 HPS_v2.1_compressed.pt") in str(e.value)
    assert not (tmp_path / "run").exists()


def test_clipscore_is_on_flow_grpos_scale(clip_env):
    """Flow-GRPO's clip scorer returns logits_per_image.diagonal() / 30 = logit_scale * cosine / 30, unclamped."""
    from transformers import AutoTokenizer, CLIPModel

    images = _images(2, 32, 32)
    scores, _ = R.REWARDS["clipscore"](images, PROMPTS[:2])
    model = CLIPModel.from_pretrained(clip_env).eval()
    t = AutoTokenizer.from_pretrained(clip_env)(PROMPTS[:2], padding="max_length", max_length=16, truncation=True,
                                                return_tensors="pt")
    x = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(pixel_values=x, input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits_per_image
    assert torch.allclose(scores, logits.diagonal() / 30, atol=1e-5)


def test_a_sum_keeps_each_component(hps_env, clip_env):
    """make_reward's info carries each component's own scores under its name; the total is the weighted sum."""
    images = _images(3, 48, 40)
    total, info = R.make_reward("hpsv2:1,clipscore:0.5")(images, PROMPTS[:3])
    h, _ = R.REWARDS["hpsv2"](images, PROMPTS[:3])
    c, _ = R.REWARDS["clipscore"](images, PROMPTS[:3])
    assert torch.equal(info["hpsv2"], h) and torch.equal(info["clipscore"], c)
    assert torch.allclose(total, h + 0.5 * c)


def test_flow_grpo_trains_on_hps_plus_clip_and_logs_each(hps_env, clip_env, tmp_path, tiny_sd3_dir, monkeypatch):
    """One Flow-GRPO iteration on the tiny SD3 pipeline with hpsv2 + clipscore: the LoRA moves, and each component
    is logged on its own in training (reward/<name>) and in evaluation (eval/<name>)."""
    recs, initial, trained = train_once(flow_grpo, tiny_sd3_dir, tmp_path, "hpsv2:1,clipscore:1", PROMPTS[0],
                                        monkeypatch)
    assert_trained(recs, initial, trained)
    train = next(r for r in recs if "reward/mean" in r)
    evals = [r for r in recs if "eval/score" in r]
    assert evals and all(math.isfinite(train[f"reward/{n}"]) for n in ("hpsv2", "clipscore"))
    assert all(math.isfinite(e[f"eval/{n}"]) for e in evals for n in ("hpsv2", "clipscore"))


def test_awm_trains_on_hps(hps_env, tmp_path, tiny_sd3_dir, monkeypatch):
    import awm

    recs, initial, trained = train_once(awm, tiny_sd3_dir, tmp_path, "hpsv2", PROMPTS[0], monkeypatch,
                                        train_timesteps=2)
    assert_trained(recs, initial, trained)
