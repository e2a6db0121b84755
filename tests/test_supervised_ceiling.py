"""benchmarks/supervised_ceiling.py: trains for its budget, evaluates at the start and the end, writes its log."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import supervised_ceiling  # noqa: E402


def test_supervised_ceiling_trains_for_its_budget_and_logs_each_evaluation(tmp_path):
    out = tmp_path / "ceiling.jsonl"
    records = supervised_ceiling.main(supervised_ceiling.Args(
        lr=1e-3, minutes=0.03, batch_size=8, eval_per_prompt=1, eval_every=100.0, threads=1, out=out))
    assert [r["step"] for r in records][0] == 0 and len(records) == 2  # the base, then the end of the budget
    assert records[-1]["step"] > 0 and records[-1]["train_min"] > 0.03
    assert all(0.0 <= r["eval/score"] <= 1.0 and 0.0 <= r["eval/strict"] <= r["eval/score"] for r in records)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
