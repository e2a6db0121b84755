"""Reward functions: a registry `name -> fn(images, prompts) -> (scores, info)`.

images: (B, 3, H, W) float in [0, 1]; prompts: B strings; scores: (B,) float tensor; info: a dict of
(B,) tensors, NaN where a value does not apply (e.g. the strict accuracy of another category).
`make_reward("shapes:1.0,jpeg_compressibility:0.1")` builds the weighted sum of several.

Rewards: shapes (the embedded world), jpeg_compressibility / jpeg_incompressibility, and real models
loaded lazily through transformers: pickscore, clipscore, aesthetic, ocr (TrOCR), geneval (OWLv2).
hpsv2 and imagereward are registered but raise RewardModelUnavailable (see their docstrings). Each
model id comes from MODEL_IDS, overridable by $CLEANFLOWRL_MODEL_<KEY> (a hub id or a local folder).
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
    """The weighted sum of the rewards named in `spec`; info keeps each reward's raw score and info."""
    parts = parse_reward_spec(spec)

    def reward(images, prompts):
        total = torch.zeros(len(images))
        info: dict[str, torch.Tensor] = {}
        for name, w in parts:
            s, inf = REWARDS[name](images, prompts)
            s = s.float().cpu()
            if not torch.isfinite(s).all():
                raise FloatingPointError(f"reward {name!r} returned non-finite scores")
            total += w * s
            if len(parts) > 1:
                info[name] = s
            info.update(inf)
        return total, info

    return reward


# ----------------------------------------------------------------------------------------------
# Real reward models (GPU users). Each loads lazily on its first call, once per device, and scores
# in batches under torch.no_grad() on the images' device (or `DEVICE` / $CLEANFLOWRL_REWARD_DEVICE).
# Images are resized and normalised here, in torch, from the model's preprocessor_config.json (no
# transformers image processor: they need torchvision, and this keeps the work on the device).
# ----------------------------------------------------------------------------------------------
MODEL_IDS: dict[str, str] = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "clipscore": "openai/clip-vit-large-patch14",
    "aesthetic_clip": "openai/clip-vit-large-patch14",
    # LAION aesthetic predictor v2 (improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE), as the
    # copy TRL's DDPO example downloads: "<repo>/<file>" on the hub, or a local .pth / .safetensors path
    "aesthetic_mlp": "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
    "ocr": "microsoft/trocr-base-printed",
    "geneval": "google/owlv2-base-patch16-ensemble",
}
DEVICE: str | None = None  # None: score on the images' device
BATCH_SIZE = 16  # images per forward pass of a reward model
PICKSCORE_DIVISOR = 26.0  # Flow-GRPO's reference divides logit_scale * cosine (~20-23) by 26
_MODELS: dict[tuple, object] = {}


class RewardModelUnavailable(RuntimeError):
    """A reward model's weights are neither on this machine nor downloadable."""


def model_id(key: str) -> str:
    """The model a reward loads: $CLEANFLOWRL_MODEL_<KEY> if set, else MODEL_IDS[key]."""
    return os.environ.get(f"CLEANFLOWRL_MODEL_{key.upper()}", MODEL_IDS[key])


def _device(images: torch.Tensor) -> torch.device:
    return torch.device(os.environ.get("CLEANFLOWRL_REWARD_DEVICE") or DEVICE or images.device)


def _cached(key: str, device: torch.device, load):
    """load() once per (model ids, device); a missing model becomes one clear RewardModelUnavailable."""
    ids = tuple(model_id(k) for k in MODEL_IDS if k == key or k.startswith(key + "_"))
    ck = (key, ids, str(device))
    if ck not in _MODELS:
        try:
            _MODELS[ck] = load()
        except (OSError, ValueError) as e:  # transformers / huggingface_hub: not cached, offline, no repo
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            names = " and ".join(repr(i) for i in ids)
            get = "; ".join(f"hf download {_download_args(i)}" for i in ids if not Path(i).exists())
            envs = ", ".join(f"$CLEANFLOWRL_MODEL_{k.upper()}" for k in MODEL_IDS
                             if k == key or k.startswith(key + "_"))
            raise RewardModelUnavailable(
                f"reward {key!r} needs {names}, which could not be loaded"
                f"{' (HF_HUB_OFFLINE is set, so nothing is downloaded)' if offline else ''}. "
                f"Download on a machine with network access ({get}; with huggingface_hub < 1.0 the command "
                f"is huggingface-cli download) or point {envs} at a local copy. "
                f"Cause: {type(e).__name__}: {first}") from None
    return _MODELS[ck]


def _download_args(i: str) -> str:
    """'owner/repo' -> 'owner/repo'; 'owner/repo/file' -> 'owner/repo file'."""
    parts = i.split("/")
    return i if len(parts) <= 2 else "/".join(parts[:2]) + " " + "/".join(parts[2:])


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
    """Image preprocessing from a preprocessor_config.json, in torch. mode "clip": resize the short side
    (bicubic, antialiased) and centre-crop; "pad_square": pad bottom/right with grey to a square, then
    resize (OWLv2); "resize": resize to the target size (ViT / TrOCR)."""

    def __init__(self, repo_or_dir: str, mode: str):
        cfg = json.loads(_hub_file(repo_or_dir, "preprocessor_config.json").read_text())
        self.mode = mode
        self.mean = torch.tensor(cfg.get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", [0.5] * 3)).view(1, 3, 1, 1)
        self.size = _side(cfg.get("size"), 224)
        self.crop = _side(cfg.get("crop_size"), self.size[0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.float().clamp(0, 1)
        if self.mode == "clip":
            h, w = x.shape[-2:]
            s = self.size[0] / min(h, w)
            x = F.interpolate(x, size=(max(round(h * s), self.crop[0]), max(round(w * s), self.crop[1])),
                              mode="bicubic", antialias=True, align_corners=False)
            top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
            x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        else:
            if self.mode == "pad_square":
                h, w = x.shape[-2:]
                x = F.pad(x, (0, max(h, w) - w, 0, max(h, w) - h), value=0.5)
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
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


def _clip_cosine(key: str, images: torch.Tensor, prompts: list[str], processor_key: str) -> tuple[torch.Tensor, object]:
    """Cosine of CLIP image and text embeddings, and the model (for its logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    dev = _device(images)

    def load():
        proc = model_id(processor_key)
        return (CLIPModel.from_pretrained(model_id(key)).eval().to(dev), AutoTokenizer.from_pretrained(proc),
                _Pre(proc, "clip"))

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
    return torch.cat(out), model


@register("pickscore")
def pickscore(images, prompts):
    """PickScore (Kirstain et al. 2023): logit_scale * cosine(image, prompt) of the PickScore_v1 CLIP-H,
    divided by PICKSCORE_DIVISOR (26, as Flow-GRPO's reference, so typical scores sit near 0.8-0.9)."""
    cos, model = _clip_cosine("pickscore", images, prompts, "pickscore_processor")
    return (model.logit_scale.exp().float().cpu() * cos.cpu() / PICKSCORE_DIVISOR), {}


@register("clipscore")
def clipscore(images, prompts):
    """CLIPScore: the raw cosine of the CLIP ViT-L/14 image and prompt embeddings (no x100, no clamp;
    typical matched pairs score 0.2-0.35)."""
    cos, _ = _clip_cosine("clipscore", images, prompts, "clipscore")
    return cos.cpu(), {}


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
    parts = spec.split("/")
    if Path(spec).is_file():
        path = Path(spec)
    elif len(parts) >= 3:
        path = _hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    else:
        raise OSError(f"{spec!r} is neither a local file nor '<owner>/<repo>/<file>' on the hub")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval()


@register("aesthetic")
def aesthetic(images, prompts):
    """LAION aesthetic predictor v2: AestheticMLP on the normalised CLIP ViT-L/14 image embedding (raw
    rating, roughly 1-10; the prompt is not used)."""
    from transformers import CLIPModel

    dev = _device(images)

    def load():
        clip = model_id("aesthetic_clip")
        return (CLIPModel.from_pretrained(clip).eval().to(dev), _Pre(clip, "clip"),
                _load_aesthetic_mlp(model_id("aesthetic_mlp")).to(dev))

    model, pre, mlp = _cached("aesthetic", dev, load)
    out = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            emb = _embeds(model.get_image_features(pixel_values=pre(images[sl].to(dev)))).float()
            out.append(mlp(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1))
    return torch.cat(out).cpu(), {}


@register("hpsv2")
def hpsv2(images, prompts):
    """HPSv2 is an OpenCLIP ViT-H/14 fine-tune shipped as an open_clip checkpoint (xswu/HPSv2); neither
    transformers nor a maintained package loads it cleanly."""
    raise RewardModelUnavailable(
        "reward 'hpsv2' is registered but not available: HPSv2's checkpoint (xswu/HPSv2, "
        "HPS_v2.1_compressed.pt) is an open_clip model, not a transformers one, and the PyPI package "
        "`hpsv2` (1.2.0, Feb 2024) pins pytest==7.2.0 and protobuf<4 and vendors its own open_clip, "
        "which conflicts with this project's requirements. Use pickscore / clipscore / aesthetic, or "
        "score with the hpsv2 package in a separate environment.")


@register("imagereward")
def imagereward(images, prompts):
    """ImageReward is a BLIP-based model loaded by the `image-reward` package only."""
    raise RewardModelUnavailable(
        "reward 'imagereward' is registered but not available: ImageReward (THUDM/ImageReward) is a "
        "BLIP model loaded only by the PyPI package `image-reward` (1.5, July 2023), which pins "
        "timm==0.6.13 and fairscale==0.4.13 and pulls in datasets; transformers cannot load its "
        "checkpoint. Use pickscore / clipscore / aesthetic, or score with image-reward in a separate "
        "environment.")


# ----------------------------------------------------------------------------------------------
# OCR: edit distance between the recognised text and the prompt's quoted text
# ----------------------------------------------------------------------------------------------
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to render: its double-quoted parts ("..." or curly quotes), joined by spaces."""
    parts = [a or b for a, b in _QUOTED.findall(prompt)]
    parts = [p for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"the ocr reward needs the text to render in double quotes in the prompt, "
                         f"e.g. 'a sign that says \"OPEN\"'; got {prompt!r}")
    return " ".join(parts)


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
    """1 - d / len(target), d the edit distance clipped at len(target), case-insensitive, whitespace
    removed (Flow-GRPO's OCR reward): 1 is an exact match, 0 nothing right."""
    r = "".join(recognised.lower().split())
    t = "".join(target.lower().split())
    if not t:
        raise ValueError("the ocr reward's target text is empty")
    return 1.0 - min(levenshtein(r, t), len(t)) / len(t)


@register("ocr")
def ocr(images, prompts):
    """OCR reward: a TrOCR recogniser reads the whole image (one line of printed text) and the score is
    ocr_score(recognised, quoted text of the prompt). info: ocr/exact (the text matched exactly)."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel

    targets = [quoted_text(p) for p in prompts]  # fail on unquoted prompts before loading anything
    dev = _device(images)

    def load():
        mid = model_id("ocr")
        return (VisionEncoderDecoderModel.from_pretrained(mid).eval().to(dev), AutoTokenizer.from_pretrained(mid),
                _Pre(mid, "resize"))

    model, tok, pre = _cached("ocr", dev, load)
    texts = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            ids = model.generate(pixel_values=pre(images[sl].to(dev)), max_new_tokens=48)
            texts += tok.batch_decode(ids, skip_special_tokens=True)
    scores = torch.tensor([ocr_score(r, t) for r, t in zip(texts, targets)])
    return scores, {"ocr/exact": (scores == 1).float()}


# ----------------------------------------------------------------------------------------------
# GenEval-style object checks: parse the prompt into clauses (the six GenEval categories, as
# shapes.py does on its world), detect the named objects with an open-vocabulary detector (OWLv2),
# check presence, counts, colours and positions. Reward = fraction of clauses met; strict = all met.
# ----------------------------------------------------------------------------------------------
GENEVAL_OBJECTS = (  # the 80 COCO categories, as GenEval names them
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
# colour names and the RGB anchors of the pixel colour classification (gray is a possible answer only)
GENEVAL_COLORS = {
    "red": (0.85, 0.12, 0.12), "orange": (0.98, 0.55, 0.05), "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.60, 0.20), "blue": (0.12, 0.28, 0.85), "purple": (0.50, 0.18, 0.62),
    "pink": (0.98, 0.60, 0.75), "brown": (0.50, 0.30, 0.12), "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
}
_COLOR_ANCHORS = {**GENEVAL_COLORS, "gray": (0.5, 0.5, 0.5)}
GENEVAL_NUMBERS = ("one", "two", "three", "four")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_THRESHOLD = 0.2  # detector score (sigmoid of OWLv2's class logit) a box needs; not tuned here
GENEVAL_NMS_IOU = 0.5  # same-label boxes overlapping more than this are one object
GENEVAL_POSITION_MARGIN = 0.05  # box centres must differ by this fraction of the image side


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
    count: int | None  # None: at least one ("a dog"); else exactly this many ("three dogs")


@dataclass(frozen=True)
class GenevalSpec:
    category: str
    phrases: tuple[ObjectPhrase, ...]
    relation: str | None = None  # phrases[0] <relation> phrases[1]


@dataclass(frozen=True)
class Box:
    label: str  # a GENEVAL_OBJECTS entry
    score: float
    x0: float
    y0: float
    x1: float
    y1: float  # pixels, y down
    color: str | None = None  # the colour classification of the box's pixels

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


_NAMES = {**{n: n for n in GENEVAL_OBJECTS}, **{plural(n): n for n in GENEVAL_OBJECTS}}
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


def geneval_clauses(spec: GenevalSpec, boxes: list[Box], width: float, height: float) -> list[bool]:
    """The clauses of a spec, checked on one image's boxes (as the shapes scorer, without its "nothing
    else" clause: an open-vocabulary image may show more). colors: the object is there; it has the colour.
    counting: it is there; exactly `count` of it. others: each phrase has a matching box (right colour
    where one is asked), and position adds "some box of the first is <relation> some box of the second",
    judged on box centres with a margin of GENEVAL_POSITION_MARGIN of the image side."""
    found = [[b for b in boxes if b.label == ph.name and (ph.color is None or b.color == ph.color)]
             for ph in spec.phrases]
    if spec.category == "colors":
        (ph,) = spec.phrases
        out = [any(b.label == ph.name for b in boxes), bool(found[0])]
    elif spec.category == "counting":
        out = [bool(found[0]), len(found[0]) == spec.phrases[0].count]
    else:
        out = [bool(f) for f in found]
    if spec.relation is not None:
        mx, my = GENEVAL_POSITION_MARGIN * width, GENEVAL_POSITION_MARGIN * height
        rel = {"left of": lambda a, b: a.cx + mx < b.cx, "right of": lambda a, b: a.cx > b.cx + mx,
               "above": lambda a, b: a.cy + my < b.cy, "below": lambda a, b: a.cy > b.cy + my}[spec.relation]
        out.append(any(rel(a, b) for a in found[0] for b in found[1]))
    return out


def box_color(image: torch.Tensor, x0: float, y0: float, x1: float, y1: float) -> str:
    """Colour of an object: each pixel of the box's central half (less background) goes to the nearest
    RGB anchor of _COLOR_ANCHORS (GenEval's ten colours and gray); the majority wins."""
    h, w = image.shape[-2:]
    qx, qy = (x1 - x0) / 4, (y1 - y0) / 4
    xa, xb = int(max(0, x0 + qx)), int(min(w, max(x0 + qx + 1, x1 - qx)))
    ya, yb = int(max(0, y0 + qy)), int(min(h, max(y0 + qy + 1, y1 - qy)))
    px = image[:, ya:yb, xa:xb].float().reshape(3, -1).T.cpu()
    if px.numel() == 0:
        return "gray"
    anchors = torch.tensor(list(_COLOR_ANCHORS.values()))
    votes = torch.cdist(px, anchors).argmin(-1).bincount(minlength=len(anchors))
    return list(_COLOR_ANCHORS)[int(votes.argmax())]


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression over (N, 4) xyxy boxes; indices kept, best first."""
    keep = []
    for i in scores.argsort(descending=True).tolist():
        b = boxes[i]
        ok = True
        for j in keep:
            c = boxes[j]
            iw = (torch.minimum(b[2], c[2]) - torch.maximum(b[0], c[0])).clamp(min=0)
            ih = (torch.minimum(b[3], c[3]) - torch.maximum(b[1], c[1])).clamp(min=0)
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (c[2] - c[0]) * (c[3] - c[1]) - inter
            if inter / union.clamp(min=1e-9) > iou:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def detect_objects(images: torch.Tensor, names: list[list[str]]) -> list[list[Box]]:
    """OWLv2 boxes (score > GENEVAL_THRESHOLD, per-label NMS) for the object names asked of each image,
    each with its colour. Every image is queried with the union of the batch's names."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    dev = _device(images)

    def load():
        mid = model_id("geneval")
        return Owlv2ForObjectDetection.from_pretrained(mid).eval().to(dev), AutoTokenizer.from_pretrained(mid), \
            _Pre(mid, "pad_square")

    model, tok, pre = _cached("geneval", dev, load)
    vocab = sorted({n for ns in names for n in ns})
    queries = _tokenize(tok, [f"a photo of {article(n)} {n}" for n in vocab],
                        model.config.text_config.max_position_embeddings, dev)
    out: list[list[Box]] = []
    with torch.no_grad():
        for sl in _chunks(len(images)):
            x = images[sl]
            b = len(x)
            res = model(input_ids=queries["input_ids"].repeat(b, 1), attention_mask=queries["attention_mask"].repeat(b, 1),
                        pixel_values=pre(x.to(dev)))
            probs = res.logits.float().sigmoid().cpu()  # (b, patches, len(vocab))
            side = max(x.shape[-2:])  # boxes are relative to the grey-padded square
            cxcywh = res.pred_boxes.float().cpu() * side
            xyxy = torch.cat([cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2], -1)
            for i in range(b):
                img = x[i].detach().float().cpu().clamp(0, 1)
                boxes = []
                for q, name in enumerate(vocab):
                    if name not in names[sl.start + i]:
                        continue
                    sel = (probs[i, :, q] > GENEVAL_THRESHOLD).nonzero().flatten()
                    for k in _nms(xyxy[i, sel], probs[i, sel, q], GENEVAL_NMS_IOU):
                        x0, y0, x1, y1 = xyxy[i, sel[k]].tolist()
                        boxes.append(Box(name, float(probs[i, sel[k], q]), x0, y0, x1, y1, box_color(img, x0, y0, x1, y1)))
                out.append(boxes)
    return out


def _per_category(strict: torch.Tensor, cats: list[str], categories) -> dict[str, torch.Tensor]:
    info = {"strict": strict}
    for c in categories:
        mask = torch.tensor([x == c for x in cats])
        info[f"strict/{c}"] = torch.where(mask, strict, torch.full_like(strict, float("nan")))
    return info


@register("geneval")
def geneval(images, prompts):
    """GenEval-style reward with OWLv2: fraction of the prompt's clauses met (partial credit, as Flow-GRPO's
    GenEval reward); info: strict accuracy (all clauses), overall and per category."""
    specs = [parse_geneval(p) for p in prompts]  # fail on prompts outside the grammar before loading
    dets = detect_objects(images, [[ph.name for ph in s.phrases] for s in specs])
    h, w = images.shape[-2:]
    results = [geneval_clauses(s, d, w, h) for s, d in zip(specs, dets)]
    partial = torch.tensor([sum(r) / len(r) for r in results])
    strict = torch.tensor([float(all(r)) for r in results])
    return partial, _per_category(strict, [s.category for s in specs], GENEVAL_CATEGORIES)
