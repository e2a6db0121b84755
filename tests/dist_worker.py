"""Helpers of tests/test_distributed.py, run in worker processes: one update of any script on a fixed global batch,
by one process or by each rank on its share, and a script run whose rank 1 fails.

    python tests/dist_worker.py update OUT_DIR                     # one process, the whole batch, every script
    torchrun --nproc_per_node 2 tests/dist_worker.py update ...    # each rank its half of the same batch
    torchrun --nproc_per_node 2 tests/dist_worker.py fail ARGS...  # flow_grpo.py whose rank 1 raises in its reward
"""

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import common  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle left of a red square"]
EXTRA = {"awm": dict(train_timesteps=2, global_std=True), "mix_grpo": dict(window_size=2, window_interval=1),
         "flow_grpo": dict(global_std=True), "g2rpo": dict(granularities=(1, 2)), "tempflow_grpo": dict(seeds=2),
         "dance_grpo": dict(timestep_fraction=0.7),
         "diffusion_nft": dict(timestep_fraction=0.5)}
TREE = ("g2rpo", "tempflow_grpo")  # batches of parent states x_k (ordered (k, trajectory)) instead of images


def take_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The images `rows` (whole groups) of an image-major batch (flow_grpo, awm, mix_grpo)."""
    n = len(batch["prompts"])
    out = {}
    for k, v in batch.items():
        if k == "prompts":
            out[k] = [v[i] for i in rows.tolist()]
        elif k == "cond":
            out[k] = common.index_cond(v, rows)
        elif k == "groups":
            out[k] = v[rows] - v[rows].min()
        elif isinstance(v, torch.Tensor) and v.ndim and len(v) == n:
            out[k] = v[rows]
        else:
            out[k] = v
    return out


def take_parents(batch: dict, trajectories: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The parent states of `trajectories` at every branching step, their children's images and their prompts
    (g2rpo, tempflow_grpo: parents ordered (k, trajectory)), renumbered as if sampled alone; and the images' rows
    in the whole batch."""
    n = len(batch["steps"]) // len(batch["steps"].unique())  # trajectories per branching step
    parents = torch.cat([s * n + trajectories for s in range(len(batch["steps"]) // n)])
    out = dict(batch)
    for k in ("states", "next", "log_probs", "steps", "seed"):
        if k in batch:
            out[k] = batch[k][parents]
    prompts = batch["prompt"][parents].unique()
    out["prompt"] = torch.searchsorted(prompts, batch["prompt"][parents])
    out["cond"] = common.index_cond(batch["cond"], prompts)
    if "image" in batch:  # tempflow: each child's image index
        images = batch["image"][parents].flatten().unique()
        out["image"] = torch.searchsorted(images, batch["image"][parents])
    else:  # g2rpo: images ordered (parent, child, granularity)
        per = len(batch["images"]) // len(batch["steps"])
        images = (parents[:, None] * per + torch.arange(per)).flatten()
    out["images"] = batch["images"][images]
    out["prompts"] = [batch["prompts"][i] for i in images.tolist()]
    return out, images


SCRIPTS = ["flow_grpo", "awm", "mix_grpo", "g2rpo", "tempflow_grpo", "dance_grpo", "diffusion_nft"]


def one_update(name: str, out_dir: Path, rank: int, world: int) -> None:
    """Two optimiser steps (two minibatches) of `name` on a fixed global batch of 4 prompts, with SGD, so that the
    update is the clipped gradient itself; saves the weights (each rank's too) and the advantages."""
    mod = importlib.import_module(name)
    args = mod.Args(prompts_per_step=len(PROMPTS), group_size=4, num_steps=4, minibatches=2, lora_rank=0,
                    device="cpu", shift=3.0, beta=0.1, **EXTRA.get(name, {}))
    import shapes

    torch.manual_seed(0)
    policy = common.sd3_policy(shapes.build_sd3_pipeline(shapes.build_vae(4)), torch.device("cpu"))
    policy.add_lora(0, 0.0, [])
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    state = mod.init_state(policy, args)
    before = policy.trainable_state()
    shared = torch.Generator().manual_seed(1)
    # every rank samples the same global batch (one process's draw), then keeps its own prompts' share
    batch = mod.sample_batch(policy, PROMPTS, state, args, torch.Generator().manual_seed(2), shared)
    rewards = torch.linspace(0, 1, len(batch["images"]))[torch.randperm(len(batch["images"]),
                                                                        generator=torch.Generator().manual_seed(3))]
    if world > 1:
        if name in TREE:
            n = len(batch["steps"]) // len(batch["steps"].unique())
            local, image_rows = take_parents(batch, torch.arange(n).chunk(world)[rank])
        else:
            image_rows = torch.arange(len(batch["images"])).chunk(world)[rank]
            local = take_rows(batch, image_rows)
        batch, rewards = local, rewards[image_rows]
    adv = mod.compute_advantages(batch, rewards, {}, args)
    stats = mod.train_on_batch(policy, opt, batch, adv, state, args, shared)
    adv = torch.cat(common.all_gather_objects(adv))
    torch.save({"before": before, "weights": policy.trainable_state(), "adv": adv, "stats": stats},
               out_dir / f"{name}.{rank}.pt")


def failing_run(argv: list[str]) -> None:
    """flow_grpo.py whose rank 1 raises at its first reward call: the job must end with that error, not hang."""
    import flow_grpo
    import rewards
    import tyro

    def shapes_or_fail(images, prompts):
        if common.rank() == 1:
            raise RuntimeError("rank 1 fails on purpose")
        return rewards.shapes_reward(images, prompts)

    rewards.REWARDS["fail_on_rank1"] = shapes_or_fail
    flow_grpo.main(tyro.cli(flow_grpo.Args, args=[*argv, "--reward", "fail_on_rank1"]))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_flush_denormal(True)
    if sys.argv[1] == "update":
        torch.set_num_threads(1)
        rank, world = common.init_distributed(torch.device("cpu"))
        for script in SCRIPTS:
            one_update(script, Path(sys.argv[2]), rank, world)
        common.close_distributed()
    else:
        failing_run(sys.argv[2:])
