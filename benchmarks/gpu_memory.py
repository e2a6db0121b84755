"""Peak GPU memory and seconds per iteration of the real-model commands (docs/real_models.md), on random weights.

Nothing is downloaded. The script builds diffusers pipeline folders from the real configurations with random
weights (SD3.5-Medium: the MMDiT with 24 layers, dual attention in the first 13, and its three text encoders
CLIP-L, CLIP-G and T5-XXL; FLUX.1-dev: 19 double and 38 single blocks, CLIP-L and T5-XXL; the 16-channel VAE),
saves them in bf16 (tokenizers built in code), builds the reward models the commands score with (random CLIP
ViT-H/14 for PickScore, CLIP ViT-L/14 for CLIPScore and the aesthetic head), then runs each configuration's
script in this process: `module.main(module.Args(...))` with the values of its command in docs/real_models.md, shrunk only in
--steps, --eval-per-prompt and the number of evaluation prompts (generated prompt files). It records
torch.cuda.max_memory_allocated / max_memory_reserved between log points and the seconds per iteration from
the run's metrics.jsonl (time/sample, time/reward, time/train), and writes a Markdown table and a JSON.

    python benchmarks/gpu_memory.py                       # every configuration (estimated 30-40 min on an H100/H200)
    python benchmarks/gpu_memory.py --only flow_grpo-sd3 flow_grpo-sd3-plain --models-dir /tmp/random_models
    python benchmarks/gpu_memory.py --list                # the configurations and the command values they run
    python benchmarks/gpu_memory.py --tiny                # the same code path on tiny models, CPU, seconds

Results of several invocations into the same --out are merged (rows keyed by configuration name), so the
list can be run in parts. Without CUDA only --tiny and --list run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built here: nothing may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
HUB_IDS = {"sd3": "stabilityai/stable-diffusion-3.5-medium", "flux": "black-forest-labs/FLUX.1-dev"}
MODEL_NAMES = {"sd3": "SD3.5-M", "flux": "FLUX.1-dev"}
CKPT, OFFLOAD = "--gradient-checkpointing", "--offload-text-encoders"


# ------------------------------------------------------------------------------------------------
# The configurations: a command of docs/real_models.md (found by script and model), minus some memory flags
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    script: str
    family: str  # "sd3" or "flux"
    drop: tuple[str, ...] = ()  # flags of the command left out


CONFIGS = [
    Config("flow_grpo-sd3", "flow_grpo", "sd3"),
    Config("flow_grpo-sd3-no-offload", "flow_grpo", "sd3", (OFFLOAD,)),
    Config("flow_grpo-sd3-no-ckpt", "flow_grpo", "sd3", (CKPT,)),
    Config("flow_grpo-sd3-plain", "flow_grpo", "sd3", (CKPT, OFFLOAD)),
    Config("awm-sd3", "awm", "sd3"),
    Config("tempflow_grpo-sd3", "tempflow_grpo", "sd3"),
    Config("flow_grpo-flux", "flow_grpo", "flux"),
    Config("mix_grpo-flux", "mix_grpo", "flux"),
]
# Rewards with a model we build at its real size here; any other term is scored by PickScore (a random CLIP
# ViT-H/14, 0.99B parameters in fp32: larger than GenEval's Mask2Former Swin-S plus CLIP ViT-L/14)
BUILT_REWARDS = {"pickscore": "clip_h", "clipscore": "clip_l", "aesthetic": "clip_l",
                 "jpeg_compressibility": None, "jpeg_incompressibility": None}
STAND_IN = "pickscore"

README_COMMAND = re.compile(r"^    (python (\w+)\.py --model (\S+) .*?)(?=\n    #|\n\n|\Z)", re.S | re.M)


def readme_commands(readme: Path = ROOT / "docs" / "real_models.md") -> dict[tuple[str, str], list[list[str]]]:
    """{(script, hub id): [argv after the script name, ...]} of the real-model commands (docs/real_models.md, where
    the README points for them: one per paper and backend)."""
    found: dict[tuple[str, str], list[list[str]]] = {}
    for command, script, model in README_COMMAND.findall(readme.read_text()):
        found.setdefault((script, model), []).append(shlex.split(command.replace("\\\n", " "))[2:])
    return found


def readme_argv(cfg: Config, commands: dict) -> list[str]:
    hits = commands.get((cfg.script, HUB_IDS[cfg.family]), [])
    if len(hits) != 1:
        raise SystemExit(f"{cfg.name}: docs/real_models.md has {len(hits)} commands `python {cfg.script}.py --model "
                         f"{HUB_IDS[cfg.family]} ...`; expected exactly one")
    missing = [f for f in cfg.drop if f not in hits[0]]
    if missing:
        raise SystemExit(f"{cfg.name}: the command has no {', '.join(missing)} to leave out")
    return [a for a in hits[0] if a not in cfg.drop]


def reward_terms(spec: str) -> list[str]:
    return [t.split(":")[0].strip() for t in spec.split(",") if t.strip()]


def stand_in_reward(spec: str) -> str:
    """The reward spec with every term we cannot build replaced by the stand-in (weights kept)."""
    terms = []
    for t in spec.split(","):
        name, _, weight = t.partition(":")
        name = name.strip() if name.strip() in BUILT_REWARDS else STAND_IN
        terms.append(f"{name}:{weight}" if weight else name)
    return ",".join(terms)


# ------------------------------------------------------------------------------------------------
# Component configurations. "full": the released models' configs; "tiny": the tests' sizes
# ------------------------------------------------------------------------------------------------
CLIP_VOCAB, T5_VOCAB = 49408, 32128
CLIP_L_TEXT = dict(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G_TEXT = dict(vocab_size=CLIP_VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=T5_VOCAB, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           norm_num_groups=32, act_fn="silu", sample_size=1024, force_upcast=True, use_quant_conv=False,
           use_post_quant_conv=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77)
TINY_VAE = dict(VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
PIPELINES = {
    ("sd3", "full"): dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        text_encoder=dict(CLIP_L_TEXT, projection_dim=768), text_encoder_2=CLIP_G_TEXT, text_encoder_3=T5_XXL,
        vae=dict(VAE, scaling_factor=1.5305, shift_factor=0.0609), scheduler=dict(shift=3.0)),
    ("sd3", "tiny"): dict(
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                         dual_attention_layers=(0,), qk_norm="rms_norm"),
        text_encoder=dict(TINY_CLIP, projection_dim=32), text_encoder_2=dict(TINY_CLIP, projection_dim=32),
        text_encoder_3=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                            relative_attention_num_buckets=8, tie_word_embeddings=False),
        vae=dict(TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609), scheduler=dict(shift=3.0)),
    ("flux", "full"): dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        text_encoder=dict(CLIP_L_TEXT), text_encoder_2=T5_XXL,
        vae=dict(VAE, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                       base_shift=0.5, max_shift=1.15)),
    ("flux", "tiny"): dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        text_encoder=dict(TINY_CLIP),
        text_encoder_2=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                            relative_attention_num_buckets=8, tie_word_embeddings=False),
        vae=dict(TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                       base_shift=0.5, max_shift=1.15)),
}
# CLIP reward models: PickScore_v1 is OpenCLIP ViT-H/14; CLIPScore and the aesthetic head use OpenAI's ViT-L/14
REWARD_MODELS = {
    ("clip_h", "full"): dict(
        text_config=dict(vocab_size=CLIP_VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=1024),
    ("clip_l", "full"): dict(
        text_config=dict(CLIP_L_TEXT),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768),
}
for _kind in ("clip_h", "clip_l"):
    REWARD_MODELS[(_kind, "tiny")] = dict(
        text_config=dict(TINY_CLIP, num_hidden_layers=1), projection_dim=24,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
TINY_RESOLUTION = 64  # the tiny transformers' position embeddings cover 64 px; full size runs the commands' 512


def tiny_overrides(args) -> dict:
    """--tiny tests the script, not the numbers: 64 px, 4 evaluation steps, and the smallest batch the command's
    checks accept (groups of 2, or as many as its minibatches need; one seed per prompt for TempFlow-GRPO)."""
    shrunk = {"resolution": TINY_RESOLUTION, "eval_num_steps": min(args.eval_num_steps, 4),
              "group_size": max(2, math.ceil(getattr(args, "minibatches", 1) / args.prompts_per_step))}
    if hasattr(args, "seeds"):
        shrunk["seeds"] = 1
    return shrunk


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# Prompts: generated, so the tokenizers (built in code) know every word; their length does not matter, as
# every text encoder pads to its fixed length (CLIP 77, T5 128 on SD3 and 512 on FLUX)
COLORS = ["red", "green", "blue", "yellow", "white", "black"]
THINGS = ["cat", "dog", "car", "cup", "clock", "bicycle", "boat", "bird"]
STYLES = ["a photo of", "a watercolor of", "a studio portrait of"]


def make_prompts(n: int, offset: int) -> list[str]:
    return [f"{STYLES[i % len(STYLES)]} a {COLORS[i % len(COLORS)]} {THINGS[(i // len(COLORS)) % len(THINGS)]}"
            for i in range(offset, offset + n)]


def corpus() -> list[str]:
    return [" ".join(STYLES + COLORS + THINGS + ["a", "an", "the", "of", "and"])] * 4


def clip_tokenizer():
    from shapes import build_clip_tokenizer

    return build_clip_tokenizer(corpus(), 400, 77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    words = dict.fromkeys(" ".join(corpus()).split())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in string.ascii_letters + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# ------------------------------------------------------------------------------------------------
# Building the random models
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def building(device: str | torch.device, dtype: torch.dtype):
    """Modules constructed inside are created on `device` in `dtype` (no float32 copy of a 12B model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def tame(module: torch.nn.Module) -> torch.nn.Module:
    """Every matrix and kernel ~ N(0, 0.02) (norm scales and biases as constructed), so activations stay finite
    through 24-57 random blocks in fp16 and bf16; a non-finite loss would skip the backward pass and make the
    measurement worthless. The values change neither memory nor time."""
    for p in module.parameters():
        if p.ndim >= 2 and p.device.type != "meta":
            p.normal_(0.0, 0.02)
    return module.eval()


def build_pipeline(family: str, size: str, device):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    c = PIPELINES[(family, size)]
    tok, tok_t5 = clip_tokenizer(), t5_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def clip(cfg, cls):
        return tame(cls(CLIPTextConfig(**{"vocab_size": len(tok), **cfg, **ids})))

    def t5(cfg):
        return tame(T5EncoderModel(T5Config(**{"vocab_size": len(tok_t5), **cfg, "pad_token_id": 0,
                                               "eos_token_id": 1, "decoder_start_token_id": 0})))

    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(**c["scheduler"])
    with building(device, torch.bfloat16):
        vae = tame(AutoencoderKL(**c["vae"]))
        if family == "sd3":
            return StableDiffusion3Pipeline(
                transformer=tame(SD3Transformer2DModel(**c["transformer"])), scheduler=scheduler, vae=vae,
                text_encoder=clip(c["text_encoder"], CLIPTextModelWithProjection), tokenizer=tok,
                text_encoder_2=clip(c["text_encoder_2"], CLIPTextModelWithProjection), tokenizer_2=tok,
                text_encoder_3=t5(c["text_encoder_3"]), tokenizer_3=tok_t5)
        return FluxPipeline(transformer=tame(FluxTransformer2DModel(**c["transformer"])), scheduler=scheduler,
                            vae=vae, text_encoder=clip(c["text_encoder"], CLIPTextModel), tokenizer=tok,
                            text_encoder_2=t5(c["text_encoder_2"]), tokenizer_2=tok_t5)


def build_reward_model(kind: str, size: str, device):
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer()
    c = REWARD_MODELS[(kind, size)]
    text = {"vocab_size": len(tok), **c["text_config"], "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(1)
    with building(device, torch.float32):  # the released reward checkpoints are float32
        return tame(CLIPModel(CLIPConfig(text_config=text, vision_config=c["vision_config"],
                                         projection_dim=c["projection_dim"]))), tok


def _numel(module: torch.nn.Module) -> int:
    # parameters (shared ones once) and buffers: SD3's 384 x 384 position table is a saved buffer of 0.23B values
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def parameter_counts(what: str, size: str) -> dict[str, int]:
    """{component: values saved}, from a build on the meta device (no memory, no values)."""
    if what in ("sd3", "flux"):
        pipe = build_pipeline(what, size, "meta")
        return {n: _numel(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    model, _ = build_reward_model(what, size, "meta")
    return {what: _numel(model)}


def save_pipeline(family: str, size: str, folder: Path, device) -> None:
    pipe = build_pipeline(family, size, device)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.to(torch.bfloat16)  # float32 buffers too (SD3's position table), as the released folders hold them
    pipe.save_pretrained(folder, max_shard_size="5GB")
    del pipe
    (folder / "BUILT").write_text(size)  # written last: a folder without it is an interrupted build


def save_reward_model(kind: str, size: str, folder: Path, device) -> None:
    from safetensors.torch import save_file

    from rewards import AestheticMLP

    model, tok = build_reward_model(kind, size, device)
    model.save_pretrained(folder, max_shard_size="5GB")
    tok.save_pretrained(folder)
    side = REWARD_MODELS[(kind, size)]["vision_config"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "size": {"shortest_edge": side},
         "crop_size": {"height": side, "width": side}}))
    if kind == "clip_l":  # the LAION aesthetic head reads CLIP ViT-L/14's projected embedding
        torch.manual_seed(2)
        head = AestheticMLP(REWARD_MODELS[(kind, size)]["projection_dim"])
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, folder / "aesthetic.safetensors")
    del model
    (folder / "BUILT").write_text(size)


def built(folder: Path, size: str) -> bool:
    return (folder / "BUILT").is_file() and (folder / "BUILT").read_text() == size


def reward_env(folders: dict[str, Path]) -> dict[str, str]:
    """$CLEANFLOWRL_MODEL_<KEY> for every reward model key, pointing at the folders built here."""
    env = {}
    if "clip_h" in folders:
        env.update(CLEANFLOWRL_MODEL_PICKSCORE=str(folders["clip_h"]),
                   CLEANFLOWRL_MODEL_PICKSCORE_PROCESSOR=str(folders["clip_h"]))
    if "clip_l" in folders:
        env.update(CLEANFLOWRL_MODEL_CLIPSCORE=str(folders["clip_l"]),
                   CLEANFLOWRL_MODEL_AESTHETIC_CLIP=str(folders["clip_l"]),
                   CLEANFLOWRL_MODEL_AESTHETIC_MLP=str(folders["clip_l"] / "aesthetic.safetensors"))
    return env


# ------------------------------------------------------------------------------------------------
# Running one configuration
# ------------------------------------------------------------------------------------------------
def peak_logger(base):
    """common.Logger that adds, to every record, the CUDA memory peaks since the previous record, then resets
    them: the first record covers loading, prompt encoding and the first evaluation, each iteration's record
    that iteration (sampling, reward, update), the last the final evaluation."""
    class PeakLogger(base):
        def log(self, step, metrics, wall_offset=0.0):
            if torch.cuda.is_available():
                metrics = {**metrics, "memory/peak_gib": torch.cuda.max_memory_allocated() / GIB,
                           "memory/reserved_gib": torch.cuda.max_memory_reserved() / GIB}
                torch.cuda.reset_peak_memory_stats()
            super().log(step, metrics, wall_offset)
    return PeakLogger


def free_memory() -> None:
    import rewards

    rewards._MODELS.clear()  # the reward models of the previous configuration (its process would have ended)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_config(cfg: Config, argv: list[str], overrides: dict, run_dir: Path) -> dict:
    import tyro

    mod = importlib.import_module(cfg.script)
    args = dataclasses.replace(tyro.cli(mod.Args, args=argv), **overrides, out=str(run_dir))
    free_memory()
    base = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None
    logger = mod.Logger
    mod.Logger = peak_logger(logger)
    status, error, t0 = "ok", "", time.time()
    try:
        mod.main(args)
    except torch.cuda.OutOfMemoryError as e:
        status, error = "out of memory", str(e).strip().splitlines()[0]
    except (Exception, SystemExit) as e:  # a failed run is a row of the table, not the end of the benchmark
        status, error = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        mod.Logger = logger
    seconds = time.time() - t0
    final = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
    final_reserved = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None
    free_memory()
    path = run_dir / "metrics.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return summarize(cfg, args, argv, records, status, error, seconds, base, final, final_reserved)


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _mean(values):
    return sum(values) / len(values) if values else None


def summarize(cfg, args, argv, records, status, error, seconds, base, final, final_reserved) -> dict:
    its = [r for r in records if "time/sample" in r]
    evals = [r for r in records if "time/eval" in r]
    warm = its[1:] or its  # the first iteration pays one-off costs (kernel selection, allocator growth)

    def total(r):
        return r["time/sample"] + r.get("time/reward", 0.0) + r["time/train"]

    skipped = sum(r.get("train/skipped", 0) for r in its)
    finite = all(math.isfinite(r.get("reward/mean", 0.0)) for r in its)
    if status == "ok" and (skipped or not finite):
        status, error = "invalid", (f"{skipped} non-finite losses skipped their backward pass" if skipped
                                    else "non-finite rewards")
    if status == "ok" and len(its) < args.steps:
        status, error = "error", f"{len(its)} of {args.steps} iterations logged"
    peak = [r.get("memory/peak_gib") for r in records]
    return {
        "name": cfg.name, "script": cfg.script, "model": MODEL_NAMES[cfg.family], "hub_id": HUB_IDS[cfg.family],
        "dropped": list(cfg.drop), "argv": argv, "reward_run": args.reward, "status": status, "error": error,
        "rollouts_per_iteration": its[0]["samples"] if its else None,
        "memory_gib": {
            "before": base,
            "load_and_first_eval": evals[0].get("memory/peak_gib") if evals else None,
            "training_iteration": _max(r.get("memory/peak_gib") for r in its),
            "final_eval": evals[-1].get("memory/peak_gib") if len(evals) > 1 else None,
            "whole_run": _max(peak + [final]),
            "reserved_whole_run": _max([r.get("memory/reserved_gib") for r in records] + [final_reserved]),
        },
        "seconds": {
            "per_iteration": _mean([total(r) for r in warm]),
            "sample": _mean([r["time/sample"] for r in warm]),
            "reward": _mean([r.get("time/reward", 0.0) for r in warm]),
            "train": _mean([r["time/train"] for r in warm]),
            "first_iteration": total(its[0]) if its else None,
            "eval": _mean([r["time/eval"] for r in evals]),
            "run": seconds,
        },
        "records": records,
    }


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _f(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    s, tiny, v = result["shrunk"], result["tiny"], result["versions"]
    title = " (--tiny: tiny models on the CPU, a test of the script)" if tiny else ""
    sizes = ("tiny sizes instead, at 64 px" if tiny else
             "SD3.5-M: 2.5B MMDiT + CLIP-L, CLIP-G, T5-XXL; FLUX.1-dev: 12B + CLIP-L, T5-XXL")
    timed = "iteration 2's" if s["steps"] == 2 else f"the mean of iterations 2 to {s['steps']}"
    lines = [
        f"# Peak GPU memory and seconds per iteration{title}",
        "",
        f"{result['device']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
        f"peft {v['peft']}; {result['date']}.",
        "",
        "Each row runs its command of docs/real_models.md (`python SCRIPT.py --model HUB_ID ...`, \"The papers' "
        "settings on one GPU\") in one process with every value of the command, on random weights built from the real configs "
        f"({sizes}), saved in bf16 and loaded as the command says. Shrunk: `--steps {s['steps']}` (s / it is "
        f"{timed}; the first is warm-up), evaluation on {s['eval_prompts']} generated prompts x `--eval-per-prompt "
        f"{s['eval_per_prompt']}` (a real evaluation samples up to 64 images per call, so its peak is understated "
        f"here), {s['train_prompts']} generated training prompts. Rewards other than PickScore, CLIPScore and the "
        "aesthetic head are scored by PickScore (random CLIP ViT-H/14, 0.99B in fp32, larger than GenEval's "
        "Mask2Former + CLIP-L)." + (" --tiny also shrinks each group to 2 images (or as many as --minibatches "
                                    "needs), TempFlow-GRPO's seeds to 1 and evaluation to 4 steps." if tiny else ""),
        "",
        "Peak: `torch.cuda.max_memory_allocated` (tensors; the CUDA context adds about 0.5-1 GiB to what "
        "nvidia-smi shows); training = the highest of any training iteration (sampling, reward, update); whole run "
        "= also loading, prompt encoding, evaluations and the checkpoint; reserved = `max_memory_reserved`, what "
        "the caching allocator held.",
        "",
        "| run | model | the command, except | rollouts / it | peak GiB, training | peak GiB, whole run "
        "| reserved GiB | s / it | sample / reward / train s | 1st it s | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in result["rows"]:
        m, t = r["memory_gib"], r["seconds"]
        except_ = ", ".join([f"no `{f}`" for f in r["dropped"]] + ([f"reward `{r['reward_run']}`"]
                            if r["reward_run"] != r["reward_readme"] else [])) or "–"
        status = r["status"] + (f": {r['error'][:120]}" if r["error"] else "")
        lines.append(
            f"| {r['name']} | {r['model']} | {except_} | {r['rollouts_per_iteration'] or '–'} "
            f"| {_f(m['training_iteration'])} | {_f(m['whole_run'])} | {_f(m['reserved_whole_run'])} "
            f"| {_f(t['per_iteration'], 2)} | {_f(t['sample'], 2)} / {_f(t['reward'], 2)} / {_f(t['train'], 2)} "
            f"| {_f(t['first_iteration'], 2)} | {status} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "gpu_memory.json"
    if json_path.is_file():  # merge with an earlier part of the list measured on the same kind of machine
        old = json.loads(json_path.read_text())
        if old.get("tiny") == result["tiny"] and old.get("device") == result["device"]:
            mine = {r["name"] for r in result["rows"]}
            order = [c.name for c in CONFIGS]
            rows = [r for r in old["rows"] if r["name"] not in mine] + result["rows"]
            result["rows"] = sorted(rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    json_path.write_text(json.dumps(result, indent=1))
    (out / "gpu_memory.md").write_text(markdown(result))


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def describe_sizes(label: str, counts: dict[str, int], bytes_per: int) -> tuple[str, int]:
    nbytes = sum(counts.values()) * bytes_per
    parts = ", ".join(f"{k} {v / 1e9:.2f}B" if v >= 1e8 else f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
    return f"  {label}: {parts}; {nbytes / GIB:.1f} GiB on disk", nbytes


def available_ram() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the same code path, seconds)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these configurations (see --list)")
    p.add_argument("--list", action="store_true", help="print the configurations and their command values, then exit")
    p.add_argument("--steps", type=int, default=2, help="training iterations per configuration (the first is warm-up)")
    p.add_argument("--eval-prompts", type=int, default=2, help="generated evaluation prompts")
    p.add_argument("--eval-per-prompt", type=int, default=1, help="evaluation images per prompt")
    p.add_argument("--train-prompts", type=int, default=16, help="generated training prompts")
    p.add_argument("--models-dir", help="build the random models here and keep them (reused when complete); "
                   "unset: a temporary folder, each model deleted once its configurations have run")
    p.add_argument("--out", help="folder of gpu_memory.md / .json (default benchmarks/results/gpu_memory, "
                   "runs/gpu_memory_tiny with --tiny)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)

    names = [c.name for c in CONFIGS]
    unknown = [n for n in a.only or [] if n not in names]
    if unknown:
        raise SystemExit(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    configs = [c for c in CONFIGS if not a.only or c.name in a.only]
    commands = readme_commands()
    argvs = {c.name: readme_argv(c, commands) for c in configs}
    if a.list:
        for c in configs:
            print(f"{c.name}: python {c.script}.py {shlex.join(argvs[c.name])}")
        return {}
    if a.steps < 2:
        raise SystemExit("--steps must be at least 2: the first iteration is warm-up and is not timed")
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_memory.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                         "`--tiny` runs the same code path on tiny models on the CPU")
    size = "tiny" if a.tiny else "full"
    device = "cpu" if a.tiny else "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else ROOT / ("runs/gpu_memory_tiny" if a.tiny else "benchmarks/results/gpu_memory")

    import tyro

    readme_args = {c.name: tyro.cli(importlib.import_module(c.script).Args, args=argvs[c.name]) for c in configs}
    readme_rewards = {name: args.reward for name, args in readme_args.items()}
    families = list(dict.fromkeys(c.family for c in configs))
    reward_kinds = sorted({BUILT_REWARDS[t] for r in readme_rewards.values() for t in reward_terms(stand_in_reward(r))
                           if BUILT_REWARDS[t]})

    # what the build needs, before building anything
    print(f"gpu_memory: {len(configs)} configuration(s) on {device}; random models ({size} sizes):")
    need, text_encoders = {}, 0
    for fam in families:
        counts = parameter_counts(fam, size)
        line, need[fam] = describe_sizes(f"{MODEL_NAMES[fam]} pipeline (bf16)", counts, 2)
        text_encoders = max(text_encoders, 2 * sum(n for k, n in counts.items() if k.startswith("text_encoder")))
        print(line)
    for kind in reward_kinds:
        line, need[kind] = describe_sizes(f"reward {kind} (fp32)", parameter_counts(kind, size), 4)
        print(line)
    temporary = a.models_dir is None
    models_dir = Path(a.models_dir) if a.models_dir else Path(tempfile.gettempdir()) / "gpu_memory_models_?"
    folders = {k: models_dir / f"{k}_{size}" for k in need}
    to_build = {k: n for k, n in need.items() if not built(folders[k], size)}
    # deleted after use when temporary: at most the rewards and one pipeline are on disk at a time
    disk = (sum(n for k, n in to_build.items() if k in reward_kinds) + max([n for k, n in to_build.items()
            if k in families] or [0])) if temporary else sum(to_build.values())
    free = shutil.disk_usage(next(d for d in [models_dir, *models_dir.parents] if d.exists())).free
    ram, shard = available_ram(), min(5 * 10**9, max(need.values()))
    print(f"  disk: {disk / GIB:.1f} GiB to write at {models_dir} ({free / GIB:.0f} GiB free); RAM: about "
          f"{(shard + text_encoders) / GIB:.0f} GiB (a shard of at most 5 GB while saving, the text encoders after "
          f"--offload-text-encoders) plus page cache for the folder being loaded"
          + (f"; {ram:.0f} GiB available" if ram is not None else ""))
    if disk * 1.05 > free:
        raise SystemExit(f"not enough disk at {models_dir}: {disk / GIB:.1f} GiB needed, {free / GIB:.1f} GiB free "
                         f"(pass --models-dir on a larger disk)")
    if temporary:
        models_dir = Path(tempfile.mkdtemp(prefix="gpu_memory_models_"))
        folders = {k: models_dir / f"{k}_{size}" for k in need}
    models_dir.mkdir(parents=True, exist_ok=True)
    saved_env = {k: os.environ.get(k) for k in reward_env(folders)}
    work = Path(tempfile.mkdtemp(prefix="gpu_memory_runs_"))
    prompts, eval_prompts = work / "train.txt", work / "eval.txt"
    prompts.write_text("\n".join(make_prompts(a.train_prompts, 0)) + "\n")
    eval_prompts.write_text("\n".join(make_prompts(a.eval_prompts, a.train_prompts)) + "\n")
    import diffusers
    import peft
    import transformers

    result = {
        "tiny": a.tiny,
        "device": (f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB)"
                   if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads)"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "shrunk": {"steps": a.steps, "eval_prompts": a.eval_prompts, "eval_per_prompt": a.eval_per_prompt,
                   "train_prompts": a.train_prompts},
        "rows": [],
    }
    try:
        for kind in reward_kinds:
            if kind in to_build:
                t0 = time.time()
                save_reward_model(kind, size, folders[kind], device)
                print(f"built reward {kind} in {time.time() - t0:.0f} s", flush=True)
        os.environ.update(reward_env(folders))
        for fam in families:
            if fam in to_build:
                t0 = time.time()
                print(f"building the random {MODEL_NAMES[fam]} pipeline at {folders[fam]} ...", flush=True)
                save_pipeline(fam, size, folders[fam], device)
                free_memory()
                print(f"built in {time.time() - t0:.0f} s", flush=True)
            for c in (c for c in configs if c.family == fam):
                overrides = dict(model=str(folders[fam]), prompts=str(prompts), eval_prompts=str(eval_prompts),
                                 steps=a.steps, eval_every=a.steps, save_every=a.steps,
                                 eval_per_prompt=a.eval_per_prompt, reward=stand_in_reward(readme_rewards[c.name]),
                                 device=device, threads=a.threads, max_minutes=0.0)
                if a.tiny:
                    overrides.update(tiny_overrides(readme_args[c.name]))
                print(f"\n=== {c.name}: python {c.script}.py {shlex.join(argvs[c.name])}", flush=True)
                row = run_config(c, argvs[c.name], overrides, work / c.name)
                row["reward_readme"] = readme_rewards[c.name]
                result["rows"].append(row)
                m, t = row["memory_gib"], row["seconds"]
                print(f"=== {c.name}: {row['status']} {row['error']}; peak {_f(m['training_iteration'])} GiB training, "
                      f"{_f(m['whole_run'])} GiB whole run; {_f(t['per_iteration'], 2)} s / it", flush=True)
                write(dict(result, rows=list(result["rows"])), out)  # after every row: a killed run keeps its rows
            if temporary:
                shutil.rmtree(folders[fam], ignore_errors=True)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)
        if temporary:
            shutil.rmtree(models_dir, ignore_errors=True)
    write(result, out)
    print("\n" + (out / "gpu_memory.md").read_text())
    print(f"wrote {out / 'gpu_memory.md'} and {out / 'gpu_memory.json'}")
    return result


if __name__ == "__main__":
    main()
