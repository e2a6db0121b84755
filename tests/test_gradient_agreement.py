"""benchmarks/gradient_agreement.py: its cosines, its per-weight scaling, and that it measures without training."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gradient_agreement as ga  # noqa: E402
from common import load_policy, pick_device  # noqa: E402


def test_pairwise_cosines_match_torch_on_every_pair():
    g = [torch.randn(50, dtype=torch.float64) for _ in range(4)]
    want = [torch.nn.functional.cosine_similarity(g[k], g[l], dim=0).item() for k in range(4) for l in range(k + 1, 4)]
    assert ga.pairwise_cosines(g) == pytest.approx(want, abs=1e-12)
    assert ga.pairwise_cosines([g[0], -3 * g[0]]) == pytest.approx([-1.0])


def test_jackknife_se_matches_the_leave_one_batch_out_formula():
    g = [torch.randn(30, dtype=torch.float64) for _ in range(5)]
    cos = ga.pairwise_cosines(g)
    loo = [statistics.mean(ga.pairwise_cosines(g[:i] + g[i + 1:])) for i in range(5)]
    assert ga.jackknife_se(g, cos) == pytest.approx((4 / 5 * sum((m - statistics.mean(loo)) ** 2 for m in loo)) ** 0.5)
    assert math.isnan(ga.jackknife_se(g[:2], cos[:1]))  # two batches: one pair, no spread to measure


def test_per_weight_scaling_gives_each_weight_unit_rms_over_the_batches():
    g = [torch.tensor([2.0, 0.0, -1e-6]), torch.tensor([-4.0, 0.0, 3e-6]), torch.tensor([1.0, 0.0, 0.0])]
    scaled = torch.stack(ga.per_weight_scaled(g))
    assert scaled[:, [0, 2]].pow(2).mean(0).sqrt().tolist() == pytest.approx([1.0, 1.0])
    assert scaled[:, 1].tolist() == [0.0, 0.0, 0.0]  # a weight with no gradient stays 0, not NaN
    # a direction carried by small weights counts as much as one carried by large ones
    r0, r2 = (7.0) ** 0.5, (10 / 3) ** 0.5 * 1e-6  # RMS of [2, -4, 1] and of [-1e-6, 3e-6, 0]
    want = torch.nn.functional.cosine_similarity(torch.tensor([2 / r0, -1e-6 / r2], dtype=torch.float64),
                                                 torch.tensor([-4 / r0, 3e-6 / r2], dtype=torch.float64), dim=0)
    assert ga.pairwise_cosines([scaled[0].double(), scaled[1].double()])[0] == pytest.approx(want.item(), abs=1e-6)


def test_flow_grpo_gradients_are_nonzero_and_leave_the_weights_alone():
    torch.set_num_threads(1)
    policy = load_policy(None, pick_device("cpu"))
    policy.add_lora(0, 0.0, [])
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    args = ga.Args(batches=2, prompts_per_step=2, group_size=3)
    grads = ga.flow_grpo_gradients(policy, args)
    assert len(grads) == 2 and all(g.norm() > 0 and torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))
    again = ga.flow_grpo_gradients(policy, args)  # the same seed: the same batches, the same gradients
    assert ga.pairwise_cosines([grads[0], again[0]])[0] == pytest.approx(1.0, abs=1e-9)


def test_main_reports_both_methods_and_rejects_a_single_batch(tmp_path):
    out = tmp_path / "agreement.json"
    results = ga.main(ga.Args(batches=2, prompts_per_step=2, group_size=2, threads=1, out=out))
    assert set(results) == {"Flow-GRPO", "supervised"} and out.exists()
    for r in results.values():
        assert r["images_per_batch"] == 4
        assert all(-1.0 <= r[view][k] <= 1.0 for view in ("raw", "per_weight") for k in ("mean", "min", "max"))
        assert math.isnan(r["raw"]["se"])  # two batches
    with pytest.raises(SystemExit, match="at least 2 batches"):
        ga.main(ga.Args(batches=1))
