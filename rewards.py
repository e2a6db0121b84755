"""Reward functions: a registry `name -> fn(images, prompts) -> (scores, info)`.

images: (B, 3, H, W) float in [0, 1]; prompts: B strings; scores: (B,) float tensor; info: a dict of
(B,) tensors, NaN where a value does not apply (e.g. the strict accuracy of another category).
`make_reward("shapes:1.0,jpeg_compressibility:0.1")` builds the weighted sum of several.

Rewards: shapes (the embedded world), jpeg_compressibility / jpeg_incompressibility, and real models
loaded lazily through transformers: pickscore, clipscore, aesthetic, geneval (GenEval's evaluator: Mask2Former
and CLIP). ocr: PaddleOCR's PP-OCR detector and recogniser, run by rapidocr on onnxruntime.
imagereward: ImageReward-v1.0 on transformers' BLIP modules, from the official ImageReward.pt.
hpsv2: HPS-v2.1 (OpenCLIP ViT-H/14) on transformers' CLIPModel, from the official HPS_v2.1_compressed.pt. Each
model id comes from MODEL_IDS, overridable by $CLEANFLOWRL_MODEL_<KEY> (a hub id or a local folder).

Reward models are frozen (requires_grad False, eval mode) and every reward returns detached tensors: the
scores become advantages, and a graph through a reward model would be backpropagated into (and freed by)
the first update. `make_reward` checks, before anything loads, that every model its rewards need is on this
machine (or downloadable), and its sum refuses a reward whose scores require grad.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn

    return deco


@register("shapes")
def shapes_reward(images, prompts):
    """GenEval analogue on the shapes world: fraction of the prompt's clauses met (partial credit).
    info: strict accuracy (all clauses met), overall and per category."""
    from shapes import CATEGORIES, score

    partial, strict, cats = score(images, prompts)
    info = {"strict": strict}
    for c in CATEGORIES:
        mask = torch.tensor([x == c for x in cats])
        info[f"strict/{c}"] = torch.where(mask, strict, torch.full_like(strict, float("nan")))
    return partial, info


def _jpeg_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    from PIL import Image

    arr = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


@register("jpeg_compressibility")
def jpeg_compressibility(images, prompts):
    """DDPO's classic: minus the JPEG (quality 95) file size in kB; smaller files score higher."""
    return -_jpeg_kb(images), {}


@register("jpeg_incompressibility")
def jpeg_incompressibility(images, prompts):
    """DDPO's classic: the JPEG (quality 95) file size in kB; busier images score higher."""
    return _jpeg_kb(images), {}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'shapes' or 'shapes:1.0,jpeg_compressibility:0.1' -> [(name, weight), ...]."""
    out = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward weight {weight!r} for {name!r} is not a number (write e.g. {name}:0.5)") from None
        out.append((name, w))
    return out


def make_reward(spec: str) -> RewardFn:
    """The weighted sum of the rewards named in `spec`; info keeps each reward's raw score and info.

    Fails fast: raises RewardModelUnavailable (a ValueError, as a bad --reward is) naming every reward model
    that is missing and how to get it, before any model loads (see check_available). The sum refuses a
    reward that returns tensors requiring grad (a reward must be a constant to the policy's update)."""
    parts = parse_reward_spec(spec)
    check_available([name for name, _ in parts])

    def reward(images, prompts):
        total = torch.zeros(len(images))
        info: dict[str, torch.Tensor] = {}
        for name, w in parts:
            s, inf = REWARDS[name](images, prompts)
            graded = [k for k, v in {"scores": s, **inf}.items() if isinstance(v, torch.Tensor) and v.requires_grad]
            if graded:
                raise RuntimeError(
                    f"reward {name!r} returned {', '.join(graded)} that require grad: a reward must return detached "
                    f"tensors (score under torch.no_grad() and freeze its model with requires_grad_(False)), or the "
                    f"training update backpropagates into the reward model")
            s = s.float().cpu()
            if s.shape != (len(images),):
                raise ValueError(f"reward {name!r} returned scores of shape {tuple(s.shape)} for {len(images)} images")
            if not torch.isfinite(s).all():
                raise FloatingPointError(f"reward {name!r} returned non-finite scores")
            total += w * s
            if len(parts) > 1:
                info[name] = s
            info.update({k if k not in info else f"{name}/{k}": v for k, v in inf.items()})  # no clash overwrites
        return total, info

    return reward


# ----------------------------------------------------------------------------------------------
# Real reward models (GPU users). Each loads lazily on its first call, once per device, and scores
# in batches under torch.no_grad() on the images' device (or `DEVICE` / $CLEANFLOWRL_REWARD_DEVICE).
# Images are resized and normalised here, in torch, from the model's preprocessor_config.json (no
# transformers image processor: they need torchvision, and this keeps the work on the device).
# ----------------------------------------------------------------------------------------------
def _rapidocr_models() -> str:
    """The folder of PP-OCR models inside the installed rapidocr package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr")
    return str(Path(spec.origin).parent / "models") if spec and spec.origin else "rapidocr/models (pip install rapidocr)"


MODEL_IDS: dict[str, str] = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "clipscore": "openai/clip-vit-large-patch14",
    "aesthetic_clip": "openai/clip-vit-large-patch14",
    # LAION aesthetic predictor v2 (improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE), as the
    # copy TRL's DDPO example downloads: "<repo>/<file>" on the hub, or a local .pth / .safetensors path
    "aesthetic_mlp": "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
    # ImageReward-v1.0: the state dict the original's ImageReward.load downloads (utils.py:28, :41), and
    # the BERT tokenizer its BLIP builds (models/BLIP/blip.py:17)
    "imagereward": "THUDM/ImageReward/ImageReward.pt",
    "imagereward_tokenizer": "google-bert/bert-base-uncased",
    # HPS-v2.1: the open_clip state dict the hpsv2 package downloads (hpsv2/img_score.py:52, utils.py:16),
    # and the CLIP BPE tokenizer open_clip's ViT-H-14 uses (its vocabulary and merges, with "<|endoftext|>" as
    # the pad token, as OpenAI's CLIP saved it for transformers)
    "hpsv2": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "hpsv2_tokenizer": "openai/clip-vit-large-patch14",
    # OCR: a folder with a PP-OCR text detector and recogniser in ONNX; by default the ones the rapidocr
    # package ships (see the OCR section and docs/rewards.md)
    "ocr": _rapidocr_models(),
    # GenEval: the Mask2Former Swin-S COCO instance checkpoint (converted from the Mask2Former authors'
    # release; GenEval itself loads mmdet's, see docs/rewards.md) and the CLIP ViT-L/14 of its colour check
    "geneval": "facebook/mask2former-swin-small-coco-instance",
    "geneval_clip": "openai/clip-vit-large-patch14",
}
# The files each model must have, for the availability check (each entry a tuple of alternatives, any one
# will do); None: the id names one file. A key not listed here (a model of your own) is not checked.
_CONFIG = ("config.json",)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_PREPROCESSOR = ("preprocessor_config.json",)
MODEL_FILES: dict[str, tuple[tuple[str, ...], ...] | None] = {
    "pickscore": (_CONFIG, _WEIGHTS),
    "pickscore_processor": (_TOKENIZER, _PREPROCESSOR),
    "clipscore": (_CONFIG, _WEIGHTS, _TOKENIZER, _PREPROCESSOR),
    "aesthetic_clip": (_CONFIG, _WEIGHTS, _PREPROCESSOR),
    "aesthetic_mlp": None,
    "imagereward": None,
    "imagereward_tokenizer": (("tokenizer.json", "vocab.txt"),),
    "hpsv2": None,
    "hpsv2_tokenizer": (_TOKENIZER,),
    "ocr": (("det.onnx", "PP-OCRv6_det_small.onnx"), ("rec.onnx", "PP-OCRv6_rec_small.onnx")),
    "geneval": (_CONFIG, _WEIGHTS, _PREPROCESSOR),
    "geneval_clip": (_CONFIG, _WEIGHTS, _TOKENIZER, _PREPROCESSOR),
}
_FILE_NAMES = {_WEIGHTS: "the weights (model.safetensors or pytorch_model.bin)",
               _TOKENIZER: "a tokenizer (tokenizer.json or tokenizer_config.json)"}
DEVICE: str | None = None  # None: score on the images' device
BATCH_SIZE = 16  # images per forward pass of a reward model
PICKSCORE_DIVISOR = 26.0  # Flow-GRPO's reference divides logit_scale * cosine (~20-23) by 26
CLIPSCORE_DIVISOR = 30.0  # Flow-GRPO's clip_scorer.py returns logits_per_image.diagonal() / 30 (100 * cos / 30)
_MODELS: dict[tuple, object] = {}


class RewardModelUnavailable(RuntimeError, ValueError):
    """A reward model's weights are neither on this machine nor downloadable. A ValueError too: like an
    unknown reward name, it is a --reward the scripts cannot run, reported before the diffusion model loads."""


def model_id(key: str) -> str:
    """The model a reward loads: $CLEANFLOWRL_MODEL_<KEY> if set, else MODEL_IDS[key] (a leading ~ expanded)."""
    mid = os.environ.get(f"CLEANFLOWRL_MODEL_{key.upper()}", MODEL_IDS[key])
    return os.path.expanduser(mid) if mid.startswith("~") else mid


def model_keys(reward: str) -> list[str]:
    """The MODEL_IDS keys a reward loads: its own name and the keys prefixed by it (e.g. aesthetic_clip)."""
    return [k for k in MODEL_IDS if k == reward or k.startswith(reward + "_")]


def _device(images: torch.Tensor) -> torch.device:
    return torch.device(os.environ.get("CLEANFLOWRL_REWARD_DEVICE") or DEVICE or images.device)


def _frozen(model):
    """A reward model is a constant of the training: no gradients, eval mode (no dropout)."""
    return model.requires_grad_(False).eval()


def _pretrained(cls, mid: str, device):
    """A transformers model, frozen, on `device`; a pickled checkpoint (pytorch_model.bin) is unpickled with
    torch.load(weights_only=True), so it cannot run code."""
    return _frozen(cls.from_pretrained(mid, weights_only=True)).to(device)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _local_path(mid: str) -> Path | None:
    """The path a model id names if it looks like one (starts with / . or ~, or exists); None for a hub id."""
    path = Path(mid).expanduser()
    return path if mid.startswith(("/", ".", "~")) or path.is_absolute() or path.exists() else None


def _download_args(i: str) -> str:
    """'owner/repo' -> 'owner/repo'; 'owner/repo/file' -> 'owner/repo file'."""
    parts = i.split("/")
    return i if len(parts) <= 2 else "/".join(parts[:2]) + " " + "/".join(parts[2:])


def _lacking(have, groups) -> list[str]:
    return [_FILE_NAMES.get(g, " or ".join(g)) for g in groups if not any(have(f) for f in g)]


def _problem(key: str) -> tuple[str, str] | None:
    """(what is wrong with the model `key` names, how to get it), or None if it is here (or, online, may
    download). Looks only at the disk and the Hugging Face cache, never the network. In `how`, $ENV stands
    for the variables that override the model (missing_models merges the keys that share a model)."""
    mid, files = model_id(key), MODEL_FILES.get(key, ())
    env = f"CLEANFLOWRL_MODEL_{key.upper()}"
    default = MODEL_IDS[key]
    local = _local_path(mid)
    if local is not None:
        named = f"{local} (from ${env})" if env in os.environ else str(local)
        fix = "save the model there"
        if _local_path(default) is None:
            fix += f" (`hf download {_download_args(default)} --local-dir {local if files is not None else local.parent}`)"
        if env in os.environ:
            fix += f", or unset $ENV to use {default}"
        if files is None:
            if not local.exists():
                return f"the file {named} does not exist", fix
            if not local.is_file():
                return f"{named} is not a file", "point $ENV at the .pth or .safetensors file itself"
            return None
        if not local.exists():
            return f"the folder {named} does not exist", fix
        if not local.is_dir():
            return f"{named} is not a folder", "point $ENV at the model's folder (config.json, weights, ...)"
        lacks = _lacking(lambda f: (local / f).is_file(), files)
        return (f"the folder {named} lacks {', '.join(lacks)}", fix) if lacks else None
    if not _offline():
        return None  # a hub id downloads when the reward loads
    from huggingface_hub import try_to_load_from_cache

    repo, names = mid, files
    if files is None:  # "<owner>/<repo>/<file>"
        parts = mid.split("/")
        if len(parts) < 3:
            return f"{mid!r} is neither a local file nor '<owner>/<repo>/<file>' on the hub", "point $ENV at the file"
        repo, names = "/".join(parts[:2]), (("/".join(parts[2:]),),)
    try:
        lacks = _lacking(lambda f: isinstance(try_to_load_from_cache(repo, f), str), names)
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id
        return f"{mid!r} is neither an existing local path nor a hub id ('<owner>/<name>')", "point $ENV at a local copy"
    if not lacks:
        return None
    how = f"download it where the hub is reachable with `hf download {_download_args(mid)}`, or point $ENV at a local copy"
    if files is None or len(lacks) == len(names):
        return f"{mid!r} is not in the Hugging Face cache", how
    return f"{mid!r} is only partly in the Hugging Face cache (it lacks {', '.join(lacks)})", how


def missing_models(rewards: list[str]) -> list[str]:
    """One line per model the named rewards need and this machine lacks: what is missing and how to get it."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (what, how) -> [(reward (key), variable)]
    lines = []
    for r in dict.fromkeys(rewards):
        for key in model_keys(r):
            problem = _problem(key)
            if problem is not None:
                found.setdefault(problem, []).append((r if key == r else f"{r} ({key})", f"$CLEANFLOWRL_MODEL_{key.upper()}"))
    for (what, how), users in found.items():
        envs = list(dict.fromkeys(e for _, e in users))
        lines.append(f"{', '.join(u for u, _ in users)}: {what}; {how.replace('$ENV', ' or '.join(envs))}")
    return lines


def check_available(rewards: list[str]) -> None:
    """Raise one RewardModelUnavailable naming every model the rewards need and lack (see missing_models)."""
    lines = missing_models(rewards)
    if lines:
        raise RewardModelUnavailable(_unavailable_message(lines))


def _unavailable_message(lines: list[str]) -> str:
    note = " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if _offline() else ""
    out = f"reward models missing{note}:\n" + "\n".join(f"  - {line}" for line in lines)
    if "`hf download" in out:
        out += "\n(with huggingface_hub < 1.0 the command is `huggingface-cli download`)"
    return out


def _cached(key: str, device: torch.device, load):
    """load() once per (model ids, device); a missing model becomes one clear RewardModelUnavailable."""
    ids = tuple(model_id(k) for k in model_keys(key))
    ck = (key, ids, str(device))
    if ck not in _MODELS:
        try:
            _MODELS[ck] = load()
        except RewardModelUnavailable:
            raise
        except (OSError, ValueError) as e:  # transformers / huggingface_hub: not cached, offline, no repo
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            lines = missing_models([key]) or [
                f"{key}: {' and '.join(repr(i) for i in ids)} could not be loaded; download "
                f"{' and '.join(f'`hf download {_download_args(i)}`' for i in ids if _local_path(i) is None) or 'it'} "
                f"where the hub is reachable, or point {', '.join(f'$CLEANFLOWRL_MODEL_{k.upper()}' for k in model_keys(key))} "
                f"at a local copy"]
            raise RewardModelUnavailable(f"{_unavailable_message(lines)}\nCause: {type(e).__name__}: {first}") from None
    return _MODELS[ck]


def _hub_file(repo_or_dir: str, filename: str) -> Path:
    if Path(repo_or_dir).is_dir():
        path = Path(repo_or_dir) / filename
        if not path.is_file():
            raise OSError(f"{path} does not exist")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_or_dir, filename))


def _side(v, default: int) -> tuple[int, int]:
    """(height, width) from a preprocessor size entry: an int, {"height", "width"} or {"shortest_edge"}."""
    if v is None:
        return default, default
    if isinstance(v, int):
        return v, v
    if "height" in v:
        return v["height"], v["width"]
    return v["shortest_edge"], v["shortest_edge"]


class _Pre:
    """CLIP image preprocessing from a preprocessor_config.json, in torch: resize the short side (bicubic,
    antialiased), centre-crop, normalise."""

    def __init__(self, repo_or_dir: str):
        cfg = json.loads(_hub_file(repo_or_dir, "preprocessor_config.json").read_text())
        self.mean = torch.tensor(cfg.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)
        self.size = _side(cfg.get("size"), 224)
        self.crop = _side(cfg.get("crop_size"), self.size[0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.float().clamp(0, 1)
        h, w = x.shape[-2:]
        s = self.size[0]  # the short side to s, the long side truncated to int(s * long / short), as transformers
        size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        x = F.interpolate(x, size=(max(size[0], self.crop[0]), max(size[1], self.crop[1])),
                          mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        return ((x.clamp(0, 1) - self.mean.to(x.device)) / self.std.to(x.device))


def _embeds(out) -> torch.Tensor:
    """get_image_features / get_text_features return a tensor (transformers 4) or an output whose
    pooler_output is the projected embedding (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tokenize(tokenizer, texts: list[str], max_positions: int, device) -> dict:
    n = min(tokenizer.model_max_length, max_positions)
    t = tokenizer(texts, padding="max_length", truncation=True, max_length=n, return_tensors="pt")
    return {"input_ids": t["input_ids"].to(device), "attention_mask": t["attention_mask"].to(device)}


def _chunks(n: int):
    for i in range(0, n, BATCH_SIZE):
        yield slice(i, min(i + BATCH_SIZE, n))


def _clip_cosine(key: str, images: torch.Tensor, prompts: list[str], processor_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of CLIP image and text embeddings, and the model's logit scale exp(logit_scale) (both detached,
    float32, on the CPU)."""
    from transformers import AutoTokenizer, CLIPModel

    dev = _device(images)

    def load():
        proc = model_id(processor_key)
        return _pretrained(CLIPModel, model_id(key), dev), AutoTokenizer.from_pretrained(proc), _Pre(proc)

    model, tok, pre = _cached(key, dev, load)
    out = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            img = _embeds(model.get_image_features(pixel_values=pre(images[sl].to(dev))))
            txt = _embeds(model.get_text_features(**_tokenize(
                tok, list(prompts[sl]), model.config.text_config.max_position_embeddings, dev)))
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            out.append((img * txt).sum(-1))
        scale = model.logit_scale.exp().float()
    return torch.cat(out).cpu(), scale.cpu()


@register("pickscore")
def pickscore(images, prompts):
    """PickScore (Kirstain et al. 2023): logit_scale * cosine(image, prompt) of the PickScore_v1 CLIP-H,
    divided by PICKSCORE_DIVISOR (26, as Flow-GRPO's reference, so typical scores sit near 0.8-0.9)."""
    cos, scale = _clip_cosine("pickscore", images, prompts, "pickscore_processor")
    return scale * cos / PICKSCORE_DIVISOR, {}


@register("clipscore")
def clipscore(images, prompts):
    """CLIPScore on Flow-GRPO's scale: logit_scale * cosine of the CLIP ViT-L/14 image and prompt embeddings,
    divided by CLIPSCORE_DIVISOR (100 * cos / 30, about 3.3 x the cosine, no clamp; typical matched pairs
    score 0.7-1.2). The raw cosine is this times 0.3 (see docs/rewards.md, "Scales")."""
    cos, scale = _clip_cosine("clipscore", images, prompts, "clipscore")
    return scale * cos / CLIPSCORE_DIVISOR, {}


# ----------------------------------------------------------------------------------------------
# HPS-v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2): OpenCLIP's ViT-H/14 fine-tuned on human preference
# pairs. The score is the cosine of the normalised image and prompt embeddings, the diagonal of their
# product with no logit scale (hpsv2/img_score.py:77-81; model(image, text) returns normalised features,
# src/open_clip/model.py:246-248), so typical scores sit near 0.25-0.40. The checkpoint is an open_clip
# state dict. transformers' CLIPModel is the same network (pre-LayerNorm ViT pooled at the class token,
# exact GELU, a causal text transformer pooled at the end-of-text token, bias-free projections), so the
# official file loads into it through HPSV2_KEYS, a table from open_clip's names to transformers'. (The
# open-clip-torch package itself needs torchvision, whose Linux wheels on the package index require a CUDA
# build of torch.)
# ----------------------------------------------------------------------------------------------
HPSV2_HEAD_WIDTHS = (80, 64)  # attention head width of ViT-H-14's image and text towers (ViT-H-14.json)
HPSV2_RGB_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / _STD (factory.py:231)
HPSV2_RGB_STD = (0.26862954, 0.26130258, 0.27577711)
_OC_TOWERS = ((r"visual\.transformer", "vision_model.encoder"), (r"transformer", "text_model.encoder"))
_OC_BLOCK = ((r"ln_1", "layer_norm1"), (r"attn\.out_proj", "self_attn.out_proj"), (r"ln_2", "layer_norm2"),
             (r"mlp\.c_fc", "mlp.fc1"), (r"mlp\.c_proj", "mlp.fc2"))
# open_clip's names (regex) -> transformers' CLIPModel names
HPSV2_KEYS: tuple[tuple[str, str], ...] = (
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"visual\.proj", "visual_projection.weight"),  # transposed: open_clip computes x @ proj
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"text_projection", "text_projection.weight"),  # transposed
    (r"logit_scale", "logit_scale"),  # not used by the score
    # the residual blocks of both towers ...
    *((rf"{tower}\.resblocks\.(\d+)\.{a}\.(weight|bias)", rf"{ours}.layers.\1.{b}.\2")
      for tower, ours in _OC_TOWERS for a, b in _OC_BLOCK),
    # ... and nn.MultiheadAttention's packed query/key/value projection, split in three by hpsv2_state_dict
    *((rf"{tower}\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rf"{ours}.layers.\1.self_attn.in_proj.\2")
      for tower, ours in _OC_TOWERS),
)


def hpsv2_state_dict(original: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The open_clip state dict's tensors under transformers' CLIPModel names, in float32 (projections
    transposed, packed attention projections split into q, k, v). A key the table does not know is an error
    that names it."""
    state, unknown = {}, []
    for name, tensor in original.items():
        match = next((re.sub(p, ours, name) for p, ours in HPSV2_KEYS if re.fullmatch(p, name)), None)
        if match is None:
            unknown.append(name)
            continue
        tensor = tensor.float()
        if name in ("visual.proj", "text_projection"):  # (width, embed), applied as x @ proj
            tensor = tensor.T.contiguous()
        if ".in_proj." in match:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                state[match.replace("in_proj", part)] = t.contiguous()
        else:
            state[match] = tensor
    if unknown:
        raise RewardModelUnavailable(f"hpsv2: {source} is not in the layout of HPS-v2.1's open_clip state dict "
                                     f"(xswu/HPSv2, HPS_v2.1_compressed.pt): unknown keys {_few(unknown)}")
    return state


def _hpsv2_config(original: dict[str, torch.Tensor], tokenizer):
    """The CLIPConfig of an open_clip ViT state dict: sizes from the tensors' shapes, head counts from
    ViT-H-14's head widths, the rest as open_clip (exact GELU, LayerNorm eps 1e-5); token ids from the tokenizer."""
    from transformers import CLIPConfig

    def count(prefix):
        return 1 + max(int(m.group(1)) for k in original if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))

    width, _, _, patch = original["visual.conv1.weight"].shape
    grid = round((original["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = original["token_embedding.weight"].shape
    if width % HPSV2_HEAD_WIDTHS[0] or text_width % HPSV2_HEAD_WIDTHS[1]:
        raise ValueError(f"widths {width}, {text_width} are not multiples of ViT-H-14's head widths "
                         f"{HPSV2_HEAD_WIDTHS}")
    vision = dict(hidden_size=width, num_attention_heads=width // HPSV2_HEAD_WIDTHS[0],
                  intermediate_size=original["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=count("visual.transformer.resblocks."), image_size=grid * patch, patch_size=patch,
                  hidden_act="gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=vocab, hidden_size=text_width, num_attention_heads=text_width // HPSV2_HEAD_WIDTHS[1],
                intermediate_size=original["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=count("transformer.resblocks."), hidden_act="gelu", layer_norm_eps=1e-5,
                max_position_embeddings=original["positional_embedding"].shape[0], bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=original["text_projection"].shape[1])


def load_hpsv2(spec: str, tokenizer, device="cpu"):
    """HPS-v2.1 as a transformers CLIPModel, from the official checkpoint (a dict whose "state_dict" holds the
    open_clip model's tensors, as hpsv2/img_score.py:54-55 reads it) or a bare state dict in its layout;
    frozen, float32, on `device`. Every weight must come from the file."""
    from transformers import CLIPModel

    original, path = _state_dict_file(spec)
    if isinstance(original.get("state_dict"), dict):
        original = original["state_dict"]
    state = hpsv2_state_dict(original, str(path))
    try:
        config = _hpsv2_config(original, tokenizer)
    except (KeyError, ValueError) as e:  # a tensor the sizes are read from is absent, or they are not ViT-H-14's
        raise RewardModelUnavailable(f"hpsv2: {path} is not HPS-v2.1's open_clip ViT-H-14 state dict: "
                                     f"{type(e).__name__}: {e}") from None
    model, info = CLIPModel.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                            dtype=torch.float32, ignore_mismatched_sizes=True)  # reported below
    wrong = sorted(info["missing_keys"]) + [f"{k} {tuple(a)}, not {tuple(b)}" for k, a, b in info["mismatched_keys"]]
    if wrong:
        raise RewardModelUnavailable(f"hpsv2: {path} lacks weights of HPS-v2.1 (named as transformers' CLIPModel) "
                                     f"or has them in other shapes: {_few(wrong)}")
    return _frozen(model).to(device)


def hpsv2_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The hpsv2 package's transform (create_model_and_transforms(light_augmentation=True): ToTensor,
    ResizeMaxSize, Normalize; src/open_clip/transform.py:26-48, :145-147) on a batch in [0, 1], in torch:
    8-bit values (it scores PIL images); the long side to `size` (bicubic, antialiased, not rounded, the
    short side round(short * size / long)); black padding to a square, split evenly (the extra pixel
    right / bottom); OpenAI CLIP's mean and std."""
    import torch.nn.functional as F

    x = (images.float().clamp(0, 1) * 255).round() / 255
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    oh, ow = round(h * scale), round(w * scale)
    if (oh, ow) != (h, w):
        x = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
    ph, pw = size - oh, size - ow
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = torch.tensor(HPSV2_RGB_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(HPSV2_RGB_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@register("hpsv2")
def hpsv2(images, prompts):
    """HPS-v2.1: the cosine of the normalised image and prompt embeddings of the HPS-v2.1 ViT-H/14 (as the
    hpsv2 package's score(), hps_version="v2.1"; no logit scale, typical scores 0.25-0.40)."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    dev = _device(images)

    def load():
        tok = AutoTokenizer.from_pretrained(model_id("hpsv2_tokenizer"))
        return load_hpsv2(model_id("hpsv2"), tok, dev), tok

    model, tok = _cached("hpsv2", dev, load)
    size, positions = model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    out = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            img = _embeds(model.get_image_features(pixel_values=hpsv2_preprocess(images[sl].to(dev), size)))
            txt = _embeds(model.get_text_features(**_tokenize(tok, list(prompts[sl]), positions, dev)))
            out.append((F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1))
    return torch.cat(out).cpu(), {}


class AestheticMLP(torch.nn.Module):
    """LAION aesthetic predictor v2 head: an MLP (no activations, as the 'linearMSE' release) on the
    L2-normalised CLIP ViT-L/14 image embedding; outputs roughly a 1-10 rating."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def _load_aesthetic_mlp(spec: str) -> AestheticMLP:
    state, _ = _state_dict_file(spec)  # .safetensors, or a pickle read with weights_only=True
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return _frozen(mlp)


@register("aesthetic")
def aesthetic(images, prompts):
    """LAION aesthetic predictor v2: AestheticMLP on the normalised CLIP ViT-L/14 image embedding (raw
    rating, roughly 1-10; the prompt is not used)."""
    from transformers import CLIPModel

    dev = _device(images)

    def load():
        clip = model_id("aesthetic_clip")
        return _pretrained(CLIPModel, clip, dev), _Pre(clip), _load_aesthetic_mlp(model_id("aesthetic_mlp")).to(dev)

    model, pre, mlp = _cached("aesthetic", dev, load)
    out = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            emb = _embeds(model.get_image_features(pixel_values=pre(images[sl].to(dev)))).float()
            out.append(mlp(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1))
    return torch.cat(out).cpu(), {}


# ----------------------------------------------------------------------------------------------
# ImageReward-v1.0 (Xu et al. 2023, THUDM/ImageReward): a BLIP ViT-L/16 encodes the image; a BERT-base
# text encoder reads the prompt and cross-attends, in every layer, to all image tokens; an MLP maps the
# text encoder's [CLS] output to a raw score, reported as (raw - mean) / std. Here the encoders are
# transformers' BlipVisionModel and BlipTextModel (the same computation as the original's ViT and
# BERT), and the official ImageReward.pt (a plain state dict of the original's module) loads through
# IMAGEREWARD_KEYS, a table from its names to ours. References are to ImageReward/ImageReward.py of
# github.com/THUDM/ImageReward; the architecture is in ImageReward/models/BLIP/{blip,vit,med}.py there.
# ----------------------------------------------------------------------------------------------
IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py:80-81; score() returns (raw - mean) / std (:134)
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward.py:110: padding="max_length", truncation, max_length=35
IMAGEREWARD_RGB_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ImageReward.py:36 (CLIP's constants)
IMAGEREWARD_RGB_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_HEADS = (16, 12)  # attention heads of ViT-L (blip.py:35-36) and BERT-base (med_config.json)
# The original's state-dict names (regex) -> ours ("": in the checkpoint, not used by the score)
IMAGEREWARD_KEYS: tuple[tuple[str, str], ...] = (
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    # the BERT encoder: transformers' BlipTextModel kept med.py's names
    (r"blip\.text_encoder\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"text.embeddings.\1.weight"),
    (r"blip\.text_encoder\.embeddings\.LayerNorm\.(weight|bias)", r"text.embeddings.LayerNorm.\1"),
    (r"blip\.text_encoder\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"text.encoder.layer.\1.\2.self.\3.\4"),
    (r"blip\.text_encoder\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"text.encoder.layer.\1.\2.output.\3.\4"),
    (r"blip\.text_encoder\.encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)",
     r"text.encoder.layer.\1.intermediate.dense.\2"),
    (r"blip\.text_encoder\.encoder\.layer\.(\d+)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"text.encoder.layer.\1.output.\2.\3"),
    (r"mlp\.layers\.(0|2|4|6|7)\.(weight|bias)", r"head.layers.\1.\2"),  # the MLP (ImageReward.py:40-58)
    (r"blip\.text_encoder\.embeddings\.position_ids", ""),  # a buffer, 0..511
    (r"blip\.(vision_proj|text_proj)\.(weight|bias)", ""),  # BLIP's contrastive projections
)


def imagereward_key(name: str) -> str:
    """Our name for a key of the official checkpoint ("" if the score does not use it); KeyError if unknown."""
    for pattern, ours in IMAGEREWARD_KEYS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, ours, name) if ours else ""
    raise KeyError(name)


def imagereward_state_dict(original: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The official checkpoint's tensors under our names. A key the table does not know is an error that
    names it (the original loads with strict=False, which would score with random weights instead)."""
    state, unknown = {}, []
    for name, tensor in original.items():
        try:
            ours = imagereward_key(name)
        except KeyError:
            unknown.append(name)
            continue
        if ours:
            state[ours] = tensor
    if unknown:
        raise RewardModelUnavailable(f"imagereward: {source} is not in the layout of ImageReward-v1.0's state dict "
                                     f"(THUDM/ImageReward, ImageReward.pt): unknown keys {_few(unknown)}")
    return state


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _imagereward_configs(state: dict[str, torch.Tensor]):
    """BlipVisionConfig and BlipTextConfig of the model whose (our-named) weights are `state`: sizes from the
    tensors' shapes, the rest as the original (vit.py: LayerNorm eps 1e-6, exact GELU; med_config.json)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    def count(prefix):
        return 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))

    width = state["vision.embeddings.class_embedding"].shape[-1]
    patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state["vision.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count("vision.encoder.layers."), num_attention_heads=IMAGEREWARD_HEADS[0],
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    vocab, hidden = state["text.embeddings.word_embeddings.weight"].shape
    text = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=state["text.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=count("text.encoder.layer."), num_attention_heads=IMAGEREWARD_HEADS[1],
        max_position_embeddings=state["text.embeddings.position_embeddings.weight"].shape[0], hidden_act="gelu",
        layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True)  # builds the cross-attention layers; forward() runs it as a bidirectional encoder
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """ImageReward-v1.0: BLIP ViT image tokens -> BERT with cross-attention to them -> MLP on [CLS] ->
    (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD (ImageReward.py:121-134)."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticMLP(text_config.hidden_size)  # the same MLP layout (ImageReward.py:40-58)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision(pixel_values=pixel_values).last_hidden_state  # after the final LayerNorm
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
                         is_decoder=False, use_cache=False).last_hidden_state
        raw = self.head(text[:, 0].float()).squeeze(-1)  # the [CLS] token's output (ImageReward.py:132)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _state_dict_file(spec: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a local file or '<owner>/<repo>/<file>' on the hub; a pickle is read with
    torch.load(weights_only=True), so a checkpoint that would run code is refused."""
    parts = spec.split("/")
    if Path(spec).is_file():
        path = Path(spec)
    elif len(parts) >= 3 and _local_path(spec) is None:
        path = _hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    else:
        raise OSError(f"{spec!r} is neither a local file nor '<owner>/<repo>/<file>' on the hub")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path), path
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except pickle.UnpicklingError as e:
        raise RewardModelUnavailable(
            f"refusing to load {path}: it holds more than tensors, and unpickling it could run code "
            f"(torch.load weights_only=True failed: {str(e).strip().splitlines()[0]})") from None


def load_imagereward(spec: str, device="cpu") -> ImageRewardModel:
    """ImageReward-v1.0 from the official checkpoint (or one in its layout), frozen, on `device`."""
    original, path = _state_dict_file(spec)
    state = imagereward_state_dict(original, str(path))
    try:
        model = ImageRewardModel(*_imagereward_configs(state))
        missing = [k for k in model.state_dict() if k not in state]
    except (KeyError, ValueError) as e:  # a tensor the sizes are read from is absent
        missing = [str(e)]
    if missing:
        raise RewardModelUnavailable(f"imagereward: {path} lacks weights of ImageReward-v1.0 (named as ours): "
                                     f"{_few(missing)}")
    model.load_state_dict(state)  # strict: every weight comes from the checkpoint
    return _frozen(model).to(device)


def imagereward_tokenizer(spec: str):
    """bert-base-uncased's WordPiece tokenizer with BLIP's two added tokens, as the original's
    init_tokenizer (models/BLIP/blip.py:16-21); from a local folder or the Hugging Face cache."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(spec)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def imagereward_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The original's transform (ImageReward.py:30-37) on a batch in [0, 1], in torch: 8-bit values (it
    scores PIL images); Resize(size, bicubic): the short side to `size`, the long side to
    int(size * long / short), antialiased as PIL, rounded to 8 bits; CenterCrop(size) at
    int(round((side - size) / 2)); Normalize with CLIP's mean and std."""
    import torch.nn.functional as F

    x = (images.float().clamp(0, 1) * 255).round()
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    oh, ow = (size, long) if h <= w else (long, size)
    if (oh, ow) != (h, w):
        x = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
    top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
    x = x[..., top:top + size, left:left + size] / 255
    mean = torch.tensor(IMAGEREWARD_RGB_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGEREWARD_RGB_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@register("imagereward")
def imagereward(images, prompts):
    """ImageReward-v1.0 (Xu et al. 2023): the human-preference score of an image for its prompt, on the
    original's scale: (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD."""
    dev = _device(images)

    def load():
        model = load_imagereward(model_id("imagereward"), dev)
        return model, imagereward_tokenizer(model_id("imagereward_tokenizer"))

    model, tok = _cached("imagereward", dev, load)
    size = model.vision.config.image_size
    out = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            t = tok(list(prompts[sl]), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH,
                    return_tensors="pt")
            out.append(model(imagereward_preprocess(images[sl].to(dev), size), t["input_ids"].to(dev),
                             t["attention_mask"].to(dev)).float())
    return torch.cat(out).cpu(), {}


# ----------------------------------------------------------------------------------------------
# OCR: Flow-GRPO's reward (flow_grpo/ocr.py). A text detector and recogniser (PaddleOCR's PP-OCR models,
# run by RapidOCR on onnxruntime with the settings of Flow-GRPO's PaddleOCR 2.9.1 call) read the image;
# the text they read is compared with the first quoted span of the prompt.
# ----------------------------------------------------------------------------------------------
# RapidOCR settings equal to PaddleOCR(lang="en", use_angle_cls=False).ocr(image, cls=False) in PaddleOCR
# 2.9.1 (its tools/infer/utility.py defaults): DB detector on the image as given (longest side capped at
# 960), ImageNet normalisation, box threshold 0.6, unclip 1.5; no orientation classifier; recognised lines
# kept when their confidence is >= 0.5 (PaddleOCR's drop_score).
OCR_SETTINGS = {
    "Global.use_cls": False, "Global.use_preprocess_img": False, "Global.use_vertical_padding": False,
    "Global.text_score": 0.5, "Global.log_level": "error",
    "Det.limit_side_len": 960, "Det.limit_type": "max", "Det.thresh": 0.3, "Det.box_thresh": 0.6,
    "Det.unclip_ratio": 1.5, "Det.use_dilation": False, "Det.score_mode": "fast",
    "Det.mean": [0.485, 0.456, 0.406], "Det.std": [0.229, 0.224, 0.225],
    "Rec.rec_img_shape": [3, 48, 320], "Rec.rec_batch_num": 6,
}
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to render: its first double-quoted span ("..." or curly quotes), as Flow-GRPO
    takes prompt.split('"')[1]."""
    m = _QUOTED.search(prompt)
    text = None if m is None else m.group(1) if m.group(1) is not None else m.group(2)
    if not text or not text.replace(" ", ""):
        raise ValueError(f"the ocr reward needs the text to render in double quotes in the prompt, "
                         f"e.g. 'a sign that says \"OPEN\"'; got {prompt!r}")
    return text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward: both texts lower-cased with their spaces removed; d = 0 when the target
    occurs inside the recognised text, else their edit distance, clipped at len(target); 1 - d / len(target)."""
    r, t = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not t:
        raise ValueError("the ocr reward's target text is empty")
    d = 0 if t in r else levenshtein(r, t)
    return 1.0 - min(d, len(t)) / len(t)


def _ocr_engine():
    """RapidOCR on the detector and recogniser in the folder model_id("ocr") names (of the names MODEL_FILES
    lists, the first present), on the CPU as Flow-GRPO's PaddleOCR, with torch's thread count."""
    try:
        from rapidocr import RapidOCR
    except ImportError as e:
        raise RewardModelUnavailable(f"ocr: the rapidocr and onnxruntime packages are not installed "
                                     f"(pip install rapidocr onnxruntime): {e}") from None
    folder = Path(model_id("ocr"))
    det, rec = (next((folder / f for f in names if (folder / f).is_file()), None) for names in MODEL_FILES["ocr"])
    if det is None or rec is None:
        raise OSError(f"{folder} lacks the ocr detector or recogniser")  # _cached turns it into the check's message
    return RapidOCR(params={**OCR_SETTINGS, "Det.model_path": str(det), "Rec.model_path": str(rec),
                            "EngineConfig.onnxruntime.intra_op_num_threads": torch.get_num_threads()})


def read_text(images: torch.Tensor) -> list[str]:
    """The text read in each image: the recognised lines in the detector's reading order (top to bottom,
    then left to right), concatenated without separators, as Flow-GRPO joins PaddleOCR's result. Each image
    goes in as Flow-GRPO passes it: 8-bit RGB (PaddleOCR, like RapidOCR, takes an array as BGR)."""
    engine = _cached("ocr", torch.device("cpu"), _ocr_engine)
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    texts = []
    for a in arrays:
        out = engine(np.ascontiguousarray(a))
        texts.append("".join(t for t, s in zip(out.txts or (), out.scores or ()) if s > 0))
    return texts


@register("ocr")
def ocr(images, prompts):
    """Flow-GRPO's OCR reward: ocr_score(read_text(image), quoted_text(prompt)), in [0, 1].
    info: ocr/exact (1 where the score is 1: the target was read, possibly among other text)."""
    targets = [quoted_text(p) for p in prompts]  # fail on unquoted prompts before loading anything
    scores = torch.tensor([ocr_score(r, t) for r, t in zip(read_text(images), targets)])
    return scores, {"ocr/exact": (scores == 1).float()}


# ----------------------------------------------------------------------------------------------
# GenEval (Ghosh et al. 2023) as its evaluator scores an image (djghosh13/geneval, evaluation/
# evaluate_images.py): Mask2Former Swin-S COCO instance detections, colours by CLIP ViT-L/14 zero-shot on
# the masked object crop, positions from box centres. The prompt's grammar gives GenEval's metadata
# (geneval_metadata). Reward: Flow-GRPO's partial credit (its reward server's evaluate_reward), so it can
# be negative when far too many objects are found; info["strict"]: GenEval's own correct / incorrect.
# ----------------------------------------------------------------------------------------------
GENEVAL_OBJECTS = (  # GenEval's object_names.txt: the 80 COCO classes in the detector's label order
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
_IRREGULAR_PLURALS = {"person": "people", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
                      "knife": "knives", "computer mouse": "computer mice", "hair drier": "hair driers"}
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_NUMBERS = ("one", "two", "three", "four")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# The evaluator's settings (evaluate_images.py:286-290; Flow-GRPO's reward server uses the same values)
GENEVAL_THRESHOLD = 0.3  # a detection counts when its score is above this ...
GENEVAL_COUNTING_THRESHOLD = 0.9  # ... or above this for a counting prompt
GENEVAL_MAX_OBJECTS = 16  # at most this many detections of a class, the best
GENEVAL_MAX_OVERLAP = 1.0  # drop a detection whose IoU with a better kept one is >= this; 1.0 drops none
GENEVAL_POSITION_THRESHOLD = 0.1  # centre offsets shrink by this fraction of the two boxes' sides
# The detector's test pipeline, as GenEval runs mmdet's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco
GENEVAL_TEST_SCALE = (1333, 800)  # resize to fit within (long side, short side), keeping the aspect ratio
GENEVAL_SIZE_DIVISOR = 32  # then pad right and bottom with zeros (after normalising) to a multiple of this
GENEVAL_MAX_PER_IMAGE = 100  # the best (query, class) pairs kept per image
GENEVAL_CROP_GREY = 0x99 / 255  # colour crops show the object's mask on #999 grey


def plural(name: str) -> str:
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ObjectPhrase:
    name: str  # a GENEVAL_OBJECTS entry
    color: str | None  # None: any colour
    count: int | None  # None: one ("a dog"); else this many ("three dogs")


@dataclass(frozen=True)
class GenevalSpec:
    category: str
    phrases: tuple[ObjectPhrase, ...]
    relation: str | None = None  # phrases[0] <relation> phrases[1]


# English plurals (plural()) and GenEval's own ("persons", "knifes": its prompts add -es after s, else -s)
_NAMES = {**{n: n for n in GENEVAL_OBJECTS}, **{n + ("es" if n.endswith("s") else "s"): n for n in GENEVAL_OBJECTS},
          **{plural(n): n for n in GENEVAL_OBJECTS}}
_ALT = "|".join(re.escape(n) for n in sorted(_NAMES, key=len, reverse=True))
_GENEVAL_NP = re.compile(rf"^(a|an|{'|'.join(GENEVAL_NUMBERS)}) (?:({'|'.join(GENEVAL_COLORS)}) )?({_ALT})$")


def _object_phrase(text: str) -> ObjectPhrase:
    m = _GENEVAL_NP.match(text.strip())
    if m is None:
        raise ValueError(f"cannot parse {text!r} as a GenEval noun phrase such as 'a red car' or 'three dogs' "
                         f"(COCO object names, colours {', '.join(GENEVAL_COLORS)})")
    det, color, name = m.groups()
    return ObjectPhrase(_NAMES[name], color, None if det in ("a", "an") else GENEVAL_NUMBERS.index(det) + 1)


def parse_geneval(prompt: str) -> GenevalSpec:
    """'a photo of a red car and a blue dog' -> GenevalSpec; the 'a photo of' prefix is optional.
    Raises ValueError on prompts outside the grammar."""
    p = " ".join(prompt.strip().lower().rstrip(".").split())
    p = p.removeprefix("a photo of ").removeprefix("an image of ")
    for rel in GENEVAL_RELATIONS:
        if f" {rel} " in p:
            a, b = p.split(f" {rel} ", 1)
            return GenevalSpec("position", (_object_phrase(a), _object_phrase(b)), rel)
    parts = [_object_phrase(x) for x in p.split(" and ")]
    if len(parts) == 2:
        return GenevalSpec("color_attr" if all(x.color for x in parts) else "two_object", tuple(parts))
    if len(parts) != 1:
        raise ValueError(f"GenEval prompts name one or two objects; got {prompt!r}")
    (x,) = parts
    return GenevalSpec("colors" if x.color else "counting" if x.count else "single_object", (x,))


def geneval_metadata(spec: GenevalSpec) -> dict:
    """GenEval's metadata for a spec, as its prompts/create_prompts.py writes it: "include" clauses (class,
    count, optional color, and position [relation, index of the include it is relative to]) and, for
    counting, an "exclude" clause (count + 1 of the class is wrong). For "A right of B", B comes first."""
    def clause(ph: ObjectPhrase) -> dict:
        return {"class": ph.name, "count": ph.count or 1, **({"color": ph.color} if ph.color else {})}

    if spec.relation is not None:
        a, b = spec.phrases
        include = [clause(b), {**clause(a), "position": [spec.relation, 0]}]
    else:
        include = [clause(ph) for ph in spec.phrases]
    meta = {"tag": spec.category, "include": include}
    if spec.category == "counting":
        meta["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    return meta


@dataclass(eq=False)
class Detection:
    """One detected object: its box (x0, y0, x1, y1 in pixels, x1 and y1 exclusive, from the mask), its score
    (class probability times mean mask probability) and its mask (H, W) bool, or None."""

    box: tuple[float, float, float, float]
    score: float
    mask: torch.Tensor | None = None


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, 4) float boxes [x0, y0, x1 + 1, y1 + 1] around their pixels (mmdet's
    mask2bbox, which its Mask2Former reports as boxes); an empty mask gives zeros."""
    n, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # (N, W), (N, H)
    x = torch.arange(w, device=masks.device)
    y = torch.arange(h, device=masks.device)
    big = torch.tensor(max(h, w), device=masks.device)
    x0 = torch.where(cols, x, big).amin(1)
    x1 = torch.where(cols, x, -1).amax(1) + 1
    y0 = torch.where(rows, y, big).amin(1)
    y1 = torch.where(rows, y, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(cols.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def top_instances(class_logits: torch.Tensor, max_per_image: int | None = None):
    """Mask2Former instance inference, first half (mmdet's MaskFormerFusionHead.instance_postprocess): the
    softmax over classes + "no object", then the best max_per_image (default GENEVAL_MAX_PER_IMAGE)
    (query, class) pairs of the whole image. Returns their class probabilities, labels and query indices."""
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    top, flat = probs.flatten().topk(min(max_per_image or GENEVAL_MAX_PER_IMAGE, probs.numel()))
    return top, flat % probs.shape[1], flat // probs.shape[1]


def instance_masks(mask_logits: torch.Tensor, class_probs: torch.Tensor):
    """The second half: masks are the logits > 0; the score is the class probability times the mean mask
    probability inside the mask. (K, H, W) logits at image size, (K,) probabilities -> (masks, scores)."""
    masks = mask_logits > 0
    inside = masks.flatten(1).float()
    mask_score = (mask_logits.float().sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return masks, class_probs * mask_score


def _inclusive_iou(a, b) -> float:
    """IoU of two boxes with GenEval's pixel convention (a box [x0, x1] spans x1 - x0 + 1 pixels)."""
    def area(x0, y0, x1, y1):
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def select_detections(dets: list[Detection], threshold: float) -> list[Detection]:
    """GenEval's choice of the detections of one class: best first, score > threshold, at most
    GENEVAL_MAX_OBJECTS, then (unless GENEVAL_MAX_OVERLAP is 1) greedily drop any overlapping a kept one."""
    ranked = [d for d in sorted(dets, key=lambda d: -d.score) if d.score > threshold][:GENEVAL_MAX_OBJECTS]
    kept: list[Detection] = []
    while ranked:
        best = ranked.pop(0)
        kept.append(best)
        if GENEVAL_MAX_OVERLAP != 1:
            ranked = [d for d in ranked if _inclusive_iou(best.box, d.box) < GENEVAL_MAX_OVERLAP]
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Where box a lies relative to box b (GenEval's relative_position): the centre offset, shrunk towards
    zero by GENEVAL_POSITION_THRESHOLD times the sum of the two boxes' widths (heights for y), divided by the
    length of the unshrunk offset; a component beyond +-0.5 names a relation (y grows downwards)."""
    boxes = np.array([a.box, b.box], dtype=np.float64)  # (2, 4)
    offset = (boxes[0, :2] + boxes[0, 2:]) / 2 - (boxes[1, :2] + boxes[1, 2:]) / 2
    sizes = (boxes[:, 2:] - boxes[:, :2]).sum(0)
    shrunk = np.maximum(np.abs(offset) - GENEVAL_POSITION_THRESHOLD * sizes, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return ({"left of"} if dx < -0.5 else set()) | ({"right of"} if dx > 0.5 else set()) | \
        ({"above"} if dy < -0.5 else set()) | ({"below"} if dy > 0.5 else set())


ColorFn = Callable[[str, list[Detection]], list[str]]  # (class, its first detections) -> their colours


def geneval_correct(meta: dict, objects: dict[str, list[Detection]], colors: ColorFn) -> bool:
    """GenEval's verdict (evaluate_images.py, evaluate): every include clause finds at least `count` objects
    of its class; the best `count` of them have its colour; each of them is in the relation to each matched
    object of the clause it refers to; and no exclude clause finds `count` or more of its class."""
    correct, matched = True, []
    for req in meta.get("include", []):
        found = objects.get(req["class"], [])[:req["count"]]
        ok = len(found) >= req["count"]
        if ok and "color" in req:
            ok = colors(req["class"], found).count(req["color"]) >= req["count"]
        if ok and "position" in req:
            rel, target = req["position"]
            ok = matched[target] is not None and all(rel in relative_position(o, t) for o in found for t in matched[target])
        matched.append(found if ok else None)
        correct &= ok
    return correct and all(len(objects.get(r["class"], [])) < r["count"] for r in meta.get("exclude", []))


def geneval_partial(meta: dict, objects: dict[str, list[Detection]], colors: ColorFn) -> float:
    """Flow-GRPO's GenEval reward (its reward server, gen_eval.py evaluate_reward): the mean of per-clause
    credits. Each include clause gives 1 - |count - found| / count, over all found objects of its class (so
    it goes negative beyond twice the count). When found != count, a colour or position clause adds 0.
    Else a colour clause adds 1 - |count - objects of that colour| / count; a position clause adds 0 when
    its target clause did not match, else 1 when every pair is in the relation, and 0 and then 1 when one
    is not (the reference appends its 1 after the pair loop in either case): with both objects found once,
    a wrong position scores (1 + 1 + 0 + 1) / 4 = 3/4, not 2/3. Kept as the reference computes it."""
    credits, matched = [], []
    for req in meta.get("include", []):
        n, found = req["count"], objects.get(req["class"], [])
        credits.append(1 - abs(n - len(found)) / n)
        ok = len(found) == n
        if not ok:
            if "color" in req or "position" in req:
                credits.append(0.0)
        else:
            if "color" in req:
                k = colors(req["class"], found).count(req["color"])
                credits.append(1 - abs(n - k) / n)
                ok = k == n
            if "position" in req and ok:
                rel, target = req["position"]
                if matched[target] is None:
                    credits.append(0.0)
                    ok = False
                else:
                    if not all(rel in relative_position(o, t) for o in found for t in matched[target]):
                        credits.append(0.0)
                        ok = False
                    credits.append(1.0)
        matched.append(found if ok else None)
    return sum(credits) / len(credits) if credits else 0.0


def _geneval_detector(dev):
    """The Mask2Former instance model (frozen, on dev) and its normalisation (mean, std as (1, 3, 1, 1))."""
    from transformers import Mask2FormerForUniversalSegmentation

    mid = model_id("geneval")
    model = _pretrained(Mask2FormerForUniversalSegmentation, mid, dev)
    if model.config.num_labels != len(GENEVAL_OBJECTS):
        raise RewardModelUnavailable(f"geneval: {mid} detects {model.config.num_labels} classes, not COCO's 80; it must be a "
                                     f"COCO instance segmentation checkpoint such as {MODEL_IDS['geneval']}")
    cfg = json.loads(_hub_file(mid, "preprocessor_config.json").read_text())
    mean, std = torch.tensor(cfg["image_mean"]).float(), torch.tensor(cfg["image_std"]).float()
    if mean.max() > 1:  # some processor configs keep mmdet's 0-255 values
        mean, std = mean / 255, std / 255
    return model, mean.view(1, 3, 1, 1).to(dev), std.view(1, 3, 1, 1).to(dev)


def geneval_detect(images: torch.Tensor, wanted: list[set[str]], thresholds: list[float]) -> list[dict[str, list[Detection]]]:
    """Per image, {class: its detections as select_detections keeps them} for the classes in wanted[i] (the
    others are never scored: the evaluator looks only at the classes its metadata names). The pipeline is the
    evaluator's mmdet test pipeline: the 8-bit image, resized (bilinear) to fit GENEVAL_TEST_SCALE, normalised,
    zero-padded to a multiple of 32; masks upsampled to the padded input, cropped, resized to the image."""
    import torch.nn.functional as F

    dev = _device(images)
    model, mean, std = _cached("geneval", dev, lambda: _geneval_detector(dev))
    h, w = images.shape[-2:]
    scale = min(GENEVAL_TEST_SCALE[0] / max(h, w), GENEVAL_TEST_SCALE[1] / min(h, w))
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    ph, pw = -(-nh // GENEVAL_SIZE_DIVISOR) * GENEVAL_SIZE_DIVISOR, -(-nw // GENEVAL_SIZE_DIVISOR) * GENEVAL_SIZE_DIVISOR
    label = {n: i for i, n in enumerate(GENEVAL_OBJECTS)}
    out: list[dict[str, list[Detection]]] = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            x = _to_8bit(images[sl].to(dev))
            x = _to_8bit(F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False))
            x = F.pad((x - mean) / std, (0, pw - nw, 0, ph - nh))
            res = model(pixel_values=x)
            for k in range(len(x)):
                i = sl.start + k
                probs, labels, queries = top_instances(res.class_queries_logits[k])
                wanted_labels = torch.tensor([label[c] for c in wanted[i]], dtype=labels.dtype, device=labels.device)
                # the score is at most the class probability: a pair at or below the threshold cannot count
                keep = torch.isin(labels, wanted_labels) & (probs > thresholds[i])
                probs, labels, queries = probs[keep], labels[keep], queries[keep]
                dets: dict[str, list[Detection]] = {c: [] for c in wanted[i]}
                if len(queries):
                    logits = F.interpolate(res.masks_queries_logits[k][queries][None].float(), size=(ph, pw),
                                           mode="bilinear", align_corners=False)[..., :nh, :nw]
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
                    masks, scores = instance_masks(logits, probs)
                    for lab, s, box, m in zip(labels.tolist(), scores.tolist(), mask_boxes(masks).tolist(), masks.cpu()):
                        dets[GENEVAL_OBJECTS[lab]].append(Detection(tuple(box), s, m))
                out.append({c: kept for c, d in dets.items() if (kept := select_detections(d, thresholds[i]))})
    return out


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of the 8-bit PNG the evaluator reads (and of mmcv's uint8 resize)."""
    return (x.float().clamp(0, 1) * 255).round() / 255


def _geneval_clip(dev):
    from transformers import AutoTokenizer, CLIPModel

    mid = model_id("geneval_clip")
    return _pretrained(CLIPModel, mid, dev), AutoTokenizer.from_pretrained(mid), _Pre(mid), {}


def geneval_colors(image: torch.Tensor, classname: str, dets: list[Detection]) -> list[str]:
    """GenEval's colour of each detection: CLIP ViT-L/14 zero-shot over GENEVAL_COLORS on the object's crop
    (the image inside its mask, #999 grey outside, cropped to its box), the class embedding of each colour
    being the normalised mean of the normalised embeddings of three prompts (clip_benchmark's classifier)."""
    if not dets:
        return []
    dev = _device(image)
    model, tok, pre, classifiers = _cached("geneval_clip", dev, lambda: _geneval_clip(dev))
    with torch.no_grad():
        if classname not in classifiers:
            templates = (f"a photo of a {{}} {classname}", f"a photo of a {{}}-colored {classname}", "a photo of a {} object")
            texts = [t.format(c) for c in GENEVAL_COLORS for t in templates]
            emb = _embeds(model.get_text_features(**_tokenize(tok, texts, model.config.text_config.max_position_embeddings, dev)))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).view(len(GENEVAL_COLORS), len(templates), -1).mean(1)
            classifiers[classname] = torch.nn.functional.normalize(emb, dim=-1)
        img = _to_8bit(image.to(dev))
        crops = []
        for d in dets:
            x0, y0, x1, y1 = (int(v) for v in d.box)
            shown = img if d.mask is None else torch.where(d.mask.to(dev), img, torch.full_like(img, GENEVAL_CROP_GREY))
            crops.append(pre(shown[None, :, y0:y1, x0:x1]))
        feats = _embeds(model.get_image_features(pixel_values=torch.cat(crops)))
        picks = (torch.nn.functional.normalize(feats.float(), dim=-1) @ classifiers[classname].T).argmax(-1)
    return [GENEVAL_COLORS[int(i)] for i in picks]


def _per_category(strict: torch.Tensor, cats: list[str], categories) -> dict[str, torch.Tensor]:
    info = {"strict": strict}
    for c in categories:
        mask = torch.tensor([x == c for x in cats])
        info[f"strict/{c}"] = torch.where(mask, strict, torch.full_like(strict, float("nan")))
    return info


@register("geneval")
def geneval(images, prompts):
    """GenEval's protocol: Mask2Former detections and CLIP colours judged on the prompt's GenEval metadata.
    Score: Flow-GRPO's partial credit (geneval_partial; 1 when every clause holds exactly). info: "strict",
    GenEval's own verdict (geneval_correct: the accuracy its papers report), overall and per category."""
    metas = [geneval_metadata(parse_geneval(p)) for p in prompts]  # fail on prompts outside the grammar first
    wanted = [{r["class"] for r in m["include"] + m.get("exclude", [])} for m in metas]
    thresholds = [GENEVAL_COUNTING_THRESHOLD if m["tag"] == "counting" else GENEVAL_THRESHOLD for m in metas]
    found = geneval_detect(images, wanted, thresholds)
    partial, strict = [], []
    for image, meta, objects in zip(images, metas, found):
        cache: dict[tuple[str, int], list[str]] = {}

        def colors(classname, dets, image=image, cache=cache):
            key = (classname, len(dets))  # both judges ask for the first `count` detections of a class
            if key not in cache:
                cache[key] = geneval_colors(image, classname, dets)
            return cache[key]

        partial.append(geneval_partial(meta, objects, colors))
        strict.append(float(geneval_correct(meta, objects, colors)))
    return torch.tensor(partial), _per_category(torch.tensor(strict), [m["tag"] for m in metas], GENEVAL_CATEGORIES)
