"""Tests for speedrun.sh: the whole chain at its smallest size, and a report that says what the scores say."""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speedrun_test_size_writes_a_consistent_report(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh"), "--size=test", f"--out={out}"], check=True,
                   capture_output=True, env=env, cwd=ROOT, timeout=600)
    report = (out / "report.md").read_text()
    val = [json.loads(line) for line in open(out / "data" / "qa_val.jsonl")]
    arms = {"baseline": "none", "Spa3-VLM": "psfm", "oracle": "oracle"}
    results = {name: json.load(open(out / f"vlm_{arm}_s0" / "eval.json")) for name, arm in arms.items()}
    for result in results.values():
        assert result["n_questions"] == len(val) and result["n_missing"] == 0
    # the ablation table carries each arm's overall score, the baseline first
    rows = [line for line in report.splitlines() if re.match(r"\| (baseline|Spa3-VLM|oracle) \| 1 \|", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == list(arms)
    for row, result in zip(rows, results.values()):
        assert float(row.split(" | ")[3]) == round(result["model"]["overall"], 2)
    # every stage and every VLM run has gate rows with a verdict (the VLMs: images or latent, and score vs chance)
    gates = [line for line in report.splitlines() if line.endswith(("| PASS |", "| FAIL |"))]
    for run, count in (("geo", 3), ("psfm", 8), ("baseline seed 0", 2), ("Spa3-VLM seed 0", 2), ("oracle seed 0", 2)):
        assert sum(line.startswith(f"| {run} |") for line in gates) == count, run
    assert "no gate measured" not in report
    # every task of the held-out questions has a row in the per-task table
    for task in {r["task"] for r in val}:
        assert f"| {task} |" in report
