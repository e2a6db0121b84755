"""benchmarks/time_rewards.py end to end with --tiny: every reward's model built in its loading layout (tiny sizes
of the same architectures), loaded by the reward through $CLEANFLOWRL_MODEL_<KEY> and timed; a finite positive
time for each in the JSON, and the process's state (threads, rewards.py settings, environment) left as found."""

import json
import math
import os
import sys
import tempfile

import torch
import tyro

import rewards as R
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import time_rewards as T  # noqa: E402


def test_tiny_run_times_every_reward(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the models are built (and deleted) here
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "results" / "timing.json"
    threads, settings = torch.get_num_threads(), (R.BATCH_SIZE, R.GENEVAL_TEST_SCALE)
    env = {k: v for k, v in os.environ.items() if k.startswith("CLEANFLOWRL_")}
    args = tyro.cli(T.Args, args=["--tiny", "--images", "2", "--size", "64", "--threads", "1", "--out", str(out)])
    T.main(args)

    result = json.loads(out.read_text())
    assert list(result["results"]) == list(T.REWARD_NAMES) == ["pickscore", "clipscore", "aesthetic", "hpsv2",
                                                               "imagereward", "geneval", "ocr", "shapes"]
    for name, r in result["results"].items():
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0, (name, r)
        assert r["seconds_per_image"] == r["seconds"] / 2 and len(r["seconds_all"]) == 1
        assert math.isfinite(r["load_seconds"]) and r["scores_finite"], (name, r)
        assert (r["parameters"] is None) == (name in ("ocr", "shapes")), (name, r["parameters_by_model"])
        assert r["image_side"] == (32 if name == "shapes" else 64)
    assert set(result["results"]["aesthetic"]["parameters_by_model"]) == {"aesthetic: CLIPModel",
                                                                          "aesthetic: AestheticMLP"}
    assert set(result["results"]["geneval"]["parameters_by_model"]) == {
        "geneval: Mask2FormerForUniversalSegmentation", "geneval_clip: CLIPModel"}
    colour = result["results"]["geneval"]["colour_check"]
    assert colour["crops"] == 2 and colour["seconds_per_crop"] > 0 and colour["seconds_per_new_class_name"] >= 0
    assert result["settings"]["tiny"] and result["settings"]["geneval_test_scale"] == [64, 64]
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["torch"] == torch.__version__
    assert len(result["loadavg_start"]) == 3 and len(result["loadavg_end"]) == 3
    assert result["command"] == (f"python benchmarks/time_rewards.py --images 2 --size 64 --threads 1 --tiny "
                                 f"--out {out}")

    printed = capsys.readouterr().out.splitlines()
    rows = [ln for ln in printed if ln.startswith("| ") and not ln.startswith(("| reward", "| ---"))]
    assert [r.split(" | ")[0][2:] for r in rows] == list(T.REWARD_NAMES)
    # the process is left as found: threads, rewards.py's settings, no model overrides, no cached models or folders
    assert torch.get_num_threads() == threads and (R.BATCH_SIZE, R.GENEVAL_TEST_SCALE) == settings
    assert {k: v for k, v in os.environ.items() if k.startswith("CLEANFLOWRL_")} == env and not R._MODELS
    assert not list((tmp_path / "tmp").glob("time_rewards_*"))
