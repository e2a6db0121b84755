"""CPU seconds of each reward model on one batch: the "s / 64 images at 512 px (CPU)" column of docs/rewards.md.

Every model is built here at its real size with random weights (nothing is downloaded), saved in a temporary
folder in exactly the layout rewards.py loads (a transformers folder, or the official checkpoint's file), and
loaded by the reward itself through its $CLEANFLOWRL_MODEL_<KEY> override, so what is timed is the reward's own
code: `rewards.make_reward(name)(images, prompts)` on the CPU, in chunks of rewards.BATCH_SIZE.

  - pickscore: CLIP ViT-H/14 (vision 32 blocks of width 1280, 16 heads, patch 14, 224 px, MLP 5120; text 24
    blocks of width 1024, 16 heads, MLP 4096, 77 positions; projection 1024), a transformers CLIPModel folder.
  - hpsv2: the same ViT-H/14 as an open_clip state dict, float16, in {"state_dict": ...}, as
    HPS_v2.1_compressed.pt (loaded through rewards.HPSV2_KEYS).
  - clipscore, aesthetic: CLIP ViT-L/14 (vision 24 x 1024, 16 heads, MLP 4096, patch 14, 224 px; text 12 x 768,
    12 heads, MLP 3072; projection 768); aesthetic adds the LAION MLP on the 768-wide embedding.
  - imagereward: a state dict in the layout of the official ImageReward.pt (BLIP ViT-L/16 at 224 px, 24 blocks
    of width 1024; BERT-base with cross-attention, 12 layers of width 768, 512 positions, vocabulary 30524;
    BLIP's two 256-wide projections; the MLP head), sized as rewards._imagereward_configs reads it back.
  - geneval: Mask2Former for COCO instances (Swin-S backbone: embed 96, depths 2-2-18-2, heads 3-6-12-24,
    window 7; 256-wide pixel decoder with 6 deformable layers, 10 decoder layers, 100 queries, 80 classes) at
    GenEval's test scale (a 512 px image is resized to 800 x 800), plus CLIP ViT-L/14 for the colour check.
    A random detector finds no object above GenEval's thresholds, so the reward's batch time is the detector's;
    the colour check is timed on its own afterwards (one crop per image, as the reward asks for it, and the
    classifier of a new class name: 30 prompts through the text tower).
  - ocr: the PP-OCR detector and recogniser shipped inside the rapidocr wheel (real weights; onnxruntime).
  - shapes: no model.

The CLIP text towers use a small BPE tokenizer built in code (shapes.build_clip_tokenizer) and ImageReward a
small WordPiece one, with the released models' embedding tables (49408 and 30524 rows): every prompt is
padded to the model's fixed length (77 or 35 tokens), so the vocabulary changes neither the work per prompt nor
the parameter count. Weights are N(0, 0.02) (norm scales 1); values change no CPU cost, except denormal
numbers, which the command line run flushes to zero (torch.set_flush_denormal).

Images: `--images` seeded colour fields (a 6 x 6 grid of random colours, bilinearly upsampled, plus 20% pixel
noise), float32 in [0, 1], `--size` square; for ocr the same backgrounds with the prompt's quoted text drawn
dark on a light panel; for shapes, renders of its prompts at the 32 x 32 its scorer reads (shapes.detect
indexes with a 32 x 32 grid, so other sizes fail). Prompts: realistic ones per reward (GenEval's grammar for
geneval, a quoted text for ocr). Each reward is called once on 2 images first (loading the model and paying
first-call costs; reported as "load"), then the whole batch is timed `--repeats` times (the median is
reported). Machine facts (versions, threads, CPUs, memory, the load average before and after each reward) go
into the JSON, so that contention can be judged.

    python benchmarks/time_rewards.py          # every reward at real size: 64 images of 512 px, 2 threads
    python benchmarks/time_rewards.py --rewards hpsv2 imagereward --out /tmp/reward_timing.json
    python benchmarks/time_rewards.py --tiny --images 2 --size 64 --out /tmp/t.json   # the code path, seconds

The real sizes need about 10 GB of memory (hpsv2 while loading its checkpoint) and 4 GB of temporary disk.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

os.environ["HF_HUB_OFFLINE"] = "1"  # every model is built here: nothing may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import rewards as R  # noqa: E402
from gpu_memory import save_reward_model  # noqa: E402 (the CLIP ViT-H/14 and ViT-L/14 builds its tests check)

RewardName = Literal["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward", "geneval", "ocr", "shapes"]
REWARD_NAMES: tuple[RewardName, ...] = ("pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward", "geneval",
                                        "ocr", "shapes")


@dataclass
class Args:
    rewards: tuple[RewardName, ...] = REWARD_NAMES
    """the rewards to time, in this order"""
    images: int = 64
    """images in the timed batch"""
    size: int = 512
    """image side in pixels (square images)"""
    threads: int = 2
    """torch CPU threads (torch.set_num_threads; the OCR's onnxruntime takes the same number)"""
    repeats: int = 1
    """timed calls on the whole batch, after one warm-up call on 2 images; the median is reported"""
    batch_size: int = R.BATCH_SIZE
    """images per forward pass of a reward model (rewards.BATCH_SIZE, set for the run)"""
    tiny: bool = False
    """tiny models of the same architectures instead of the real sizes (and GenEval's test scale 64 px): for the test"""
    seed: int = 0
    """seed of the images and the random weights"""
    out: Path = ROOT / "benchmarks" / "results" / "reward_timing.json"
    """write the results here as JSON"""


# ------------------------------------------------------------------------------------------------
# Prompts and images
# ------------------------------------------------------------------------------------------------
PROMPTS = ["a photo of a red car and a blue dog", "a watercolor of a cat sleeping on a sunny windowsill",
           "a studio portrait of an old fisherman with a grey beard, dramatic lighting",
           "a bowl of ramen with an egg on a wooden table, seen from above",
           "a castle on a cliff above a stormy sea at sunset, oil painting",
           "a corgi wearing sunglasses on a skateboard in the city"]
GENEVAL_PROMPTS = ["a photo of a red car and a blue dog", "a photo of three cats",
                   "a photo of a dog left of a teddy bear", "a photo of a green bench", "a photo of a bicycle",
                   "a photo of a cup and a clock"]
OCR_PROMPTS = ['a sign that says "OPEN LATE"', 'a poster with the words "GRAND OPENING"',
               'a t-shirt printed with "HELLO WORLD"', 'a neon sign reading "COFFEE 24H"']
IMAGES = ("seeded colour fields: a 6 x 6 grid of uniform random colours upsampled bilinearly, 0.8 of it plus 0.2 "
          "uniform pixel noise, float32 in [0, 1]; for ocr a light panel with the prompt's quoted text drawn dark on "
          "it; for shapes the shapes world's own 32 x 32 renders of its prompts (its scorer reads no other size)")


def prompts_for(name: str, n: int) -> list[str]:
    pool = {"geneval": GENEVAL_PROMPTS, "ocr": OCR_PROMPTS, "shapes": None}.get(name, PROMPTS)
    if pool is None:  # the shapes world's own grammar
        import shapes

        pool = [p for ps in shapes.all_prompts().values() for p in ps][::9]  # 15, every category
    return [pool[i % len(pool)] for i in range(n)]


def make_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear",
                                             align_corners=False)
    return (0.8 * coarse + 0.2 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def draw_text(image: torch.Tensor, text: str) -> torch.Tensor:
    """The image with `text` drawn dark on a light panel across its middle (PIL's default font)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    size = image.shape[-1]
    im = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=max(8, size // 12))
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    left, top = max((size - (x1 - x0)) // 2, 0), (size - (y1 - y0)) // 2
    pad = max(2, size // 40)
    draw.rectangle((left - pad, top - pad, left + x1 - x0 + pad, top + y1 - y0 + pad), fill=(235, 230, 220))
    draw.text((left - x0, top - y0), text, fill=(20, 20, 60), font=font)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def images_for(name: str, base: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
    if name == "shapes":  # the shapes world's scorer reads its own 32 x 32 images: renders of the prompts
        import random

        import shapes

        return torch.stack([shapes.render_prompt(p, random.Random(seed + i)) for i, p in enumerate(prompts)])
    if name == "ocr":
        return torch.stack([draw_text(img, R.quoted_text(p)) for img, p in zip(base, prompts)])
    return base


# ------------------------------------------------------------------------------------------------
# The models, in the layouts rewards.py loads
# ------------------------------------------------------------------------------------------------
# open_clip ViT-H-14 (HPS-v2.1): widths, blocks, MLP widths; heads follow from rewards.HPSV2_HEAD_WIDTHS
OPEN_CLIP = {"full": dict(width=1280, layers=32, mlp=5120, patch=14, image=224, t_width=1024, t_layers=24, t_mlp=4096,
                          positions=77, vocab=49408, embed=1024),
             "tiny": dict(width=160, layers=2, mlp=640, patch=8, image=32, t_width=128, t_layers=2, t_mlp=512,
                          positions=77, vocab=None, embed=24)}
# ImageReward-v1.0's state dict; heads are rewards.IMAGEREWARD_HEADS (16, 12) at both sizes
IMAGEREWARD = {"full": dict(width=1024, blocks=24, patch=16, grid=14, mlp=4096, t_width=768, t_layers=12, t_mlp=3072,
                            positions=512, vocab=30524, embed=256),
               "tiny": dict(width=32, blocks=1, patch=8, grid=4, mlp=64, t_width=24, t_layers=1, t_mlp=48, positions=40,
                            vocab=None, embed=16)}
# Mask2Former Swin-S COCO instance (facebook/mask2former-swin-small-coco-instance's config)
MASK2FORMER = {"full": dict(swin=dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                                      drop_path_rate=0.3),
                            feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_feedforward_dim=1024,
                            encoder_layers=6, decoder_layers=10, num_attention_heads=8, dim_feedforward=2048,
                            num_queries=100),
               "tiny": dict(swin=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7),
                            feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                            num_queries=8)}
BERT_WORDS = ["a", "an", "the", "of", "and", "on", "in", "with", "photo", "red", "blue", "green", "car", "dog", "cat",
              "sleeping", "sunny", "portrait", "old", "man", "bowl", "table", "castle", "sea", "sunset", "painting",
              "city", "##s", "##ing", "##ed"]


def clip_tokenizer(max_length: int = 77):
    from shapes import build_clip_tokenizer

    words = PROMPTS + GENEVAL_PROMPTS + [f"a photo of a {c}-colored object" for c in R.GENEVAL_COLORS]
    return build_clip_tokenizer(words, 400, max_length)


def _rnd(g: torch.Generator, shape, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def open_clip_state(c: dict, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's names in ViT-H-14's layout (as tests/test_reward_hps.py builds them
    tiny), float16 as the "compressed" release stores them."""
    g, h = torch.Generator().manual_seed(seed), torch.float16
    w, tw = c["width"], c["t_width"]
    sd = {"visual.conv1.weight": _rnd(g, (w, 3, c["patch"], c["patch"]), h), "visual.class_embedding": _rnd(g, (w,), h),
          "visual.positional_embedding": _rnd(g, ((c["image"] // c["patch"]) ** 2 + 1, w), h),
          "visual.proj": _rnd(g, (w, c["embed"]), h), "token_embedding.weight": _rnd(g, (vocab, tw), h),
          "positional_embedding": _rnd(g, (c["positions"], tw), h), "text_projection": _rnd(g, (tw, c["embed"]), h),
          "logit_scale": torch.tensor(math.log(100.0), dtype=h)}
    for ln, width in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = torch.ones(width, dtype=h), torch.zeros(width, dtype=h)
    for tower, width, layers, mlp in (("visual.transformer", w, c["layers"], c["mlp"]),
                                      ("transformer", tw, c["t_layers"], c["t_mlp"])):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(width, dtype=h), torch.zeros(width, dtype=h)
            for name, out, inp in (("attn.in_proj_", 3 * width, width), ("attn.out_proj.", width, width),
                                   ("mlp.c_fc.", mlp, width), ("mlp.c_proj.", width, mlp)):
                sd[p + name + "weight"], sd[p + name + "bias"] = _rnd(g, (out, inp), h), torch.zeros(out, dtype=h)
    return sd


def imagereward_layout(width, blocks, patch, grid, mlp, t_width, t_layers, t_mlp, positions, vocab, embed):
    """name -> shape of every tensor of the original ImageReward module's state_dict() (the layout of
    tests/test_reward_imagereward.py's official_layout)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {v + "cls_token": (1, 1, width), v + "pos_embed": (1, grid * grid + 1, width),
              v + "patch_embed.proj.weight": (width, 3, patch, patch), v + "patch_embed.proj.bias": (width,)}
    for i in range(blocks):
        for name, out, inp in (("norm1", width, None), ("attn.qkv", 3 * width, width), ("attn.proj", width, width),
                               ("norm2", width, None), ("mlp.fc1", mlp, width), ("mlp.fc2", width, mlp)):
            shapes[f"{v}blocks.{i}.{name}.weight"] = (out, inp) if inp else (out,)
            shapes[f"{v}blocks.{i}.{name}.bias"] = (out,)
    shapes |= {v + "norm.weight": (width,), v + "norm.bias": (width,), t + "embeddings.position_ids": (1, positions),
               t + "embeddings.word_embeddings.weight": (vocab, t_width),
               t + "embeddings.position_embeddings.weight": (positions, t_width),
               t + "embeddings.LayerNorm.weight": (t_width,), t + "embeddings.LayerNorm.bias": (t_width,)}
    for i in range(t_layers):
        parts = []
        for att, source in (("attention", t_width), ("crossattention", width)):
            parts += [(f"{att}.self.query", t_width, t_width), (f"{att}.self.key", t_width, source),
                      (f"{att}.self.value", t_width, source), (f"{att}.output.dense", t_width, t_width),
                      (f"{att}.output.LayerNorm", t_width, None)]
        parts += [("intermediate.dense", t_mlp, t_width), ("output.dense", t_width, t_mlp),
                  ("output.LayerNorm", t_width, None)]
        for name, out, inp in parts:
            shapes[f"{t}encoder.layer.{i}.{name}.weight"] = (out, inp) if inp else (out,)
            shapes[f"{t}encoder.layer.{i}.{name}.bias"] = (out,)
    for name, inp in (("vision_proj", width), ("text_proj", t_width)):
        shapes |= {f"blip.{name}.weight": (embed, inp), f"blip.{name}.bias": (embed,)}
    for j, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, t_width), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes |= {f"mlp.layers.{j}.weight": (out, inp), f"mlp.layers.{j}.bias": (out,)}
    return shapes


def random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[1]).expand(shape).clone()
        elif name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        elif "norm" in name.lower():
            state[name] = torch.ones(shape)
        else:
            state[name] = _rnd(g, shape)
    return state


def save_mask2former(size: str, folder: Path, seed: int) -> None:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    c = dict(MASK2FORMER[size])
    swin = SwinConfig(**c.pop("swin"), image_size=224, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, **c, num_labels=len(R.GENEVAL_OBJECTS),
                            id2label=dict(enumerate(R.GENEVAL_OBJECTS)))
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(cfg)
    model.save_pretrained(folder)
    del model
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], size_divisor=32, num_labels=80)))


def build_models(name: str, folder: Path, size: str, seed: int) -> dict[str, str]:
    """Build and save the models `name` loads under `folder`; return the $CLEANFLOWRL_MODEL_<KEY> values, one for
    each of rewards.model_keys(name). Every model built here is freed before this returns."""
    env: dict[str, str] = {}
    if name in ("pickscore", "clipscore", "aesthetic", "geneval"):
        kind = "clip_h" if name == "pickscore" else "clip_l"
        save_reward_model(kind, size, folder / kind, "cpu")  # config, weights, tokenizer, preprocessor, aesthetic MLP
        clip = str(folder / kind)
        env = {"pickscore": {"pickscore": clip, "pickscore_processor": clip}, "clipscore": {"clipscore": clip},
               "aesthetic": {"aesthetic_clip": clip, "aesthetic_mlp": str(folder / kind / "aesthetic.safetensors")},
               "geneval": {"geneval_clip": clip}}[name]
        if name == "geneval":
            (folder / "mask2former").mkdir()
            save_mask2former(size, folder / "mask2former", seed)
            env["geneval"] = str(folder / "mask2former")
    elif name == "hpsv2":
        tok = clip_tokenizer(OPEN_CLIP[size]["positions"])
        tok.save_pretrained(folder / "tokenizer")
        state = open_clip_state(OPEN_CLIP[size], OPEN_CLIP[size]["vocab"] or len(tok), seed)
        torch.save({"state_dict": state}, folder / "HPS_v2.1_compressed.pt")
        del state
        env = {"hpsv2": str(folder / "HPS_v2.1_compressed.pt"), "hpsv2_tokenizer": str(folder / "tokenizer")}
    elif name == "imagereward":
        from transformers import BertTokenizer

        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                                   *BERT_WORDS]) + "\n")
        BertTokenizer.from_pretrained(folder / "tokenizer").save_pretrained(folder / "tokenizer")
        c = dict(IMAGEREWARD[size])
        c["vocab"] = c["vocab"] or len(BERT_WORDS) + 5 + 2  # BLIP adds [DEC] and [ENC]
        state = random_state(imagereward_layout(**c), seed)
        torch.save(state, folder / "ImageReward.pt")
        del state
        env = {"imagereward": str(folder / "ImageReward.pt"), "imagereward_tokenizer": str(folder / "tokenizer")}
    elif name == "ocr":
        env = {"ocr": R._rapidocr_models()}  # the real PP-OCR models inside the rapidocr wheel
    free_memory()
    missing = set(R.model_keys(name)) - set(env)
    assert not missing, f"{name}: no model built for {missing}"
    return {f"CLEANFLOWRL_MODEL_{k.upper()}": v for k, v in env.items()}


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------
def free_memory() -> None:
    """Drop the cached reward models and give the freed memory back to the system (real models are GBs)."""
    R._MODELS.clear()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def loaded_parameters(name: str) -> dict[str, int]:
    """{model: parameters} of the torch modules the reward has loaded (none for ocr and shapes)."""
    keys = {name, "geneval_clip"} if name == "geneval" else {name}
    out: dict[str, int] = {}
    for (key, _, _), value in R._MODELS.items():
        if key in keys:
            for m in value if isinstance(value, tuple) else (value,):
                if isinstance(m, torch.nn.Module):
                    out[f"{key}: {type(m).__name__}"] = sum(p.numel() for p in m.parameters())
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def time_colour_check(images: torch.Tensor) -> dict:
    """GenEval's colour check (rewards.geneval_colors, CLIP ViT-L/14) on its own: one masked crop per image (the
    reward asks for each image's detections of a class in one call), and a new class name (its classifier: 3
    templates x 10 colours through the text tower, then one crop)."""
    n, _, h, w = images.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = ((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1  # a disc of half the image's side
    det = R.Detection((w / 4, h / 4, 3 * w / 4, 3 * h / 4), 1.0, mask)
    t0 = time.perf_counter()
    R.geneval_colors(images[0], "dog", [det])  # loads the CLIP; the classifier of "dog"
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        R.geneval_colors(images[i], "dog", [det])
    per_crop = (time.perf_counter() - t0) / n
    new = []
    for classname in ("car", "cup", "bench"):
        t0 = time.perf_counter()
        R.geneval_colors(images[0], classname, [det])
        new.append(time.perf_counter() - t0)
    return {"load_seconds": load, "crops": n, "seconds_per_crop": per_crop,
            "seconds_per_new_class_name": max(statistics.median(new) - per_crop, 0.0), "new_class_names": len(new)}


def measure(name: str, args: Args, base: torch.Tensor, size: str) -> dict:
    prompts = prompts_for(name, args.images)
    images = images_for(name, base, prompts, args.seed)
    row: dict = {"image_side": images.shape[-1], "prompts": list(dict.fromkeys(prompts)),
                 "loadavg_before": load_average()}
    with tempfile.TemporaryDirectory(prefix=f"time_rewards_{name}_") as tmp:
        t0 = time.perf_counter()
        env = build_models(name, Path(tmp), size, args.seed)
        row["build_seconds"] = time.perf_counter() - t0
        row["models"] = {k: v.replace(tmp, "<tmp>") for k, v in env.items()}
        with environment({**env, "CLEANFLOWRL_REWARD_DEVICE": "cpu"}):
            reward = R.make_reward(name)  # checks that every model is where rewards.py looks
            t0 = time.perf_counter()
            reward(images[:2], prompts[:2])
            row["load_seconds"] = time.perf_counter() - t0  # loading + the first call on 2 images
            colour_crops: list[int] = []
            geneval_colors = R.geneval_colors

            def counting(image, classname, dets):
                colour_crops.append(len(dets))
                return geneval_colors(image, classname, dets)

            R.geneval_colors = counting
            times = []
            try:
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    scores, _ = reward(images, prompts)
                    times.append(time.perf_counter() - t0)
            finally:
                R.geneval_colors = geneval_colors
            if name == "geneval":
                row["colour_crops_in_batch"] = sum(colour_crops) // args.repeats
                row["colour_check"] = time_colour_check(images)
            by_model = loaded_parameters(name)
        free_memory()
    seconds = statistics.median(times)
    row.update(seconds=seconds, seconds_per_image=seconds / args.images, seconds_all=times,
               parameters=sum(by_model.values()) if by_model else None, parameters_by_model=by_model,
               scores_finite=bool(torch.isfinite(scores).all()), score_mean=float(scores.float().mean()),
               loadavg_after=load_average())
    return row


def machine() -> dict:
    import transformers

    facts = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(AttributeError):
        facts["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(ImportError):
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
        facts["cpu"] = names[0] if names else None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
        facts["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    return facts


def command(args: Args) -> str:
    flags = ["--rewards", *args.rewards] if tuple(args.rewards) != REWARD_NAMES else []
    for field in ("images", "size", "threads", "repeats", "batch_size", "seed"):
        if getattr(args, field) != getattr(Args, field):
            flags += [f"--{field.replace('_', '-')}", str(getattr(args, field))]
    flags += ["--tiny"] if args.tiny else []
    if Path(args.out).resolve() != Args.out.resolve():
        flags += ["--out", str(args.out)]
    return shlex.join(["python", "benchmarks/time_rewards.py", *flags])


def _millions(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}" if n >= 1e6 else f"{n / 1e6:.3f}"


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    n = s["images"]
    what = "tiny models" if s["tiny"] else "real-size architectures, random weights"
    threads = f"{s['threads']} torch thread{'s' if s['threads'] != 1 else ''}"
    lines = [f"Seconds per {n} images at {s['size']} x {s['size']} on the CPU ({what}; {threads} on "
             f"{m.get('cpus_usable', m['cpu_count'])} CPUs; BATCH_SIZE {s['batch_size']}; load average (1, 5, 15 min) "
             f"{result['loadavg_start']} at the start, {result['loadavg_end']} at the end)",
             "", f"| reward | parameters (M) | s / {n} images | s / image | load + first call on 2 images (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in result["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {_millions(r['parameters'])} | {r['seconds']:.2f} | {r['seconds_per_image']:.3f} | "
                     f"{r['load_seconds']:.1f} |")
    if "seconds_per_image" in result["results"].get("shapes", {}):
        lines += ["", "shapes: on the shapes world's 32 x 32 renders (its scorer reads no other size)."]
    if "colour_check" in result["results"].get("geneval", {}):
        g = result["results"]["geneval"]
        c, (a, b) = g["colour_check"], s["geneval_test_scale"]
        crops = g["colour_crops_in_batch"]
        kept = ("no object, so the batch time is the detector's" if crops == 0 else
                f"{crops} objects, whose colour checks are in the batch time")
        per_crop, per_name = c["seconds_per_crop"], c["seconds_per_new_class_name"]
        lines += ["", f"geneval: images resized to fit {a} x {b} for the detector, which kept {kept}; the colour check "
                      f"(CLIP) costs {per_crop:.2f} s per crop and {per_name:.2f} s per new class name (its 30-prompt "
                      f"classifier)."]
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.images < 1 or args.repeats < 1 or args.size < 16 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--images, --repeats, --batch-size and --threads must be at least 1, --size at least 16")
    size = "tiny" if args.tiny else "full"
    old_threads, old_batch, old_scale = torch.get_num_threads(), R.BATCH_SIZE, R.GENEVAL_TEST_SCALE
    torch.set_num_threads(args.threads)
    R.BATCH_SIZE = args.batch_size
    if args.tiny:
        R.GENEVAL_TEST_SCALE = (64, 64)  # a tiny detector need not see 800 px (as the tests)
    try:
        result = {"command": command(args), "settings": {**asdict(args), "out": str(args.out),
                  "geneval_test_scale": list(R.GENEVAL_TEST_SCALE)},
                  "machine": machine(), "images": IMAGES, "loadavg_start": load_average(), "results": {}}
        base = make_images(args.images, args.size, args.seed)
        for name in dict.fromkeys(args.rewards):
            print(f"time_rewards: {name} ...", flush=True)
            try:
                r = result["results"][name] = measure(name, args, base, size)
            except Exception as e:  # a failed reward is a row of the table, not the end of a long run
                free_memory()
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                result["results"][name] = {"error": f"{type(e).__name__}: {first}", "seconds": None}
                print(f"time_rewards: {name} failed: {type(e).__name__}: {first}", flush=True)
                continue
            print(f"time_rewards: {name}: {r['seconds']:.2f} s for {args.images} images "
                  f"({r['seconds_per_image']:.3f} s each; built in {r['build_seconds']:.1f} s, loaded + first call "
                  f"{r['load_seconds']:.1f} s; "
                  f"load average {r['loadavg_before']} -> {r['loadavg_after']})", flush=True)
        result["loadavg_end"] = load_average()
    finally:
        torch.set_num_threads(old_threads)
        R.BATCH_SIZE, R.GENEVAL_TEST_SCALE = old_batch, old_scale
    table = markdown(result)
    result["table"] = table
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    failed = [name for name, r in result["results"].items() if "error" in r]
    if failed:
        raise SystemExit(f"time_rewards: {', '.join(failed)} failed (see {out})")
    return result


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    torch.set_flush_denormal(True)  # random weights must not be slowed by denormal numbers
    hf_logging.disable_progress_bar()
    main(tyro.cli(Args, description=__doc__))
