"""What every algorithm shares: the sigma schedule, the SDE step with its log-probability, rollouts,
the policy wrapper over a backend (SD3, the shapes world's too, and FLUX) with LoRA and a reference context,
prompt-embedding cache, group advantages, evaluation, logging, image grids, checkpoints and resume.

Conventions (rectified flow, as SD3 / FLUX): t = sigma in [0, 1], x_t = (1 - t) * x0 + t * eps,
the model predicts the velocity v = eps - x0, sampling integrates from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_BASE = ASSETS / "shapes_base"


# ----------------------------------------------------------------------------------------------
# Device, seeding
# ----------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """'auto' takes CUDA when present, else the CPU; asking for CUDA without one is an error. Under torchrun
    each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but no CUDA device is available: use --device cpu or auto")
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    dev = torch.device(name)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)  # denormals made CPU conv steps ~15x slower
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


# ----------------------------------------------------------------------------------------------
# Many processes (torchrun): torch.distributed, NCCL on CUDA and gloo on the CPU. A single process is the world
# of size 1 and takes the same code path: every collective below returns its input there.
# ----------------------------------------------------------------------------------------------
_COLLECTIVE_DEVICE = torch.device("cpu")  # where collectives run: this rank's GPU under NCCL


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join torchrun's process group when it launched this process (WORLD_SIZE > 1); returns (rank, world size)."""
    import torch.distributed as dist

    global _COLLECTIVE_DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        _COLLECTIVE_DEVICE = device
    return rank(), world_size()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """t summed (or maxed) over the ranks, in place; on one process t itself."""
    import torch.distributed as dist

    if world_size() > 1:
        x = t.to(_COLLECTIVE_DEVICE)
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        t.copy_(x)
    return t


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects: metrics, CPU tensors, generator states)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over the ranks, so that every rank takes the same optimiser step. Each rank's loss is
    already divided by the global minibatch size, so the sum is the gradient of the global mean. Flattened into one
    buffer: one collective per optimiser step."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.flatten() for g in grads]))
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def global_rows(n_local: int) -> torch.Tensor:
    """This rank's rows as indices of the global batch: rank r holds rows r * n_local ... (r + 1) * n_local - 1."""
    return rank() * n_local + torch.arange(n_local)


def local_minibatches(ids: torch.Tensor, minibatches: int, gen: torch.Generator) -> list[tuple]:
    """The global batch's rows shuffled by the generator every rank shares and split into minibatches, as one process
    would split the same global batch. `ids` are this rank's rows as global indices (global_rows). For each
    minibatch: this rank's rows in it (indices into ids), their positions in the minibatch, and its global size
    (the loss's denominator)."""
    everyone = torch.cat(all_gather_objects(ids.cpu())).sort().values  # the global batch, in one process's order
    out = []
    for chunk in everyone[torch.randperm(len(everyone), generator=gen)].chunk(minibatches):
        mine = (chunk.unsqueeze(1) == ids.cpu().unsqueeze(0)).nonzero()  # (position in chunk, index into ids)
        out.append((mine[:, 1], mine[:, 0], len(chunk)))
    return out


def print0(*args) -> None:
    """print on rank 0 only."""
    if rank() == 0:
        print(*args)


def gather_scores(rewards: torch.Tensor, info: dict, adv: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Every rank's rewards, reward info and advantages, concatenated in rank order (for the log)."""
    if world_size() == 1:
        return rewards, info, adv
    parts = all_gather_objects((rewards.cpu(), {k: v.cpu() for k, v in info.items()}, adv.cpu().flatten()))
    return (torch.cat([p[0] for p in parts]), {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]},
            torch.cat([p[2] for p in parts]))


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_metrics(metrics: dict) -> dict:
    """Every logged value averaged over the ranks (the largest for the on-policy ratio error)."""
    if world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    worst = torch.tensor([float(metrics[k]) if k.endswith("_err") else 0.0 for k in keys], dtype=torch.float64)
    mean = all_reduce(values) / world_size()
    worst = all_reduce(worst, "max")
    return {k: (worst[i] if k.endswith("_err") else mean[i]).item() for i, k in enumerate(keys)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# The sampler: sigma schedule, SDE step with log-prob, rollout
# ----------------------------------------------------------------------------------------------
def sigma_schedule(num_steps: int, shift: float, spacing: str = "sd3") -> torch.Tensor:
    """num_steps + 1 sigmas from 1 down to 0, as the model's diffusers pipeline spaces them, plus the final 0.

    Both spacings end with the shift s -> shift * s / (1 + (shift - 1) * s) (FLUX: shift = e^mu). Before it:
    - "sd3" (SD3, the shapes world too): FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)
      spaces sigmas linearly between 1 and its shifted sigma_min (training ends at t = 1/1000), then shifts them;
    - "flux": FluxPipeline hands the scheduler linspace(1, 1/T, T), so the last nonzero sigma is much larger
      (T = 10, shift 3: 0.25 against 0.0089)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift is None:
        raise ValueError("shift is unset: the scripts take it from policy.default_shift; pass a number")

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    if spacing == "sd3":
        s = shifted(np.linspace(1.0, shifted(np.float64(1.0 / 1000)), num_steps, dtype=np.float64))
    elif spacing == "flux":
        s = shifted(np.linspace(1.0, 1.0 / num_steps, num_steps, dtype=np.float64))
    else:
        raise ValueError(f"unknown sigma spacing {spacing!r}; known: sd3, flux")
    return torch.tensor(np.append(s, 0.0), dtype=torch.float32)


class Step(NamedTuple):
    sample: torch.Tensor  # x_{t-1}
    log_prob: torch.Tensor | None  # mean over non-batch dims of log N(sample; mean, std^2); None for the ODE
    mean: torch.Tensor  # mu_theta(x_t)
    std: torch.Tensor  # transition std sigma_t * sqrt(-dt), broadcastable to the sample


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a float32 tensor broadcastable against `like` (B, ...)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


def _sigma_t(sig: torch.Tensor, sig_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)), with 1 - t replaced by 1 - sigma_next at t = 1."""
    return noise_level * torch.sqrt(sig / (1 - torch.where(sig == 1, sig_next, sig)))


def sde_step(x, v, sigma, sigma_next, noise_level: float, noise=None, prev_sample=None, generator=None,
             constant: bool = False) -> Step:
    """One Euler-Maruyama step of the marginal-preserving reverse SDE of rectified flow (Flow-GRPO):

        dx = [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a * sqrt(t / (1 - t))

    with t = sigma, dt = sigma_next - sigma < 0 and a = noise_level. At t = 1 the denominator 1 - t is
    replaced by 1 - sigma_next. a = 0 is the plain Euler ODE step x + v * dt, which has no density.
    constant=True takes sigma_t = a at every t: DanceGRPO's SDE (see dance_grpo.dance_step).
    All arithmetic is float32, whatever the model's dtype. sigma and sigma_next are floats or (B,) tensors.
    """
    x, v = x.float(), v.float()
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sig_next - sig
    std_t = torch.full_like(sig, noise_level) if constant else _sigma_t(sig, sig_next, noise_level)
    mean = x + (v + std_t**2 / (2 * sig) * (x + (1 - sig) * v)) * dt
    std = std_t * torch.sqrt(-dt)
    if noise_level == 0:
        if prev_sample is not None:
            raise ValueError("noise_level 0 is the deterministic ODE step: it has no density, so no log-prob of "
                             "prev_sample exists; use noise_level > 0 on the steps you train")
        return Step(mean, None, mean, std)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return Step(prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std)


def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, sigma, sigma_next, noise_level: float) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of one SDE step, per sample, in the reference code's form (Flow-GRPO's trainers):

        ||mu_theta - mu_ref||^2 / (2 sigma_t^2),   mean over non-batch dims,   sigma_t = a sqrt(t / (1 - t))

    The two steps are Gaussians with the same std sigma_t sqrt(-dt), so their exact KL is
    ||mu_theta - mu_ref||^2 / (2 sigma_t^2 |dt|): this form is the exact KL times |dt| (3.7-25x smaller at 10
    steps, shift 3). Using it makes a beta copied from a paper's config mean what it means there."""
    sig, sig_next = _per_sample(sigma, mean), _per_sample(sigma_next, mean)
    std_t = _sigma_t(sig, sig_next, noise_level).flatten()
    return ((mean.float() - mean_ref.float()) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std_t**2)


class Rollout(NamedTuple):
    latents: torch.Tensor  # (B, T + 1, ...) the states x_{t_0} ... x_{t_T} visited from `start`
    log_probs: torch.Tensor  # (B, T) log-prob of each transition; 0 where the step was the ODE


def rollout(policy, cond, x, sigmas, noise_levels, guidance: float, generator=None, start: int = 0,
            chunk: int = 0) -> Rollout:
    """Sample from step `start` to the end of `sigmas`, with noise level noise_levels[i] on step i
    (0 = ODE step). Keeps every state and the log-prob of every stochastic transition. chunk > 0 samples the
    rows in chunks of that many, one after the other (less memory, the same distribution)."""
    if 0 < chunk < len(x):
        parts = [rollout(policy, index_cond(cond, rows), x[rows], sigmas, noise_levels, guidance, generator, start)
                 for rows in torch.arange(len(x), device=x.device).split(chunk)]
        return Rollout(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]))
    latents, log_probs = [x.float()], []
    for i in range(start, len(sigmas) - 1):
        v = policy.velocity(x, sigmas[i], cond, guidance)
        step = sde_step(x, v, sigmas[i], sigmas[i + 1], float(noise_levels[i]), generator=generator)
        x = step.sample
        latents.append(x)
        log_probs.append(step.log_prob if step.log_prob is not None else torch.zeros(len(x), device=x.device))
    log_probs = torch.stack(log_probs, 1) if log_probs else torch.zeros(len(x), 0, device=x.device)  # no steps
    return Rollout(torch.stack(latents, 1), log_probs)


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample rectified-flow loss ||v_theta(x_t, t) - (eps - x0)||^2, mean over non-batch dims."""
    err = (v_pred.float() - (noise.float() - x0.float())) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


# ----------------------------------------------------------------------------------------------
# Group advantages (GRPO)
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, global_std: bool = False, eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std + eps), the std taken within the group or over the whole batch.
    `groups` holds one integer id per sample (the prompt's index); a group needs at least 2 samples."""
    rewards = rewards.double()  # float64: equal rewards get exactly 0 (float32's mean of them can be off by a rounding)
    adv = torch.empty_like(rewards)
    if global_std:  # the population std of every rank's rewards: the global mean first, then the squared deviations
        n = all_reduce(torch.tensor([rewards.sum().item(), len(rewards)], dtype=torch.float64))
        dev2 = all_reduce(((rewards - n[0] / n[1]) ** 2).sum().view(1))
        batch_std = (dev2[0] / n[1]).sqrt()
    for g in groups.unique():
        m = groups == g
        if m.sum() < 2:
            raise ValueError("a group needs at least 2 samples to have an advantage: raise --group-size")
        r = rewards[m]
        std = batch_std if global_std else r.std(unbiased=False)  # groups never span ranks
        adv[m] = (r - r.mean()) / (std + eps)
    return adv.float()


# ----------------------------------------------------------------------------------------------
# The policy: one wrapper over every backend
# ----------------------------------------------------------------------------------------------
def _stack_cond(conds: list[dict]) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def index_cond(cond: dict, idx) -> dict:
    return {k: v[idx] for k, v in cond.items()}


GRID_PROMPTS = 64  # the evaluation grid shows the first sample of the first this many held-out prompts
DECODE_CHUNK = 8  # images per VAE decode call: at 512-1024 px the VAE's activations set the peak memory
ENCODE_CHUNK = 32  # prompts per text-encoder call when filling the prompt cache
FLUX_MAX_TOKENS = 512  # T5 tokens of FLUX prompts (FluxPipeline's default max_sequence_length)
SD3_T5_TOKENS = 128  # T5 tokens of SD3 prompts (Flow-GRPO's); a pipeline without T5 gets zeros as long as CLIP's


class Policy:
    """A flow model as a policy: encode prompts (cached), predict velocities (CFG, or FLUX's embedded
    guidance, inside), decode to images.

    Trainable parameters are LoRA adapters (peft) on the denoiser, or the whole denoiser when
    lora_rank == 0. `reference()` gives the frozen base: the adapters disabled, or a frozen copy.
    `default_shift` is the model's own time shift of the sigma schedule, `sigmas()` spaces the schedule as
    the model's pipeline does; `components` names every model (denoiser, text encoders, VAE) for the memory
    estimate."""

    def __init__(self, backend: str, denoiser, encode_fn, decode_fn, latent_shape, device, dtype=torch.float32,
                 text_encoders: dict | None = None, vae=None, default_shift: float = 3.0,
                 extra_inputs: dict | None = None):
        self.backend, self.denoiser, self._encode, self._decode = backend, denoiser, encode_fn, decode_fn
        self.latent_shape, self.device, self.dtype = tuple(latent_shape), device, dtype
        self.text_encoders = dict(text_encoders or {})
        self.components = {"denoiser": denoiser, **self.text_encoders, **({"vae": vae} if vae is not None else {})}
        self.default_shift = float(default_shift)
        self.extra_inputs = dict(extra_inputs or {})  # FLUX: txt_ids / img_ids, built once for the resolution
        self.text_device = device  # where the text encoders run: the CPU after offload_text_encoders()
        self.cache: dict[str, dict[str, torch.Tensor]] = {}  # prompt -> its embeddings (a batch of 1), on the CPU
        self.denoiser.requires_grad_(False)
        self.frozen_copy = None
        self.clock = {"forward": 0.0, "backward": 0.0}  # seconds inside model calls, for time/ metrics
        # the empty prompt's embedding for CFG; FLUX is guidance-distilled and never needs it
        self.uncond = None if backend == "flux" else self.encode([""])

    def sigmas(self, num_steps: int, shift: float) -> torch.Tensor:
        """The num_steps + 1 sigmas of a rollout, spaced as this model's pipeline spaces them."""
        return sigma_schedule(num_steps, shift, "flux" if self.backend == "flux" else "sd3")

    # -- trainable parameters ----------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        if rank == 0:  # full fine-tuning; the reference is a frozen copy of the base
            self.frozen_copy = copy.deepcopy(self.denoiser).requires_grad_(False)
            self.denoiser.requires_grad_(True)
            return
        from peft import LoraConfig

        self.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                             target_modules=targets))
        for p in self.trainable_parameters():
            p.data = p.data.float()  # adapters train in fp32 even over bf16 / fp16 weights

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.denoiser.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"checkpoint has parameters this policy lacks ({missing[:3]}...): "
                             "was it saved with other --model / --lora-rank settings?")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    @contextlib.contextmanager
    def reference(self):
        """The frozen base policy pi_ref (for KL terms and regularisers)."""
        if self.frozen_copy is not None:
            live, self.denoiser = self.denoiser, self.frozen_copy
            try:
                yield
            finally:
                self.denoiser = live
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    # -- memory ------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's block activations in the backward pass instead of storing them."""
        self.denoiser.enable_gradient_checkpointing()

    @torch.no_grad()
    def offload_text_encoders(self, prompts: list[str]) -> None:
        """Encode `prompts` once into the cache, then move the text encoders to the CPU. A prompt not
        cached later is still encoded, on the CPU (slowly)."""
        self.encode(list(prompts))
        for m in self.text_encoders.values():
            m.to("cpu")
        self.text_device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the model --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """Prompt embeddings; each distinct prompt is encoded once and cached (on the CPU) for the run."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        for i in range(0, len(missing), ENCODE_CHUNK):
            chunk = missing[i:i + ENCODE_CHUNK]
            out = self._encode(chunk, self.text_device)
            for j, p in enumerate(chunk):
                self.cache[p] = {k: v[j:j + 1].to("cpu", copy=True) for k, v in out.items()}
        keys = self.cache[prompts[0]].keys()
        return {k: torch.cat([self.cache[p][k] for p in prompts]).to(self.device) for k in keys}

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), timed into self.clock["backward"]."""
        t0 = self._sync()
        loss.backward()
        self.clock["backward"] += self._sync() - t0

    def _forward(self, x, sigma: torch.Tensor, cond: dict, guidance: float | None = None) -> torch.Tensor:
        t0 = self._sync()
        out = self._denoise(x, sigma, cond, guidance)
        self.clock["forward"] += self._sync() - t0
        return out

    def _denoise(self, x, sigma: torch.Tensor, cond: dict, guidance: float | None) -> torch.Tensor:
        with self._autocast():
            if self.backend == "sd3":  # diffusers' timestep convention: t = 1000 sigma
                out = self.denoiser(hidden_states=x.to(self.dtype), timestep=sigma * 1000,
                                    encoder_hidden_states=cond["hidden"], pooled_projections=cond["pooled"],
                                    return_dict=False)[0]
            else:  # flux: the timestep is sigma itself (the transformer multiplies by 1000), guidance an input
                g = torch.full_like(sigma, guidance) if self.denoiser.config.guidance_embeds else None
                out = self.denoiser(hidden_states=x.to(self.dtype), timestep=sigma, guidance=g,
                                    encoder_hidden_states=cond["hidden"], pooled_projections=cond["pooled"],
                                    return_dict=False, **self.extra_inputs)[0]
        return out.float()

    def velocity(self, x, sigma, cond: dict, guidance: float) -> torch.Tensor:
        """v_theta(x, sigma | c). SD3: with guidance w > 1, CFG v_u + w * (v_c - v_u) against the
        empty prompt (a second, unconditional pass). FLUX (guidance-distilled): w is fed to the
        transformer's guidance embedding, one pass, no CFG (ignored by models without guidance_embeds)."""
        b = len(x)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        if self.backend == "flux":
            return self._forward(x, sig, cond, guidance)
        if guidance == 1:
            return self._forward(x, sig, cond)
        unc = {k: v.expand(b, *v.shape[1:]) for k, v in self.uncond.items()}
        v_u, v_c = self._forward(torch.cat([x, x]), torch.cat([sig, sig]), _stack_cond([unc, cond])).chunk(2)
        return v_u + guidance * (v_c - v_u)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], (B, 3, H, W) float32, DECODE_CHUNK images per decoder call."""
        return torch.cat([self._decode(c).float().clamp(0, 1) for c in x.split(DECODE_CHUNK)])

    def noise(self, n: int, generator=None) -> torch.Tensor:
        """x_1 ~ N(0, I) of the latent shape (FLUX: the packed (seq_len, 4 * channels) shape; i.i.d., so
        drawing it packed is the same distribution as packing a (channels, h, w) draw)."""
        return torch.randn((n, *self.latent_shape), generator=generator, device=self.device)


def weight_memory(policy: Policy) -> str:
    """An estimate of the memory held by weights: parameter count x bytes per element of each component,
    plus the trainable parameters in fp32 five times over (weights, gradients, AdamW's two moments, the EMA).
    Activations, the VAE's decode and the reward models are not included."""
    def gib(nbytes):
        return f"{nbytes / 2**30:.2f} GiB"

    def count(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    parts, total = [], 0
    frozen = dict(policy.components, **({"reference copy": policy.frozen_copy} if policy.frozen_copy is not None else {}))
    for name, module in frozen.items():
        params = [p for p in module.parameters() if not p.requires_grad]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))
        where = params[0].device.type if params else "-"
        parts.append(f"{name} {count(sum(p.numel() for p in params))} x {dtypes} = {gib(nbytes)} ({where})")
        total += nbytes
    n = sum(p.numel() for p in policy.trainable_parameters())
    parts.append(f"trainable {count(n)} x float32 x 5 (weights, grads, AdamW m and v, EMA) = {gib(n * 20)}")
    total += n * 20
    return f"weight memory (activations not included): {'; '.join(parts)}; total {gib(total)}"


SD3_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# FLUX, as Flow-GRPO's FLUX trainer: the same attention names (the double blocks' joint attention, and to_q / to_k /
# to_v of the single blocks, which have no to_out) plus the double blocks' feed-forward layers of both streams; the
# single blocks' proj_out and proj_mlp are not adapted
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def vae_decode(vae, x: torch.Tensor) -> torch.Tensor:
    """SD3's latent convention (FLUX's too, after unpacking): x = (z - shift_factor) * scaling_factor, so
    z = x / scaling_factor + shift_factor is decoded, and the decoder's [-1, 1] mapped to [0, 1]."""
    z = x.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(z, return_dict=False)[0] / 2 + 0.5


def _cannot_load(model: str, e: Exception) -> SystemExit:
    cause = f"cannot load --model {model!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
    folder = Path(model).expanduser()
    if folder.exists() or model.startswith(("/", ".", "~")):  # a local path: no download can help
        what = "does not exist" if not folder.exists() else "is not a complete diffusers pipeline folder"
        return SystemExit(cause + f"The folder {folder} {what}: pass a folder written by the pipeline's "
                          f"save_pretrained (model_index.json and one subfolder per component), or a hub id.")
    return SystemExit(
        cause + f"It is not in the Hugging Face cache (and the hub is unreachable or HF_HUB_OFFLINE=1 is set). "
        f"Fetch it once where the hub is reachable with `hf download {model}` (`huggingface-cli download` with "
        f"huggingface_hub < 1.0; gated models need `hf auth login` first), or pass a local folder.")


def _load_pipeline(cls, model: str, dtype):
    try:  # components saved as absent (e.g. SD3 without T5) are passed as None, or from_pretrained refuses them
        absent = {k: None for k, v in cls.load_config(model).items() if v == [None, None]}
        return cls.from_pretrained(model, dtype=dtype, **absent)
    except (OSError, ValueError) as e:
        raise _cannot_load(model, e) from None


def _frozen(pipe, device):
    """The pipeline on `device`, every model frozen and in eval mode (the policy unfreezes what it trains)."""
    pipe.to(device)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    return pipe


def _text_encoders(pipe) -> dict:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def check_resolution(kind: str, resolution: int | None, transformer: dict, vae: dict) -> None:
    """Stops on a --resolution the pipeline cannot generate. It reads only the transformer's and the VAE's
    configs, so load_policy calls it before any weights load (and each policy again on its pipeline)."""
    f = 2 ** (len(vae["block_out_channels"]) - 1)  # the pipelines' vae_scale_factor
    if kind == "flux" and resolution and resolution % (2 * f):
        raise SystemExit(f"--resolution {resolution}: FLUX packs 2x2 latent patches, so it must be a multiple of {2 * f}")
    largest = (transformer.get("pos_embed_max_size") or 0) * transformer["patch_size"] * f
    if kind == "sd3" and resolution and largest and resolution > largest:  # SD3 crops its position embedding
        raise SystemExit(f"--resolution {resolution}: this pipeline's transformer generates at most {largest}x{largest}"
                         f" px (pos_embed_max_size); pass at most {largest}, or leave it unset for "
                         f"{min(512, transformer['sample_size'] * f)}")


def sd3_policy(pipe, device, dtype=torch.float32, resolution: int | None = None) -> Policy:
    """A diffusers StableDiffusion3Pipeline as a policy: SD3 / 3.5, or the shapes world's tiny one."""
    pipe = _frozen(pipe, device)
    vae = pipe.vae
    f = pipe.vae_scale_factor
    check_resolution("sd3", resolution, pipe.transformer.config, pipe.vae.config)
    resolution = resolution or min(512, pipe.default_sample_size * f)  # the shapes pipeline's: 32
    t5_tokens = SD3_T5_TOKENS if pipe.text_encoder_3 is not None else pipe.tokenizer_max_length

    def encode(prompts, dev):
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              device=dev, max_sequence_length=t5_tokens)
        return {"hidden": pe, "pooled": pooled}

    shape = (pipe.transformer.config.in_channels, resolution // f, resolution // f)
    return Policy("sd3", pipe.transformer.eval(), encode, functools.partial(vae_decode, vae), shape, device, dtype,
                  text_encoders=_text_encoders(pipe), vae=vae, default_shift=pipe.scheduler.config.get("shift", 3.0))


def flux_policy(pipe, device, dtype=torch.float32, resolution: int | None = None) -> Policy:
    """A diffusers FluxPipeline (FLUX.1) as a policy.

    Latents are packed: 2x2 patches of the VAE's 16 channels become tokens, so the policy's latent is
    (seq_len, 64) with seq_len = (H / 16) * (W / 16); text ids (zeros) and image ids (row, column) are built
    once for the resolution. The transformer takes the timestep as sigma, and the guidance scale as an
    embedding (FLUX.1-dev is guidance-distilled, so there is no CFG pass). The scheduler's dynamic shift
    sigma' = e^mu / (e^mu + (1 / sigma - 1)) is our shift with shift = e^mu, mu = calculate_shift(seq_len)."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = _frozen(pipe, device)
    vae = pipe.vae
    f = pipe.vae_scale_factor
    check_resolution("flux", resolution, pipe.transformer.config, pipe.vae.config)
    resolution = resolution or 512
    side = resolution // (2 * f)  # tokens per row and column
    seq_len = side * side

    def encode(prompts, dev):
        pe, pooled, _ = pipe.encode_prompt(prompts, None, device=dev, max_sequence_length=FLUX_MAX_TOKENS)
        return {"hidden": pe, "pooled": pooled}

    def decode(x):
        return vae_decode(vae, FluxPipeline._unpack_latents(x, resolution, resolution, f))  # -> (B, 16, H/8, W/8)

    sched = pipe.scheduler.config
    if sched.get("use_dynamic_shifting", False):
        mu = calculate_shift(seq_len, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                             sched.get("base_shift", 0.5), sched.get("max_shift", 1.15))
        shift = math.exp(mu)
    else:
        shift = sched.get("shift", 1.0)
    ids = {"txt_ids": torch.zeros(FLUX_MAX_TOKENS, 3, device=device),
           "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, torch.float32)}
    shape = (seq_len, pipe.transformer.config.in_channels)
    return Policy("flux", pipe.transformer.eval(), encode, decode, shape, device, dtype,
                  text_encoders=_text_encoders(pipe), vae=vae, default_shift=shift, extra_inputs=ids)


def load_policy(model: str | None, device, mixed_precision: str = "bf16", resolution: int | None = None,
                gradient_checkpointing: bool = False) -> Policy:
    """The diffusers pipeline at `model` (hub id or local folder; None: the embedded shapes world's, a tiny
    StableDiffusion3Pipeline in assets/), SD3 or FLUX by its model_index.json's `_class_name`."""
    from diffusers import AutoencoderKL, DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

    backends = {"StableDiffusion3Pipeline": ("sd3", StableDiffusion3Pipeline, sd3_policy),
                "FluxPipeline": ("flux", FluxPipeline, flux_policy)}
    if model is None and not (SHAPES_BASE / "model_index.json").is_file():
        raise SystemExit(f"the shapes base model is missing at {SHAPES_BASE}: run `python pretrain.py` to rebuild it")
    model = str(SHAPES_BASE) if model is None else model
    try:
        name = DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, ValueError) as e:
        raise _cannot_load(model, e) from None
    if name not in backends:
        raise SystemExit(f"--model {model!r} is a {name}; supported: {', '.join(backends)}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mixed_precision]
    if device.type == "cpu":
        dtype = torch.float32  # half precision on the CPU is slow and inexact
    kind, cls, make_policy = backends[name]
    try:
        configs = [AutoencoderKL.load_config(model, subfolder=part) for part in ("transformer", "vae")]  # config.json
    except (OSError, ValueError) as e:
        raise _cannot_load(model, e) from None
    check_resolution(kind, resolution, *configs)  # before the weights load
    policy = make_policy(_load_pipeline(cls, model, dtype), device, dtype, resolution)
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy


DEFAULT_LORA_RANK = {"sd3": 32, "flux": 64}  # the reference trainers' LoRA
FULL_FINETUNE_BELOW = 10_000_000  # denoiser parameters: smaller ones (the shapes world's) train every weight


def lora_config(policy: Policy, rank: int | None, alpha: float | None) -> tuple[int, float]:
    """--lora-rank and --lora-alpha resolved: unset rank -> 0 (every weight) for a denoiser under 10M parameters,
    else the backend's default; unset alpha -> 2 x rank."""
    if rank is None:
        small = sum(p.numel() for p in policy.denoiser.parameters()) < FULL_FINETUNE_BELOW
        rank = 0 if small else DEFAULT_LORA_RANK[policy.backend]
    return rank, 2.0 * rank if alpha is None else alpha


def lora_targets(policy: Policy) -> list[str]:
    return SD3_LORA_TARGETS if policy.backend == "sd3" else FLUX_LORA_TARGETS


@contextlib.contextmanager
def swapped_params(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Temporarily load `values` into `params` (e.g. EMA weights), restoring the live weights after."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)


@torch.no_grad()
def ema_update(shadow: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * params."""
    for s, p in zip(shadow, params):
        s.lerp_(p.detach(), 1 - decay)


class EMA:
    """Exponential moving average of the trainable parameters, swapped in for evaluation."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    def update(self) -> None:
        ema_update(self.shadow, self.params, self.decay)

    def swapped_in(self):
        return swapped_params(self.params, self.shadow)


ONPOLICY_TOLERANCE = 1e-3
_WARNED: set[str] = set()


def warn_off_policy(stats: dict) -> None:
    """Warn once when the first minibatch's ratio, which is on-policy and must be 1, is off by more than 1e-3:
    the recomputed log-prob differs from the sampled one (in bf16 it can depend on the batch size; a port of a new
    model that gets this wrong trains on noise)."""
    err = stats.get("train/onpolicy_ratio_err", 0.0)
    if err > ONPOLICY_TOLERANCE and "onpolicy" not in _WARNED:
        _WARNED.add("onpolicy")
        print(f"warning: train/onpolicy_ratio_err {err:.2e} > {ONPOLICY_TOLERANCE:g}: the first minibatch's ratio "
              "should be exactly 1; the training forward pass does not reproduce the sampler's log-probs "
              "(try --mixed-precision fp32 to check whether half precision is the cause)")


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------
def load_prompts(path: str | None, split: str) -> list[str]:
    """Prompts from a text file (one per line), or the shapes world's train / eval split."""
    if path is None:
        from shapes import prompt_split

        return prompt_split(split)
    if not Path(path).is_file():
        raise SystemExit(f"prompts file {path} does not exist: pass a text file with one prompt per line")
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"prompts file {path} holds no prompts: write one prompt per line")
    return lines


# ----------------------------------------------------------------------------------------------
# Evaluation: the ODE on held-out prompts, fixed noise
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_and_score(policy: Policy, prompts: list[str], reward_fn, per_prompt: int, num_steps: int, shift: float,
                     guidance: float, seed: int, noise_level: float = 0.0, batch_size: int = 64):
    """Sample every prompt `per_prompt` times, in chunks of `batch_size`, and score the images. One generator
    seeded with `seed` draws the starting noise and, for noise_level > 0, the SDE's noise (the ODE draws none).
    Under torchrun chunk c runs on rank c mod N and the scores are gathered; every rank draws every chunk's
    starting noise, so the ODE's images do not depend on the number of processes.
    Returns (scores in prompt order, {info key: per-sample values}, the first image of each of the first
    GRID_PROMPTS prompts)."""
    sigmas = policy.sigmas(num_steps, shift)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    done = {}  # chunk index -> (scores, info, first images) of this rank's chunks
    for c, i in enumerate(range(0, len(all_prompts), batch_size)):
        chunk = all_prompts[i:i + batch_size]
        x = policy.noise(len(chunk), gen)
        if c % world_size() != rank():
            continue
        out = rollout(policy, policy.encode(chunk), x, sigmas, [noise_level] * num_steps, guidance, gen)
        images = policy.decode(out.latents[:, -1])
        s, info = reward_fn(images, chunk)
        firsts = [img.cpu() for j, img in enumerate(images) if (i + j) % per_prompt == 0]  # prompts from ceil(i / G)
        firsts = firsts[:max(0, GRID_PROMPTS - (i + per_prompt - 1) // per_prompt)]
        done[c] = (s.cpu(), {k: v.cpu() for k, v in info.items()}, firsts)
    done = {c: v for part in all_gather_objects(done) for c, v in part.items()}  # every rank's chunks
    parts = [done[c] for c in sorted(done)]
    return (torch.cat([p[0] for p in parts]), {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]},
            torch.stack([img for p in parts for img in p[2]]))


def evaluate(policy: Policy, prompts: list[str], reward_fn, per_prompt: int, num_steps: int, shift: float,
             guidance: float, seed: int, batch_size: int = 64):
    """Score ODE samples of every prompt `per_prompt` times from noise fixed by `seed`.
    Returns ({metric: value}, images of the first sample of each prompt)."""
    scores, info, firsts = sample_and_score(policy, prompts, reward_fn, per_prompt, num_steps, shift, guidance, seed,
                                            batch_size=batch_size)
    metrics = {"eval/score": scores.mean().item()}
    for key, values in info.items():  # per-sample values, NaN where a metric does not apply (another category)
        metrics[f"eval/{key}"] = values.nanmean().item()
    return metrics, firsts


# ----------------------------------------------------------------------------------------------
# Logging, image grids, checkpoints
# ----------------------------------------------------------------------------------------------
def new_run_dir(out: str | None, name: str) -> Path:
    path = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Logger:
    """metrics.jsonl (one object per log point: step, wall_time, metrics), TensorBoard, wandb behind --track."""

    def __init__(self, run_dir: Path, config: dict, track: bool = False, start_time: float | None = None,
                 enabled: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.t0, self.enabled = run_dir, start_time if start_time is not None else time.time(), enabled
        if not enabled:  # under torchrun, ranks other than 0 log nothing
            return
        self.tb = SummaryWriter(str(run_dir))
        self.tb.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.wandb = None
        if track:
            import wandb

            self.wandb = wandb.init(project="cleanflowrl", name=run_dir.name, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: dict, wall_offset: float = 0.0) -> None:
        if not self.enabled:
            return
        wall = time.time() - self.t0 + wall_offset
        self.jsonl.write(json.dumps({"step": step, "wall_time": round(wall, 3), **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid with 2-pixel white gutters; images under 128 pixels
    (the shapes world's 32) are enlarged by an integer factor to at least 128, nearest-neighbour."""
    from PIL import Image

    b, _, h, w = images.shape
    ncol = min(nrow, b)
    rows = math.ceil(b / ncol)
    grid = torch.ones(3, rows * (h + 2) + 2, ncol * (w + 2) + 2)
    for i, img in enumerate(images.float().cpu().clamp(0, 1)):
        r, c = divmod(i, ncol)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr)
    scale = -(-128 // max(h, w))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write to a temporary file, then rename over the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(resume: str, args: dict) -> tuple[dict, Path]:
    """--resume (a run folder or its checkpoint file): the checkpoint and the run folder. Read with
    weights_only=True (tensors and plain types only, so a run folder someone shared cannot run code) onto the CPU,
    and checked against this run's arguments before the model loads: the same number of processes, the same
    --model, and the same LoRA where this run sets one."""
    path = Path(resume)
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"--resume {resume}: no checkpoint at {file}")
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    if len(ckpt["gen"]) != world_size():
        raise SystemExit(f"--resume {resume}: the run was saved by {len(ckpt['gen'])} processes, this one has "
                         f"{world_size()}; resume it with as many (torchrun --nproc_per_node {len(ckpt['gen'])})")
    saved = ckpt["args"]
    for key in ("model", "lora_rank", "lora_alpha"):
        if (key == "model" or args[key] is not None) and args[key] != saved[key]:
            raise SystemExit(f"--resume {resume}: the run was saved with --{key.replace('_', '-')} {saved[key]}, "
                             f"this one has {args[key]}; resume with the run's own settings")
    return ckpt, file.parent


def to_device(obj, device):
    """Every tensor in nested dicts / lists / tuples moved to `device` (checkpoints load onto the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
