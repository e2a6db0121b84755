"""benchmarks/gpu_memory.py: the --tiny mode end to end on the CPU (the code path the GPU measurement takes, on
tiny models), the refusal without CUDA, and the full-size configs against the released models' sizes (built on
the meta device: no memory, nothing downloaded)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_memory as G  # noqa: E402


def test_tiny_run_has_a_row_per_configuration(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--tiny", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "gpu_memory.md").read_text()
    result = json.loads((out / "gpu_memory.json").read_text())
    names = [c.name for c in G.CONFIGS]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith(("| run ", "| ---"))]
    assert [r.split(" | ")[0][2:] for r in rows] == names, table
    assert [r["name"] for r in result["rows"]] == names
    for r in result["rows"]:
        assert r["status"] == "ok", (r["name"], r["error"])
        assert r["seconds"]["per_iteration"] > 0 and r["seconds"]["eval"] > 0 and r["rollouts_per_iteration"] > 0
        assert sum("time/sample" in rec for rec in r["records"]) == result["shrunk"]["steps"]
        assert r["memory_gib"]["training_iteration"] is None  # no CUDA: no memory figures, not zeros
        assert r["argv"][r["argv"].index("--model") + 1] == r["hub_id"]  # the docs/real_models.md command, as written
        assert all(f not in r["argv"] for f in r["dropped"])
    dropped = {r["name"]: set(r["dropped"]) for r in result["rows"]}
    assert dropped["flow_grpo-sd3-plain"] == {G.CKPT, G.OFFLOAD} and dropped["flow_grpo-sd3"] == set()
    assert "no `--gradient-checkpointing`, no `--offload-text-encoders`" in table
    assert not list(tmp_path.glob("gpu_memory_models_*")) and not list(tmp_path.glob("gpu_memory_runs_*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_full_size_refuses_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        G.main(["--only", "flow_grpo-sd3"])


def test_stand_in_rewards():
    assert G.stand_in_reward("geneval") == "pickscore"
    assert G.stand_in_reward("pickscore:1,clipscore:1,aesthetic:1") == "pickscore:1,clipscore:1,aesthetic:1"
    assert G.stand_in_reward("geneval:1,jpeg_compressibility:0.1") == "pickscore:1,jpeg_compressibility:0.1"


def test_full_size_configs_match_the_released_models():
    """Values each saved folder holds (bf16 files of the released models: SD3.5-M transformer 4.94 GB with its
    position table, FLUX.1-dev 23.8 GB, T5-XXL encoder 9.52 GB, CLIP-G 1.39 GB, CLIP-L 0.25 GB, VAE 0.17 GB;
    PickScore's ViT-H/14 986M and CLIP ViT-L/14 428M parameters)."""
    sd3, flux = G.parameter_counts("sd3", "full"), G.parameter_counts("flux", "full")
    expect = {"transformer": 2.470e9, "text_encoder": 0.1237e9, "text_encoder_2": 0.6947e9,
              "text_encoder_3": 4.762e9, "vae": 0.0838e9}
    assert sd3 == pytest.approx(expect, rel=5e-3)
    assert flux == pytest.approx({"transformer": 11.90e9, "text_encoder": 0.1231e9, "text_encoder_2": 4.762e9,
                                  "vae": 0.0838e9}, rel=5e-3)
    assert G.parameter_counts("clip_h", "full")["clip_h"] == pytest.approx(0.986e9, rel=5e-3)
    assert G.parameter_counts("clip_l", "full")["clip_l"] == pytest.approx(0.428e9, rel=5e-3)
    for size in ("full", "tiny"):  # the wiring the pipelines need: joint = T5 width, pooled = CLIP projections
        s3, fx = G.PIPELINES[("sd3", size)], G.PIPELINES[("flux", size)]
        assert s3["transformer"]["joint_attention_dim"] == s3["text_encoder_3"]["d_model"]
        assert s3["transformer"]["pooled_projection_dim"] == (s3["text_encoder"]["projection_dim"]
                                                             + s3["text_encoder_2"]["projection_dim"])
        assert fx["transformer"]["joint_attention_dim"] == fx["text_encoder_2"]["d_model"]
        assert fx["transformer"]["pooled_projection_dim"] == fx["text_encoder"]["hidden_size"]
