"""The embedded "shapes" world: a GenEval-like task small enough to learn and score on a CPU.

Three parts, each usable on its own:
  * a prompt grammar with GenEval's six categories (single object, two objects, counting, colours,
    position, colour attribution) and fixed, non-overlapping train / eval prompt splits;
  * a renderer of ground-truth 32x32 images for any prompt of the grammar (pre-training data);
  * a scorer that parses a prompt into clauses and checks each clause on an image with a tiny
    rule-based detector (palette classification, connected components, fill ratio, centroids).
    Reward = fraction of clauses met (partial credit, like Flow-GRPO's GenEval reward); strict = all met;
  * the base model's architecture: a tiny VAE (32x32x3 <-> 8x8x4) and a tiny StableDiffusion3Pipeline on its
    latents, with a CLIP tokenizer built in code (pretrain.py trains them; assets/shapes_base holds the result).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import torch

RES = 32  # image side in pixels
CELL = RES // 2  # objects sit in the cells of a 2x2 grid, at most one per cell
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.66, 0.22),
    "blue": (0.16, 0.30, 0.90),
    "yellow": (0.96, 0.80, 0.08),
}
BACKGROUND = (0.92, 0.92, 0.92)
NUMBERS = ("one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_AREA = 8  # connected components smaller than this (pixels) are ignored as speckle
MIN_FILL = 0.35  # components filling less of their bounding box are ignored as tangles
MAX_COLOR_DIST = 0.12  # squared RGB distance beyond which a pixel matches no palette colour


# ----------------------------------------------------------------------------------------------
# Prompt grammar
# ----------------------------------------------------------------------------------------------
def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def all_prompts() -> dict[str, list[str]]:
    """Every prompt of the grammar, by category (135 prompts)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    cols = list(COLORS)
    return {
        "single_object": [f"a {s}" for s in SHAPES],
        "two_object": [f"a {a} and a {b}" for a, b in pairs],
        "counting": [f"{NUMBERS[n - 1]} {_plural(s, n)}" for s in SHAPES for n in range(1, 5)],
        "colors": [f"a {c} {s}" for c in cols for s in SHAPES],
        "position": [f"a {a} {r} a {b}" for a, b in pairs for r in RELATIONS],
        "color_attr": [f"a {c1} {a} and a {c2} {b}" for a, b in pairs if a < b
                       for c1 in cols for c2 in cols if c1 != c2],
    }


def prompt_split(split: str) -> list[str]:
    """Fixed train / eval split: a quarter of each category (at least one prompt) is held out."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")
    out = []
    for cat, prompts in all_prompts().items():
        order = sorted(prompts, key=lambda p: random.Random(f"{cat}/{p}").random())
        n_eval = max(1, len(prompts) // 4)
        out += order[:n_eval] if split == "eval" else order[n_eval:]
    return out


# ----------------------------------------------------------------------------------------------
# Parsing a prompt into a spec and clauses
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phrase:
    shape: str
    color: str | None  # None: any colour
    count: int | None  # None: at least one ("a circle"); else exactly this many ("three circles")


@dataclass(frozen=True)
class Spec:
    category: str
    phrases: tuple[Phrase, ...]
    relation: str | None = None  # phrases[0] <relation> phrases[1]


_NP = re.compile(rf"^(a|{'|'.join(NUMBERS)}) (?:({'|'.join(COLORS)}) )?({'|'.join(SHAPES)})s?$")


def _phrase(text: str) -> Phrase:
    m = _NP.match(text.strip())
    if m is None:
        raise ValueError(f"cannot parse {text!r} as a shapes noun phrase such as 'a red circle' or 'three squares'")
    det, color, shape = m.groups()
    return Phrase(shape, color, None if det == "a" else NUMBERS.index(det) + 1)


def parse(prompt: str) -> Spec:
    """Parse a prompt of the grammar into its spec; raises ValueError on anything else."""
    p = prompt.strip().lower()
    for rel in RELATIONS:
        if f" {rel} " in p:
            a, b = p.split(f" {rel} ")
            return Spec("position", (_phrase(a), _phrase(b)), rel)
    parts = [_phrase(x) for x in p.split(" and ")]
    if len(parts) == 2:
        colored = all(x.color for x in parts)
        return Spec("color_attr" if colored else "two_object", tuple(parts))
    (x,) = parts
    cat = "colors" if x.color else "counting" if x.count else "single_object"
    return Spec(cat, (x,))


# ----------------------------------------------------------------------------------------------
# Rendering ground truth
# ----------------------------------------------------------------------------------------------
def _shape_mask(shape: str, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(RES) + 0.5, torch.arange(RES) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        h = 0.85 * r
        return (dx.abs() <= h) & (dy.abs() <= h)
    # triangle pointing up: apex at cy - r, base at cy + r, base half-width r
    frac = (dy + r) / (2 * r)
    return (frac >= 0) & (frac <= 1) & (dx.abs() <= r * frac)


def _cells_for(spec: Spec, rng: random.Random) -> list[tuple[int, int]]:
    """One (row, col) grid cell per object; position prompts put the two objects in the right order."""
    cells = [(r, c) for r in range(2) for c in range(2)]
    if spec.relation is None:
        return rng.sample(cells, 4)
    if spec.relation in ("left of", "right of"):
        ra, rb = rng.randrange(2), rng.randrange(2)
        a, b = (ra, 0), (rb, 1)
    else:
        ca, cb = rng.randrange(2), rng.randrange(2)
        a, b = (0, ca), (1, cb)
    if spec.relation in ("right of", "below"):
        a, b = b, a
    return [a, b]


def objects_for(spec: Spec, rng: random.Random) -> list[tuple[str, str]]:
    """The (shape, colour) list an image of `spec` shows."""
    objs = []
    for ph in spec.phrases:
        for _ in range(ph.count or 1):
            objs.append((ph.shape, ph.color or rng.choice(list(COLORS))))
    return objs


def render(objects: list[tuple[str, str]], cells: list[tuple[int, int]], rng: random.Random) -> torch.Tensor:
    """Draw objects (shape, colour) into the given grid cells: a (3, RES, RES) image in [0, 1]."""
    img = torch.tensor(BACKGROUND).view(3, 1, 1).repeat(1, RES, RES)
    for (shape, color), (row, col) in zip(objects, cells):
        r = rng.uniform(4.5, 6.0)
        slack = CELL / 2 - r - 1.5
        cx = col * CELL + CELL / 2 + rng.uniform(-slack, slack)
        cy = row * CELL + CELL / 2 + rng.uniform(-slack, slack)
        m = _shape_mask(shape, cx, cy, r)
        img[:, m] = torch.tensor(COLORS[color]).view(3, 1)
    return img


def render_prompt(prompt: str, rng: random.Random) -> torch.Tensor:
    """A ground-truth image for a prompt of the grammar."""
    spec = parse(prompt)
    return render(objects_for(spec, rng), _cells_for(spec, rng), rng)


def random_caption(rng: random.Random) -> str:
    """A prompt drawn uniformly over categories, then uniformly within the category (pre-training)."""
    prompts = all_prompts()
    return rng.choice(prompts[rng.choice(CATEGORIES)])


# ----------------------------------------------------------------------------------------------
# Detector and scorer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    area: int
    cx: float
    cy: float


_PALETTE = torch.tensor([BACKGROUND, *COLORS.values()])  # label 0 = background


def _components(labels: torch.Tensor) -> torch.Tensor:
    """4-connected component ids of equal non-zero labels, batched: (B, H, W) -> (B, H, W) ids (-1 background)."""
    b, h, w = labels.shape
    big = b * h * w
    ids = torch.arange(big).view(b, h, w)
    ids = torch.where(labels > 0, ids, torch.full_like(ids, big))
    while True:  # propagate the minimum id through same-label neighbours until nothing changes
        new = ids.clone()
        for dim, shift in ((1, 1), (1, -1), (2, 1), (2, -1)):
            nb_ids = torch.roll(ids, shift, dim)
            nb_lab = torch.roll(labels, shift, dim)
            edge = torch.zeros_like(labels, dtype=torch.bool)  # roll wraps around: mask the wrapped row/col
            idx = 0 if shift == 1 else -1
            edge.select(dim, idx).fill_(True)
            same = (nb_lab == labels) & (labels > 0) & ~edge
            new = torch.where(same, torch.minimum(new, nb_ids), new)
        if torch.equal(new, ids):
            return torch.where(labels > 0, ids, torch.full_like(ids, -1))
        ids = new


def _classify(m: torch.Tensor, area: int, x0: int, x1: int, y0: int, y1: int) -> str:
    """Shape of one component from its bounding-box corners and fill ratio.

    A square fills all four corners of its box, an upward triangle the two bottom ones, a circle none;
    blobs that match no corner pattern fall back to the fill ratio (square 1, circle pi/4, triangle 1/2).
    """
    top = int(m[y0, x0]) + int(m[y0, x1])
    bottom = int(m[y1, x0]) + int(m[y1, x1])
    fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
    if top + bottom >= 3:
        return "square"
    if top == 0 and bottom == 2:
        return "triangle"
    return "circle" if fill >= 0.62 else "triangle"


def detect(images: torch.Tensor) -> list[list[Detection]]:
    """Objects found in a batch of the world's images (B, 3, RES, RES) in [0, 1]."""
    if tuple(images.shape[-2:]) != (RES, RES):
        raise ValueError(f"the shapes scorer reads the shapes world's {RES}x{RES} images, got "
                         f"{tuple(images.shape[-2:])}: use it with a shapes base (no --model, or pretrain.py's folder)")
    x = images.detach().float().cpu().clamp(0, 1)
    best, labels = palette_distances(x).min(1)  # B H W
    labels = torch.where(best <= MAX_COLOR_DIST, labels, torch.zeros_like(labels))  # off-palette: not an object
    comp = _components(labels)
    ys, xs = torch.meshgrid(torch.arange(RES, dtype=torch.float32), torch.arange(RES, dtype=torch.float32), indexing="ij")
    out = []
    names = list(COLORS)
    for i in range(len(x)):
        dets = []
        ids, counts = torch.unique(comp[i], return_counts=True)
        for cid, area in zip(ids.tolist(), counts.tolist()):
            if cid < 0 or area < MIN_AREA:
                continue
            m = comp[i] == cid
            yy, xx = ys[m], xs[m]
            x0, x1, y0, y1 = int(xx.min()), int(xx.max()), int(yy.min()), int(yy.max())
            if area < MIN_FILL * (x1 - x0 + 1) * (y1 - y0 + 1):
                continue  # a spindly tangle, not a drawn object
            shape = _classify(m, area, x0, x1, y0, y1)
            color = names[int(labels[i][m][0]) - 1]
            dets.append(Detection(shape, color, area, float(xx.mean()), float(yy.mean())))
        out.append(dets)
    return out


def _matches(d: Detection, ph: Phrase) -> bool:
    return d.shape == ph.shape and (ph.color is None or d.color == ph.color)


def _related(a: Detection, b: Detection, relation: str, margin: float = 2.0) -> bool:
    return {
        "left of": a.cx + margin < b.cx,
        "right of": a.cx > b.cx + margin,
        "above": a.cy + margin < b.cy,
        "below": a.cy > b.cy + margin,
    }[relation]


def clauses(spec: Spec, dets: list[Detection]) -> list[bool]:
    """The clauses of a spec, each checked on the detections of one image. Every prompt ends with the
    clause "nothing else": the image shows exactly as many objects as the prompt asks for."""
    found = [[d for d in dets if _matches(d, ph)] for ph in spec.phrases]
    if spec.category == "colors":  # the object is there, and it has the asked colour
        (ph,) = spec.phrases
        out = [any(d.shape == ph.shape for d in dets), bool(found[0])]
    elif spec.category == "counting":  # the object is there, and exactly as many as asked
        out = [bool(found[0]), len(found[0]) == spec.phrases[0].count]
    else:
        out = [bool(f) for f in found]
    if spec.relation is not None:
        out.append(any(_related(a, b, spec.relation) for a in found[0] for b in found[1]))
    return out + [len(dets) == sum(ph.count or 1 for ph in spec.phrases)]


def score(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Partial-credit scores (fraction of clauses met), strict accuracy (all met) and the categories."""
    specs = [parse(p) for p in prompts]
    results = [clauses(s, d) for s, d in zip(specs, detect(images))]
    partial = torch.tensor([sum(r) / len(r) for r in results])
    strict = torch.tensor([float(all(r)) for r in results])
    return partial, strict, [s.category for s in specs]


# ----------------------------------------------------------------------------------------------
# The tiny base model: a StableDiffusion3Pipeline on a tiny VAE's latents, CLIP tokenizer built in code
# ----------------------------------------------------------------------------------------------
MAX_TOKENS = 12  # "<bos> a yellow triangle and a green square <eos>" and padding


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_clip_tokenizer(corpus: list[str], vocab_size: int, max_length: int):
    """A CLIP tokenizer built offline: BPE merges learned on `corpus`, then laid out as CLIP's vocabulary
    is (bytes, bytes + '</w>', merges, start and end tokens)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    trained = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=vocab_size,
                                                      initial_alphabet=ByteLevel.alphabet())
    merges = [tuple(m) for m in json.loads(trained.backend_tokenizer.to_str())["model"]["merges"]]
    chars = _byte_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges=merges,
                         model_max_length=max_length)


def build_tokenizer():
    """The shapes world's tokenizer: merges learned on every prompt of the grammar."""
    return build_clip_tokenizer([p for ps in all_prompts().values() for p in ps], 600, MAX_TOKENS)


LATENT_CHANNELS = 4  # the latent world: 32x32x3 renders <-> 16x16x4 (factor 2) or 8x8x4 (factor 4) latents


def build_vae(factor: int = 2):
    """A tiny AutoencoderKL: 3 x 32 x 32 pixels in [-1, 1] <-> 4 x 16 x 16 (factor 2, 0.7M parameters) or
    4 x 8 x 8 (factor 4, 1.0M)."""
    from diffusers import AutoencoderKL

    channels = {2: (32, 64), 4: (32, 64, 64)}[factor]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=RES, layers_per_block=1,
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=32,
    )


def latent_side(vae) -> int:
    """The side of a shapes VAE's latents: 32 pixels halved at each of its downsamplings."""
    return RES // 2 ** (len(vae.config.block_out_channels) - 1)


def build_sd3_pipeline(vae, tokenizer=None):
    """The shapes world as a tiny StableDiffusion3Pipeline, loaded by the same `sd3` backend as SD3.5-M: a 0.6M
    SD3 transformer on the VAE's latents (2x2 patches, 4 joint blocks), two small CLIP text encoders with
    projections (the shapes tokenizer for both), no T5 (the pipeline feeds zeros in its place), SD3's scheduler
    at shift 3. The transformer's sample size is the latent side, so the pipeline's native size is 32 pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tokenizer or build_tokenizer()
    clip = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32, max_position_embeddings=MAX_TOKENS,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    side = latent_side(vae)
    transformer = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels, num_layers=4, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=2 * clip.hidden_size, caption_projection_dim=64,
        pooled_projection_dim=2 * clip.projection_dim, pos_embed_max_size=side // 2)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
        text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)


def palette_labels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W): index of the nearest palette colour (0 = background), as detect()."""
    return palette_distances(images).argmin(1)


def palette_distances(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, K, H, W) squared RGB distances to the background and the colours."""
    return ((images[:, None] - _PALETTE.to(images)[None, :, :, None, None]) ** 2).sum(2)
